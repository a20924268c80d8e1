"""Tiny random LLaVA-1.5 and Qwen2.5-VL models built from configs, for the tests and the benchmarks.

Nothing is downloaded: each tokenizer is a word-level `tokenizers` model wrapped in PreTrainedTokenizerFast, each
processor is built from its classes, and the folders are written with save_pretrained so the stages load them the
way they load a real checkpoint (AutoProcessor / AutoModelForImageTextToText). The benchmarks ask for larger sizes.
"""
from pathlib import Path

import torch

WORDS = ("is there a an in the image ? yes no . , : describe answer question using single word or phrase "
         "red green blue yellow purple circle square triangle cross what colour shape of object there is and "
         "mainly based on first second refer to cropping details if necessary this user assistant").split()


def _word_tokenizer(special, extra_special, eos, pad, bos=None):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(special + [w for w in dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(special)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token=eos, pad_token=pad,
                                   bos_token=bos, extra_special_tokens=extra_special,
                                   model_input_names=["input_ids", "attention_mask"])
    return fast, vocab


def make_tiny_llava(path, image_size=32, patch_size=8, seed=0, hidden=32, layers=2, heads=2, vision_hidden=32,
                    vision_layers=2):
    """A random LLaVA-1.5-shaped model (CLIP tower with CLS, 'default' feature strategy) and its processor.
    The sizes default to a 0.1M-parameter model for tests; benchmarks ask for larger ones."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)
    tok, vocab = _word_tokenizer(["<pad>", "<unk>", "<s>", "</s>", "<image>"], {"image_token": "<image>"},
                                 eos="</s>", pad="<pad>", bos="<s>")
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}user : {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image> {% endif %}{% endfor %}{% for c in m['content'] %}"
                "{% if c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}{% else %}assistant : "
                "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s>"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=tok, patch_size=patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=template)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                       num_hidden_layers=vision_layers, num_attention_heads=heads,
                                       image_size=image_size, patch_size=patch_size),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                max_position_embeddings=512,
                                pad_token_id=0, bos_token_id=2, eos_token_id=3),
        image_token_id=4, vision_feature_layer=-1, vision_feature_select_strategy="default", pad_token_id=0)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.update(eos_token_id=3, pad_token_id=0, bos_token_id=2)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return Path(path)


def make_tiny_qwen(path, seed=0):
    """A random Qwen2.5-VL-shaped model (windowed ViT, 2x2 merge, M-RoPE) and its processor."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>", "<unk>"]
    tok, vocab = _word_tokenizer(special, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
                                 eos="<|im_end|>", pad="<|endoftext|>")
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
                "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|> {% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
    pixels = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=template)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=2, bos_token_id=None),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1], in_channels=3),
        image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4,
        pad_token_id=0, eos_token_id=2, bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.update(eos_token_id=2, pad_token_id=0, bos_token_id=None)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return Path(path)

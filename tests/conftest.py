"""Test fixtures: tiny random LLaVA-1.5 and Qwen2.5-VL models built from configs.

Nothing is downloaded: each tokenizer is a word-level `tokenizers` model wrapped in
PreTrainedTokenizerFast, each processor is built from its classes, and the folders
are written with save_pretrained so the scripts load them the way they load a real
checkpoint (AutoProcessor / AutoModelForImageTextToText).
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("is there a an in the image ? yes no . , : describe answer question using single word or phrase "
         "red green blue yellow purple circle square triangle cross what colour shape of object there is and "
         "mainly based on first second refer to cropping details if necessary this user assistant").split()

torch.set_num_threads(1)  # tiny models: one thread is fastest and does not stall on a busy second core


def load_script(relpath, name=None):
    """Import a script by path (its name starts with a digit, so `import` cannot): its functions, not its main()."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(name or path.stem.replace("-", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _word_tokenizer(special, extra_special, eos, pad, bos=None):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(special + [w for w in dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(special)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token=eos, pad_token=pad, bos_token=bos,
                                   extra_special_tokens=extra_special, model_input_names=["input_ids", "attention_mask"]), vocab


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


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("tiny_llava") / "model")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    return make_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen") / "model")


def run_script(name, *args, check=True, timeout=600, **kw):
    """Run a stage as a user would: `python NAME ARGS...` from the repository root."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(ROOT / name), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}")
    return proc


def run_torchrun(script, nproc, *args, timeout=300):
    """Run a stage under `torchrun --standalone --nproc_per_node=nproc` (gloo on CPU), as a user would."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@torch.no_grad()
def token_by_token_logprob(model, processor, chat_text, response, images):
    """(log pi(y | c), n): one row alone, no padding, one plain forward per prefix of the response + EOS; the
    reference that batched, masked scoring is tested against. chat_text: the chat prompt with its image tokens."""
    tok = processor.tokenizer
    enc = processor(text=[chat_text], images=images, return_tensors="pt")
    resp = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    total = 0.0
    for t in range(len(resp)):
        extra = torch.tensor([resp[:t]], dtype=torch.long)
        feed = dict(enc, input_ids=torch.cat([enc["input_ids"], extra], 1),
                    attention_mask=torch.ones(1, enc["input_ids"].shape[1] + t, dtype=torch.long))
        if "mm_token_type_ids" in enc:
            feed["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(extra)], 1)
        total += torch.log_softmax(model(**feed).logits[0, -1].double(), -1)[resp[t]].item()
    return total, len(resp)

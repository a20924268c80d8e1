"""00: the embedded default world: a synthetic shapes world with exact ground truth, a tiny LLaVA trained
from scratch on it, a tiny CLIP, POPE files. Every later stage runs on it by default, offline, on a CPU.

Paper: P2-DPO traces object hallucination to perceptual processing: a small object the model cannot
resolve in the full view is answered from the language prior, and a zoomed crop fixes it. This world
makes that failure measurable:
  - images are drawn on a CANVAS x CANVAS canvas (128 px) but the model sees a VIEW x VIEW view (64 px,
    the processor's resize), so small objects (10-28 px on the canvas, 5-14 px in the view) are hard to
    judge, while a crop cut from the canvas carries real extra detail (not just upsampled pixels);
  - 20 classes (5 colours x 4 shapes) grouped in themes, so class frequency and co-occurrence are uneven
    and POPE's popular / adversarial negatives mean something;
  - the model is trained on one-image and two-image (full view + zoomed crop, with the paper's enhanced
    prompt) conversations, so stage 02's I_aug input is in distribution.
Recipe (a from-scratch tiny LLaVA trained end to end stays at chance): (1) pre-train the vision tower
alone with a linear head classifying each patch (background or the class covering it); (2) freeze it, start
the projector from that head mapped onto the class words' embeddings, and train projector + language model on
multi-turn conversations (yes/no, open colour/shape questions, descriptions) about fresh scenes every step.
A sanity gate on the validation split refuses to save a chance-level model. Measured (README): POPE random
accuracy 0.824 clean, 0.580 at sigma 0.3 with the yes-ratio 0.66 -> 0.86; CHAIR_i 0.50. Training takes 9.4 min
on a 2-core CPU, so the default build copies assets/toy_model (this script's own output for these settings);
--retrain trains it.

Writes (paths inside JSONL files are relative to that file's folder):
  images/*.png            train_*, val_*, test_* canvases
  truth.jsonl             {"id","image","split","objects":[{"class","box":[x1,y1,x2,y2]}]}
  instances.jsonl         P2-DPO inputs on train images {"id","image","prompt"} (no answers)
  pope/{random,popular,adversarial}.jsonl   held-out POPE {"question_id","image","text","label"}
  describe.jsonl          held-out description prompts {"question_id","image","text"} (CHAIR)
  val/pope/*.jsonl, val/describe.jsonl   the same on separate images, for tuning (world/pope is for reports)
  model/                  LlavaForConditionalGeneration + LlavaProcessor (chat template), save_pretrained
  clip/                   open_clip model: load with open_clip.create_model_and_transforms("local-dir:world/clip")
  world.json              settings, classes, prompts (enhanced-prompt template, crop_base) for later stages
Shapes in comments: B batch, T tokens, N image patches, C classes, V vocabulary.

  python 00_toy_world.py                       # full world: 2 min with the committed model (--retrain: ~10 min)
  python 00_toy_world.py --tiny --out /tmp/w   # seconds: for tests (model not trained to quality)
  (CPU only by design: the world is small enough that a GPU buys nothing.)
"""
import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (225, 195, 25),
           "purple": (145, 60, 185)}
SHAPES = ["circle", "square", "triangle", "cross"]
CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]
SUFFIX = " answer the question using a single word or phrase ."  # LLaVA-1.5's short-answer suffix
PROMPTS = {  # lower case, punctuation spaced: the world's tokenizer is word level
    "describe": "describe the image .",
    "yesno": "is there a {cls} in the image ?",
    "colour": "what colour is the {shape} ?",
    "shape": "what shape is the {colour} object ?",
    # the paper's enhanced prompt P_enh (authors' code), used with (I, I_crop) as two images
    "enhanced": "answer the question mainly based on the first image , refer to the cropping details of the "
                "second image if necessary , answer this question : {question}",
}
CHAT_TEMPLATE = (  # LLaVA-1.5's "USER: <image>\n... ASSISTANT: ...</s>" in the world's lower-case words
    "{% for m in messages %}{% if m['role'] == 'user' %}user : {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% endif %}{% endfor %}{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}{% else %}assistant : "
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}")
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
PAD, EOS, IMAGE = 0, 3, 4


SHIPPED = Path(__file__).resolve().parent / "assets" / "toy_model"  # base model committed with the code


def shipped_settings():
    """The settings the committed base model was trained with (None when there is none)."""
    path = SHIPPED / "toy_settings.json"
    return json.loads(path.read_text()) if path.is_file() else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="world", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seeds the world, the data and both models")
    p.add_argument("--retrain", action="store_true",
                   help="train the tiny LLaVA even when assets/toy_model was made with these same settings "
                        "(it is a copy of world/model from such a run, committed so the default build is fast)")
    p.add_argument("--tiny", action="store_true", help="a few images and steps, for tests: runs in seconds, no quality gate")
    p.add_argument("--canvas", type=int, default=128, help="canvas side in pixels (images on disk, crops are cut from it)")
    p.add_argument("--view", type=int, default=64, help="model input side: the processor resizes the canvas to it")
    p.add_argument("--patch", type=int, default=8, help="vision patch size (view/patch squared image tokens)")
    p.add_argument("--obj-size", type=int, nargs=2, default=[10, 28], help="object side range on the canvas, pixels")
    p.add_argument("--n-pool", type=int, default=2000, help="images for vision pre-training and CLIP (in memory)")
    p.add_argument("--n-instances", type=int, default=400, help="P2-DPO instance images (train split, written)")
    p.add_argument("--n-val", type=int, default=200, help="validation images (POPE + describe under val/)")
    p.add_argument("--n-test", type=int, default=500, help="held-out POPE images (POPE asks for at least 500)")
    p.add_argument("--n-describe", type=int, default=200, help="held-out images with a description prompt")
    p.add_argument("--instance-mix", type=float, nargs=4, default=[0.4, 0.3, 0.3, 0.0],
                   help="shares of instance prompts: describe, colour question, shape question, yes/no question "
                        "(yes/no prompts make poor focus pairs: erasing the object just flips yes to no)")
    p.add_argument("--d-model", type=int, default=64, help="width of the vision tower and the language model")
    p.add_argument("--layers", type=int, default=3, help="layers of the vision tower and of the language model")
    p.add_argument("--vision-steps", type=int, default=400, help="vision-tower pre-training steps (batch 64)")
    p.add_argument("--sft-steps", type=int, default=2000, help="projector + LM training steps (batch 32)")
    p.add_argument("--projector-init", choices=["words", "random"], default="words",
                   help="words: start the projector from the vision head, mapped onto the class words' embeddings; "
                        "random: LLaVA's default (not measured at the default --lr)")
    p.add_argument("--lr", type=float, default=5e-4,
                   help="SFT learning rate (warmup 100, cosine); at 2e-3 yes/no stayed at chance for 1200 steps")
    p.add_argument("--suffix-share", type=float, default=0.5,
                   help="share of first-turn short questions that carry LLaVA's suffix (see sft_conversation)")
    p.add_argument("--suffix-from", type=int, default=0,
                   help="SFT step from which first turns carry the suffix (before: none; see sft_conversation)")
    p.add_argument("--yes-share", type=float, default=0.6,
                   help="share of SFT yes/no questions whose answer is yes: LLaVA-style data leans to yes, and that "
                        "prior is what a model falls back on when noise hides the objects (at 0.5 the yes-ratio fell "
                        "at sigma 0.3 on POPE random)")
    p.add_argument("--eval-every", type=int, default=200, help="SFT steps between quick val/random checks")
    p.add_argument("--two-image-share", type=float, default=0.2, help="share of SFT batches whose conversations add a zoom crop as second image")
    p.add_argument("--clip-steps", type=int, default=400, help="tiny CLIP contrastive steps (batch 128)")
    p.add_argument("--min-val-acc", type=float, default=0.65,
                   help="sanity gate: refuse to save a model below this yes/no accuracy on val/random")
    args = p.parse_args(argv)
    if args.tiny:
        args.n_pool, args.n_instances, args.n_val, args.n_test, args.n_describe = 64, 12, 8, 10, 4
        args.vision_steps, args.sft_steps, args.clip_steps, args.min_val_acc = 5, 10, 5, 0.0
    return args


# ---- the world: scenes, rendering, text ----
def class_statistics(rng):
    """Uneven class popularity and 4 themes of co-occurring classes, fixed by the seed."""
    popularity = 1.0 / np.arange(1, len(CLASSES) + 1) ** 0.7
    popularity = popularity[rng.permutation(len(CLASSES))]
    themes = []
    for _ in range(4):
        members = rng.choice(len(CLASSES), size=7, replace=False)
        p = np.full(len(CLASSES), 0.02)
        p[members] = 1.0 / np.arange(1, 8) ** 0.5
        themes.append(p / p.sum())
    return popularity / popularity.sum(), themes


def sample_scene(rng, popularity, themes, canvas, obj_size):
    """1-4 distinct classes from one theme (80%) or the global popularity (20%), placed without overlap."""
    theme = themes[rng.integers(len(themes))]
    n = rng.choice([1, 2, 3, 4], p=[0.15, 0.3, 0.3, 0.25])
    classes = []
    while len(classes) < n:
        c = int(rng.choice(len(CLASSES), p=theme if rng.random() < 0.8 else popularity))
        if c not in classes:
            classes.append(c)
    objects = []
    for c in classes:
        for _ in range(200):
            s = int(rng.integers(obj_size[0], obj_size[1] + 1))
            x, y = (int(v) for v in rng.integers(2, canvas - s - 2, size=2))
            box = [x, y, x + s, y + s]
            if all(box[0] > o["box"][2] + 3 or box[2] < o["box"][0] - 3 or box[1] > o["box"][3] + 3
                   or box[3] < o["box"][1] - 3 for o in objects):
                objects.append({"class": CLASSES[c], "box": box})
                break
    background = [int(v) for v in rng.integers(160, 236, size=3)]
    return {"objects": objects, "background": background, "texture_seed": int(rng.integers(2**31))}


def draw_shape(draw, shape, box, fill):
    x1, y1, x2, y2 = box
    s = x2 - x1
    if shape == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
    elif shape == "square":
        m = round(s * 0.08)
        draw.rectangle([x1 + m, y1 + m, x2 - 1 - m, y2 - 1 - m], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)], fill=fill)
    else:  # cross: a plus sign
        t = max(2, round(s / 3))
        c1 = x1 + (s - t) // 2
        draw.rectangle([c1, y1, c1 + t - 1, y2 - 1], fill=fill)
        draw.rectangle([x1, y1 + (s - t) // 2, x2 - 1, y1 + (s - t) // 2 + t - 1], fill=fill)


def render(scene, canvas):
    """-> (RGB canvas, label map (canvas, canvas) uint8 with class index + 1, 0 = background)."""
    noise = np.random.default_rng(scene["texture_seed"]).normal(0, 7, (canvas, canvas, 1))  # mild texture
    pixels = np.clip(np.array(scene["background"], dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    image, labels = Image.fromarray(pixels), Image.new("L", (canvas, canvas), 0)
    draw, draw_labels = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    for o in scene["objects"]:
        colour, shape = o["class"].split()
        draw_shape(draw, shape, o["box"], COLOURS[colour])
        draw_shape(draw_labels, shape, o["box"], CLASSES.index(o["class"]) + 1)
    return image, np.asarray(labels)


def zoom_box(rng, box, canvas):
    """A square crop around one object, like stage 01's windows (48-96 px on the default canvas)."""
    s = box[2] - box[0]
    side = int(rng.integers(max(2 * s, canvas * 3 // 8), canvas * 3 // 4 + 1))
    x = int(rng.integers(max(0, box[2] - side), min(box[0], canvas - side) + 1))
    y = int(rng.integers(max(0, box[3] - side), min(box[1], canvas - side) + 1))
    return [x, y, x + side, y + side]


def describe(objects):
    """'there is a red circle , a blue square and a green cross .' (objects left to right)."""
    names = [f"a {o['class']}" for o in sorted(objects, key=lambda o: (o["box"][0], o["box"][1]))]
    listed = names[0] if len(names) == 1 else " , ".join(names[:-1]) + " and " + names[-1]
    return f"there is {listed} ."


def open_question(rng, objects):
    """A colour or shape question with a unique answer in this image, or None."""
    colours = [o["class"].split()[0] for o in objects]
    shapes = [o["class"].split()[1] for o in objects]
    options = [("colour", s, c) for c, s in zip(colours, shapes) if shapes.count(s) == 1]
    options += [("shape", c, s) for c, s in zip(colours, shapes) if colours.count(c) == 1]
    if not options:
        return None
    kind, key, answer = options[rng.integers(len(options))]
    prompt = PROMPTS["colour"].format(shape=key) if kind == "colour" else PROMPTS["shape"].format(colour=key)
    return kind, prompt, answer


def yesno_turn(rng, objects, about=None, yes_share=0.5):
    """A positive with probability yes_share (on `about` when given); else a negative: an absent class, one that
    shares a colour or shape with `about` (or, 20% of the time, with any present object), so both attributes matter."""
    present = [o["class"] for o in objects]
    if rng.random() < yes_share:
        return PROMPTS["yesno"].format(cls=about or present[rng.integers(len(present))]) + SUFFIX, "yes"
    absent = [c for c in CLASSES if c not in present]
    near_any = rng.random() < 0.2
    anchors = [about] if about else (present if near_any else [])
    choices = [c for c in absent if any(w in c.split() for a in anchors for w in a.split())] or absent
    return PROMPTS["yesno"].format(cls=choices[rng.integers(len(choices))]) + SUFFIX, "no"


def sft_conversation(rng, objects, zoomed=None, suffix_share=0.5, yes_share=0.5):
    """4 turns about one image: a description first (30%), then yes/no (80%) and open questions (20%). With a
    zoomed crop (second image, enhanced prompt) the first turn asks about the zoomed object: there the object is
    big, so matching the question to the image is easy to learn, and it carries over to the small full view.
    LLaVA's short-answer suffix (which POPE adds) goes on a share of first turns only: it puts 12 tokens between
    the class words and the answer, which makes the question-image matching harder to find (--suffix-from can
    also hold it back for the first steps)."""
    turns = []
    for t in range(4):
        q = open_question(rng, objects) if rng.random() < 0.2 else None
        if t == 0 and zoomed is not None:
            turns.append(yesno_turn(rng, objects, about=zoomed["class"], yes_share=yes_share))
        elif t == 0 and rng.random() < 0.3:
            turns.append((PROMPTS["describe"], describe(objects)))
        elif q is not None:
            turns.append((q[1] + SUFFIX, q[2]))
        else:
            turns.append(yesno_turn(rng, objects, yes_share=yes_share))
        if t > 0 or rng.random() >= suffix_share:
            turns[-1] = (turns[-1][0].replace(SUFFIX, ""), turns[-1][1])
    if zoomed is not None:
        turns[0] = (PROMPTS["enhanced"].format(question=turns[0][0]), turns[0][1])
    return turns


# ---- POPE files: POPE's three rules for the negative ----
def pope_rows(scenes, names, freq, cooc, rng, image_prefix):
    """1 positive + 1 negative per image and split: random / most frequent absent / most co-occurring absent."""
    splits = {"random": [], "popular": [], "adversarial": []}
    for scene, name in zip(scenes, names):
        present = [CLASSES.index(o["class"]) for o in scene["objects"]]
        absent = [c for c in range(len(CLASSES)) if c not in present]
        positive = present[rng.integers(len(present))]
        negatives = {"random": absent[rng.integers(len(absent))],
                     "popular": max(absent, key=lambda c: (freq[c], -c)),
                     "adversarial": max(absent, key=lambda c: (cooc[present, c].sum(), freq[c], -c))}
        for split, negative in negatives.items():
            for c, label in ((positive, "yes"), (negative, "no")):
                rows = splits[split]
                rows.append({"question_id": len(rows) + 1, "image": f"{image_prefix}{name}.png",
                             "text": f"Is there a {CLASSES[c]} in the image?", "label": label})
    return splits


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


# ---- the model: tokenizer, processor, tiny LLaVA ----
def build_processor(view, patch):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast
    text = " ".join([*PROMPTS.values(), SUFFIX, *CLASSES, "there is a an , and . yes no not user assistant :"])
    words = sorted(set(text.replace("{", " {").replace("}", "} ").split()) - {"{question}", "{cls}", "{shape}", "{colour}"})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIAL + words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", extra_special_tokens={"image_token": "<image>"},
                                        model_input_names=["input_ids", "attention_mask"])
    image_processor = CLIPImageProcessor(size={"shortest_edge": view}, crop_size={"height": view, "width": view})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def build_llava(vocab_size, args):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    d, L = args.d_model, args.layers
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=L,
                                       num_attention_heads=4, image_size=args.view, patch_size=args.patch),
        text_config=LlamaConfig(vocab_size=vocab_size, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=L,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                                pad_token_id=PAD, bos_token_id=2, eos_token_id=EOS),
        image_token_id=IMAGE, vision_feature_layer=-1, vision_feature_select_strategy="default", pad_token_id=PAD)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.update(eos_token_id=EOS, pad_token_id=PAD, bos_token_id=2)
    return model


def encode_conversation(processor, turns, n_images, n_image_tokens):
    """Chat-template ids with each <image> expanded as the processor does; labels = answers + </s>. -> (ids, labels)"""
    messages = []
    for i, (question, answer) in enumerate(turns):
        content = [{"type": "image"}] * (n_images if i == 0 else 0) + [{"type": "text", "text": question}]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    raw = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assistant, colon = processor.tokenizer.convert_tokens_to_ids(["assistant", ":"])
    ids, labels, in_answer = [], [], False
    for j, t in enumerate(raw):
        ids += [t] * (n_image_tokens if t == IMAGE else 1)
        labels += [t if in_answer else -100] * (n_image_tokens if t == IMAGE else 1)
        if t == EOS:
            in_answer = False
        elif t == colon and j > 0 and raw[j - 1] == assistant:
            in_answer = True  # everything after "assistant :" up to and including </s> is the answer
    return ids, labels


def pixel_values(processor, images, chunk=256):
    return torch.cat([processor.image_processor(images=images[i:i + chunk], return_tensors="pt")["pixel_values"]
                      for i in range(0, len(images), chunk)])  # (n, 3, view, view)


def patch_targets(label_maps, boxes, view, patch):
    """The class covering most of each patch of the view of label_map[box] (0 = background): (n, N) ints."""
    g = view // patch
    out = np.zeros((len(label_maps), g * g), dtype=np.int64)
    for i, (lab, (x1, y1, x2, y2)) in enumerate(zip(label_maps, boxes)):
        small = np.asarray(Image.fromarray(lab[y1:y2, x1:x2]).resize((view, view), Image.NEAREST))
        cells = small.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, patch * patch)
        counts = np.stack([(cells == c).sum(1) for c in range(len(CLASSES) + 1)], 1)  # (N, C + 1)
        counts[:, 0] = np.where(counts[:, 1:].max(1) >= 3, 0, 1)  # a patch with 3+ object pixels is that object
        out[i] = counts.argmax(1)
    return torch.from_numpy(out)


def cosine_lr(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_vision(model, pixels, targets, steps, seed):
    """Stage 1: the vision tower alone learns which classes are in which patch (a from-scratch LLaVA
    trained end to end stays at chance: the language prior wins before the tower learns anything)."""
    tower = model.model.vision_tower
    head = torch.nn.Linear(tower.config.hidden_size, len(CLASSES) + 1)  # background + classes
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="vision pre-training", mininterval=2)
    for step in bar:
        idx = torch.randint(len(pixels), (64,), generator=g)
        hidden = tower(pixel_values=pixels[idx]).last_hidden_state[:, 1:]  # (B, N, d), CLS dropped
        loss = F.cross_entropy(head(hidden).flatten(0, 1), targets[idx].flatten())  # (B * N, C + 1)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, 2e-3, 50)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    tower.requires_grad_(False)
    return head


@torch.no_grad()
def align_projector(model, head, tokenizer, scale=0.2):
    """Start the projector where an image token that shows a red circle looks like the words 'red' + 'circle':
    linear_1 carries the pre-training head's class logits, GELU keeps the present ones, linear_2 maps class c
    to (embedding of its colour word + of its shape word), so that reading the image starts as matching the
    question's words against image tokens. (Not sufficient alone: at lr 2e-3 it stayed at chance; see --lr.)"""
    proj, words = model.model.multi_modal_projector, model.get_input_embeddings().weight
    C = len(CLASSES)
    proj.linear_1.weight[:C], proj.linear_1.bias[:C] = head.weight[1:], head.bias[1:]  # skip background
    for c, name in enumerate(CLASSES):
        proj.linear_2.weight[:, c] = scale * words[tokenizer.convert_tokens_to_ids(name.split())].sum(0) / words.std()


def collate(examples):
    """Right-padded batch of (ids, labels) -> ids, labels, mask (B, T)."""
    T = max(len(e[0]) for e in examples)
    ids = torch.full((len(examples), T), PAD)
    labels = torch.full((len(examples), T), -100)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)], labels[i, :len(y)] = torch.tensor(x), torch.tensor(y)
    return ids, labels, (ids != PAD).long()


@torch.no_grad()
def vision_features(model, pixels, chunk=256):
    """The frozen tower's patch features, as LLaVA selects them ('default': layer -1 without CLS). (n, N, d)"""
    tower, layer = model.model.vision_tower, model.config.vision_feature_layer
    return torch.cat([tower(pixel_values=pixels[i:i + chunk], output_hidden_states=True).hidden_states[layer][:, 1:]
                      for i in range(0, len(pixels), chunk)])


def embed_inputs(model, ids, features):
    """LLaVA's input embeddings: token embeddings with the image tokens replaced, in order, by the projected
    features (what LlavaModel does with pixel_values; here the frozen tower's output is computed once)."""
    embeds = model.get_input_embeddings()(ids)  # (B, T, d)
    image = model.model.multi_modal_projector(features).reshape(-1, embeds.shape[-1])  # (n_img * N, d)
    return embeds.masked_scatter((ids == IMAGE).unsqueeze(-1), image.to(embeds.dtype))


@torch.no_grad()
def yes_no_accuracy(model, processor, questions, view_of, suffix=SUFFIX, batch=64):
    """Quick POPE accuracy from the next-token logits of 'yes' vs 'no' (one forward, no decoding)."""
    yes, no = processor.tokenizer.convert_tokens_to_ids(["yes", "no"])
    model.eval()
    correct, said_yes = 0, 0
    for i in range(0, len(questions), batch):
        rows = questions[i:i + batch]
        texts = [processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": r["text"] + suffix}]}], add_generation_prompt=True,
            tokenize=False) for r in rows]
        inputs = processor(text=texts, images=[view_of[r["image"]] for r in rows], padding=True, return_tensors="pt")
        logits = model(**inputs).logits[:, -1]  # (B, V), left padded so the last position is the answer's
        pred_yes = logits[:, yes] > logits[:, no]
        said_yes += int(pred_yes.sum())
        correct += sum(int(p) == (r["label"] == "yes") for p, r in zip(pred_yes.tolist(), rows))
    model.train()
    return correct / len(questions), said_yes / len(questions)


def sft_batch(rng, processor, popularity, themes, args, suffix_share, two):
    """32 conversations about 32 fresh scenes (never seen again: a fixed pool gets memorised instead of read),
    -> ids, labels, mask (B, T) and pixel rows (n_img, 3, view, view) in the order their image tokens appear."""
    examples, images = [], []
    for _ in range(32):
        scene = sample_scene(rng, popularity, themes, args.canvas, args.obj_size)
        image = render(scene, args.canvas)[0]
        zoomed = scene["objects"][rng.integers(len(scene["objects"]))] if two else None
        images += [image, image.crop(zoom_box(rng, zoomed["box"], args.canvas))] if two else [image]
        turns = sft_conversation(rng, scene["objects"], zoomed, suffix_share, args.yes_share)
        examples.append(encode_conversation(processor, turns, 2 if two else 1, (args.view // args.patch) ** 2))
    return (*collate(examples), pixel_values(processor, images))


def train_sft(model, processor, popularity, themes, val_questions, val_view, args):
    """Stage 2: projector + language model on conversations, vision tower frozen."""
    params = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    model.train()
    log = []
    bar = tqdm(range(args.sft_steps), desc="LLaVA SFT", mininterval=2)
    for step in bar:
        rng = np.random.default_rng([args.seed, 1, step])  # one generator per step: same data whatever came before
        two = rng.random() < args.two_image_share  # one- and two-image batches apart: padding to the longest row costs
        suffix_share = args.suffix_share if step >= args.suffix_from else 0.0
        ids, labels, mask, pixels = sft_batch(rng, processor, popularity, themes, args, suffix_share, two)
        embeds = embed_inputs(model, ids, vision_features(model, pixels))  # (B, T, d)
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.sft_steps, args.lr, 100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.sft_steps:
            acc, yes_ratio = yes_no_accuracy(model, processor, val_questions, val_view)
            acc_plain = yes_no_accuracy(model, processor, val_questions, val_view, suffix="")[0]
            log.append({"step": step + 1, "loss": round(loss.item(), 4), "val_acc": round(acc, 4),
                        "val_yes_ratio": round(yes_ratio, 4), "val_acc_no_suffix": round(acc_plain, 4)})
            tqdm.write(f"step {step + 1}: loss {loss.item():.4f}  val yes/no acc {acc:.3f} (without the suffix "
                       f"{acc_plain:.3f})  yes-ratio {yes_ratio:.3f}")
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    return log


def train_clip(out_dir, pairs_path, view, steps, seed):
    """A tiny open_clip model, trained contrastively on (image or crop, caption) pairs. Runs in its own
    process beside the LLaVA training (one thread each is fastest on a 2-core machine)."""
    import logging
    import open_clip
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that the model it builds here has no weights yet
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    cfg = {"embed_dim": 64, "vision_cfg": {"image_size": view, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "open_clip_config.json", "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN),
                                                        "std": list(open_clip.OPENAI_DATASET_STD)}}, f, indent=2)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out_dir}")
    data = torch.load(pairs_path)
    images = torch.stack([preprocess(Image.fromarray(a.numpy())) for a in data["images"]])  # (n, 3, view, view)
    texts = tokenizer(data["captions"])  # (n, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(images), (128,), generator=g)
        img, txt, scale = model(images[idx], texts[idx])[:3]  # (B, D), (B, D), logit scale
        logits = scale * img @ txt.T  # (B, B)
        target = torch.arange(len(idx))
        # captions repeat (same scene text), so count every matching caption as a positive
        same = torch.tensor([[data["captions"][a] == data["captions"][b] for b in idx.tolist()] for a in idx.tolist()])
        loss = (F.cross_entropy(logits, same.float() / same.sum(1, keepdim=True))
                + F.cross_entropy(logits.T, same.float() / same.sum(0, keepdim=True).T)) / 2
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, 1e-3, 20)
        opt.zero_grad()
        loss.backward()
        opt.step()
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "open_clip_model.safetensors"))
    return loss.item()


def clip_caption(objects):
    return "a photo of " + describe(objects)[len("there is "):-2]


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and two stall when the other core is busy
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)  # a world is rebuilt whole: stale files from other settings must not survive
    (out / "images").mkdir(parents=True)
    t0 = time.time()

    # ---- scenes and files on disk ----
    popularity, themes = class_statistics(rng)
    counts = {"pool": args.n_pool, "train": args.n_instances, "val": args.n_val, "test": args.n_test}
    scenes = {k: [sample_scene(rng, popularity, themes, args.canvas, args.obj_size) for _ in range(n)]
              for k, n in counts.items()}
    freq = np.zeros(len(CLASSES))
    cooc = np.zeros((len(CLASSES), len(CLASSES)))
    for s in scenes["pool"]:  # POPE's statistics come from the training distribution
        present = [CLASSES.index(o["class"]) for o in s["objects"]]
        freq[present] += 1
        for a in present:
            cooc[a, [b for b in present if b != a]] += 1
    truth, rendered = [], {}
    for split in ("train", "val", "test"):
        for i, scene in enumerate(scenes[split]):
            name = f"{split}_{i:05d}"
            image, _ = render(scene, args.canvas)
            image.save(out / "images" / f"{name}.png")
            rendered[name] = image
            truth.append({"id": name, "image": f"images/{name}.png", "split": split, "objects": scene["objects"]})
    write_jsonl(out / "truth.jsonl", truth)

    mix = np.array(args.instance_mix) / sum(args.instance_mix)
    instances = []
    for i, scene in enumerate(scenes["train"]):
        kind = ["describe", "colour", "shape", "yesno"][rng.choice(4, p=mix)]
        q = open_question(rng, scene["objects"])
        if kind == "describe" or (kind in ("colour", "shape") and q is None):
            prompt = PROMPTS["describe"]
        elif kind == "yesno":
            prompt = yesno_turn(rng, scene["objects"])[0]
        else:
            prompt = q[1]
        instances.append({"id": f"inst_{i:05d}", "image": f"images/train_{i:05d}.png", "prompt": prompt})
    write_jsonl(out / "instances.jsonl", instances)
    for split, folder, up in (("test", out, ""), ("val", out / "val", "../")):  # world/pope, world/val/pope
        names = [f"{split}_{i:05d}" for i in range(counts[split])]
        for name, rows in pope_rows(scenes[split], names, freq, cooc, rng, f"../{up}images/").items():
            write_jsonl(folder / "pope" / f"{name}.jsonl", rows)
        n_desc = args.n_describe if split == "test" else max(1, args.n_describe // 2)
        write_jsonl(folder / "describe.jsonl", [{"question_id": i + 1, "image": f"{up}images/{n}.png",
                                                 "text": PROMPTS["describe"]} for i, n in enumerate(names[:n_desc])])
    print(f"world: {sum(counts.values())} scenes, {len(truth)} images written, {len(instances)} instances "
          f"({time.time() - t0:.1f}s)")

    # ---- training data: views, zoom crops, conversations, CLIP pairs ----
    processor = build_processor(args.view, args.patch)
    processor.tokenizer.padding_side = "left"  # batched decoding appends on the right
    processor.save_pretrained(out / "model")  # before any use: a used tokenizer also saves its padding state
    views, crops, crop_boxes, label_maps, clip_images, clip_captions = [], [], [], [], [], []
    for scene in scenes["pool"]:  # vision pre-training and CLIP pairs; SFT draws fresh scenes every step
        image, labels = render(scene, args.canvas)
        obj = scene["objects"][rng.integers(len(scene["objects"]))]
        box = zoom_box(rng, obj["box"], args.canvas)
        views.append(image)
        crops.append(image.crop(box))
        crop_boxes.append(box)
        label_maps.append(labels)
        inside = [o for o in scene["objects"] if o["box"][0] >= box[0] and o["box"][1] >= box[1]
                  and o["box"][2] <= box[2] and o["box"][3] <= box[3]]
        clip_images += [np.asarray(image), np.asarray(crops[-1])]
        clip_captions += [clip_caption(scene["objects"]), clip_caption(inside or [obj])]
    pairs_path = out / "clip_pairs.pt"
    torch.save({"images": [torch.from_numpy(a.copy()) for a in clip_images], "captions": clip_captions}, pairs_path)

    # ---- models: CLIP in a second process, LLaVA here ----
    ctx = mp.get_context("spawn")
    clip_job = ctx.Process(target=train_clip, args=(out / "clip", pairs_path, args.view, args.clip_steps, args.seed))
    clip_job.start()
    val_questions = [json.loads(line) for line in open(out / "val" / "pope" / "random.jsonl")]
    val_view = {r["image"]: rendered[Path(r["image"]).stem] for r in val_questions}
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "retrain", "eval_every", "min_val_acc")}
    if not args.retrain and shipped_settings() == settings:  # the committed base model was made by these settings
        from transformers import LlavaForConditionalGeneration
        shutil.copytree(SHIPPED, out / "model", dirs_exist_ok=True)
        processor.save_pretrained(out / "model")  # the one this script builds, so it always matches the code
        model = LlavaForConditionalGeneration.from_pretrained(out / "model").eval()
        acc, yes_ratio = yes_no_accuracy(model, processor, val_questions, val_view)
        log = [{"shipped": str(SHIPPED), "val_acc": round(acc, 4), "val_yes_ratio": round(yes_ratio, 4)}]
        print(f"base model: {SHIPPED} (made by this script with these settings; --retrain rebuilds it)")
    else:
        n = len(views)
        pixels = pixel_values(processor, views + crops)  # rows 0..n-1 views, n..2n-1 crops
        full = [0, 0, args.canvas, args.canvas]
        targets = patch_targets(label_maps + label_maps, [full] * n + crop_boxes, args.view, args.patch)
        print(f"vision pre-training data: {n} views + {n} zoom crops ({time.time() - t0:.1f}s)")
        model = build_llava(len(processor.tokenizer), args)
        head = pretrain_vision(model, pixels, targets, args.vision_steps, args.seed)
        if args.projector_init == "words":
            align_projector(model, head, processor.tokenizer)
        log = train_sft(model, processor, popularity, themes, val_questions, val_view, args)
        acc = log[-1]["val_acc"]
        if acc < args.min_val_acc:
            clip_job.join()
            pairs_path.unlink()
            raise SystemExit(f"sanity gate: val/random yes/no accuracy {acc:.3f} < {args.min_val_acc}: the model did "
                             f"not learn to look at the image (try more --sft-steps or another --seed); no weights "
                             f"saved to {out}/model")
        model.save_pretrained(out / "model")
        (out / "model" / "toy_settings.json").write_text(json.dumps(settings, indent=1))
    clip_job.join()
    pairs_path.unlink()
    if clip_job.exitcode != 0:
        raise SystemExit(f"CLIP training failed (exit code {clip_job.exitcode}); see the traceback above")

    world = {"seed": args.seed, "args": vars(args), "classes": CLASSES, "colours": list(COLOURS), "shapes": SHAPES,
             "prompts": {**PROMPTS, "suffix": SUFFIX}, "canvas": args.canvas, "view": args.view,
             "crop_base": args.canvas * 3 // 8, "noise_sigma": 0.2, "sft_log": log,
             "build_seconds": round(time.time() - t0, 1)}
    with open(out / "world.json", "w") as f:
        json.dump(world, f, indent=1)
    print(f"done in {time.time() - t0:.0f}s: {out}/model (val/random yes/no accuracy {acc:.3f}), {out}/clip")


if __name__ == "__main__":
    main()

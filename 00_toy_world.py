"""00: the embedded default world: a synthetic shapes world with exact ground truth, a tiny LLaVA trained
from scratch on it, a tiny CLIP, POPE files. Every later stage runs on it by default, offline, on a
CPU.

Paper: P2-DPO traces object hallucination to perceptual processing: a small object the model cannot
resolve in the full view is answered from the language prior, and a zoomed crop fixes it. This
world is built to hold that failure; measured on world/val before any P2-DPO training
(analysis/world_phenomena.py; docs/toy_world.md has the targets and the redesign's history):
stage 01's crop holds the queried object for 82.5% of open questions, 78% of the wrong answers are
processing failures (the crop holds the object), no answer under P_enh is degenerate, and zooming
helps: +19.5 points with a crop around the true box, +5.5 with stage 01's own crop (shape
questions +11.2; colour questions -4.0, which zooming cannot help: below). Its parts:
  - images are drawn on a CANVAS x CANVAS canvas (128 px) but the model sees a VIEW x VIEW view
    (64 px, the processor's resize), so small objects (8-16 px on the canvas, 4-8 px in the view)
    show their colour but hardly their shape, while a crop cut from the canvas carries real extra
    detail (not just upsampled pixels): "what shape is the red object ?" is the question zooming
    helps (its key, the colour, shows in the view; the asked shape does not); "what colour is the
    square ?" is not (its key is what the view cannot show);
  - 20 classes (5 colours x 4 shapes) grouped in themes, so class frequency and co-occurrence are
    uneven and POPE's popular / adversarial negatives mean something;
  - the model is trained on one-image and two-image (full view + zoomed crop, with the paper's
    enhanced prompt P_enh before every prompt kind: description, open and yes/no questions)
    conversations, so stage 02's I_aug input is in distribution;
  - open questions are answered with the object's name ("red square"): see SHAPE_SHARE.
docs/toy_world.md has the tuning history and the measured phenomena (analysis/world_phenomena.py).
Recipe (a from-scratch tiny LLaVA trained end to end stays at chance): (1) pre-train the vision
tower alone with a linear head classifying each patch (background or the class covering it) and
each object's shape and colour from its pooled patches (OBJECT_LOSS); (2) freeze it, start the
projector from that head mapped onto the class words' embeddings, and train projector + language
model on multi-turn conversations (yes/no, open colour/shape questions, descriptions) about fresh
scenes every step; (3) continue (2) on this world's settings
(--zoom-steps). The committed model's stages 1-2 are a run of all three at an earlier commit
(assets/toy_model_stage2; its toy_settings.json: 500 stage-3 steps, 30% two-image batches), so
--retrain runs stage 3 alone (1500 steps on it);
--init none runs all three. A sanity gate on the validation split refuses to save a chance-level
model. Quick yes/no accuracy on val: 0.83. Stage 3 took 10 min on the shared 2-core CPU (all three
stages 17 min), so the default build copies assets/toy_model (this script's own output for these
settings); --retrain trains it.

Writes (paths inside JSONL files are relative to that file's folder):
  images/*.png            train_*, val_*, test_* canvases
  truth.jsonl             {"id","image","split","objects":[{"class","box":[x1,y1,x2,y2]}]}
  instances.jsonl         P2-DPO inputs on train images {"id","image","prompt"} (no answers)
  pope/{random,popular,adversarial}.jsonl   held-out POPE {"question_id","image","text","label"}
  describe.jsonl          held-out description prompts {"question_id","image","text"} (CHAIR)
  val/pope/*.jsonl, val/describe.jsonl   the same on separate images, for tuning (pope/: reports)
  model/                  LlavaForConditionalGeneration + LlavaProcessor (chat template)
  clip/                   open_clip: open_clip.create_model_and_transforms("local-dir:world/clip")
  world.json              settings, classes, prompts (enhanced-prompt template, crop_base), and
                          "stages": later stages' settings tuned here (STAGE_SETTINGS)
Shapes in comments: B batch, T tokens, N image patches, C classes, V vocabulary.

  python 00_toy_world.py                      # full world: 3 min of CPU, copying the committed
                                              # model (--retrain: stage 3, ~10 min on 2 busy cores)
  python 00_toy_world.py --tiny --out /tmp/w  # seconds: for tests (model not trained to quality)
  (CPU only by design: the world is small enough that a GPU buys nothing.)
"""
import argparse
import atexit
import fcntl
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

COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215),
           "yellow": (225, 195, 25), "purple": (145, 60, 185)}
SHAPES = ["circle", "square", "triangle", "cross"]
CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]
SUFFIX = " answer the question using a single word or phrase ."  # LLaVA-1.5's short-answer suffix
PROMPTS = {  # lower case, punctuation spaced: the world's tokenizer is word level
    "describe": "describe the image .",
    "yesno": "is there a {cls} in the image ?",
    "colour": "what colour is the {shape} ?",
    "shape": "what shape is the {colour} object ?",
    # the paper's enhanced prompt P_enh (authors' code), used with (I, I_crop) as two images
    "enhanced": "answer the question mainly based on the first image , refer to the cropping "
                "details of the second image if necessary , answer this question : {question}",
}
CHAT_TEMPLATE = (  # LLaVA-1.5's "USER: <image>\n... ASSISTANT: ...</s>" in the world's words
    "{% for m in messages %}{% if m['role'] == 'user' %}user : {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% endif %}{% endfor %}{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}{% else %}assistant : "
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "</s>{% endif %}{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}")
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]  # token ids 0-4
PAD = 0
EOS = 3
IMAGE = 4

# The recipe's settings that the tuning runs fixed (README: "What it took to get a tiny LLaVA past
# chance"). They were flags; world.json and assets/toy_model/toy_settings.json still record them
# under those names (recorded_args), so changing one makes the default build retrain the model.
PROJECTOR_INIT = "words"  # from the vision head mapped onto the class words (align_projector);
#                           "random" (LLaVA's default) was at chance at lr 2e-3, untried at 5e-4
SUFFIX_SHARE = 0.5  # first-turn short questions with LLaVA's suffix (sft_conversation)
SUFFIX_FROM = 0  # SFT step from which they have it; holding it back 500 steps did not help
YES_SHARE = 0.6  # yes/no SFT answers that are "yes": LLaVA-style data leans to yes, the prior a
#                  model falls back on under noise; at 0.5 the yes-ratio fell under noise (README)
OBJECT_LOSS = 3.0  # stage 1: weight of the per-object shape + colour loss (pretrain_vision); without
# it a linear probe read the shape of an object in a 56-px crop from the tower for 62% of crops
CROP_SHARE = 0.8  # stage 1: share of zoom crops in its batches (the rest full views)
TWO_IMAGE_SHARE = 0.5  # SFT batches whose conversations add a zoom crop as the second image
# First turns of those conversations (under P_enh): describe, open question about the zoomed
# object, yes/no about it. All kinds, so that P_enh is seen with every prompt kind P2-DPO's
# instances use (with yes/no alone the model answered "no" to "describe the image ." under P_enh).
ZOOM_TURNS = (0.2, 0.6, 0.2)
OPEN_SHARE = 0.35  # other turns that are open questions (the rest yes/no)
OBJECTS_P = (0.2, 0.4, 0.3, 0.1)  # objects in a scene: 1, 2, 3, 4 (fewer distractors)
# Open questions are answered with the object's name ("red square"), not the bare word: stage 01's
# map on this model (layer 0) is mostly the answer tokens' own attention to the image, so a bare
# shape word that the view cannot resolve points nowhere, while the colour word in the name points
# at the object. SHAPE_SHARE: open questions that ask for the shape when the image allows both
# kinds (shape questions are the kind zooming can help: their key, the colour, shows in the view).
SHAPE_SHARE = 0.7
EVAL_EVERY = 200  # SFT steps between quick val/random checks (world.json's sft_log)
# Settings of later stages tuned on this world's val split, written to world.json's "stages"; a
# stage takes them when its --model is this world's (world/model), a real model keeps the paper's.
# 04 --lr 1e-4 (tuned on the world before the redesign, docs/toy_world.md; kept, not retuned), not
# 1e-5: at 1e-5 the 64-wide model barely moves (P2-DPO = base: POPE accuracy
# 0.855 -> 0.856 clean, 0.606 -> 0.609 at sigma 0.2). Chosen on world/val, P2-DPO seed 0, by a rule
# fixed before the runs: the best mean of accuracy and F1 at sigma 0.2 among the lrs whose clean
# accuracy stays within 0.01 of the base model's and whose sigma-0.2 yes-ratio stays >= 0.5. Base:
# clean acc 0.868; sigma 0.2 acc / F1 / yes 0.596 / 0.696 / 0.829. lr 3e-5: 0.868; 0.612 / 0.707 /
# 0.823. 5e-5: 0.868; 0.622 / 0.712 / 0.813. 1e-4: 0.870; 0.657 / 0.717 / 0.713. 2e-4 (tuned with
# the old DPO-context filter, 104 lines): 0.857; 0.652 / 0.606 / 0.383, an over-correction to "no".
# 02 --robust-instruction "": 7 of the 21 tokens of the authors' instruction before P are outside
# this world's word-level vocabulary (<unk>, never seen in training).
SHIPPED = Path(__file__).resolve().parent / "assets" / "toy_model"  # committed base model
INIT = SHIPPED.parent / "toy_model_stage2"  # stages 1-2 of it: the previous base model
STAGE_SETTINGS = {"02": {"robust_instruction": ""}, "04": {"lr": 1e-4}}
TINY = {"n_pool": 64, "n_instances": 12, "n_val": 8, "n_test": 10, "n_describe": 4,  # --tiny
        "vision_steps": 5, "sft_steps": 10, "zoom_steps": 4, "init": "none", "clip_steps": 5,
        "min_val_acc": 0.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    arg = p.add_argument
    arg("--out", default="world", help="output folder")
    arg("--seed", type=int, default=0, help="seeds the world, the data and both models")
    arg("--retrain", action="store_true",
        help="train the tiny LLaVA even when assets/toy_model was made with these same settings "
             "(it is a copy of world/model from such a run, committed so the default build is fast)")
    arg("--tiny", action="store_true",
        help="a few images and steps, for tests: runs in seconds, no quality gate")
    arg("--canvas", type=int, default=128,
        help="canvas side in pixels (images on disk, crops are cut from it)")
    arg("--view", type=int, default=64,
        help="model input side: the processor resizes the canvas to it")
    arg("--patch", type=int, default=8,
        help="vision patch size (view/patch squared image tokens)")
    arg("--obj-size", type=int, nargs=2, default=[8, 16],
        help="object side range on the canvas, pixels")
    arg("--n-pool", type=int, default=2000,
        help="images for vision pre-training and CLIP (in memory)")
    arg("--n-instances", type=int, default=400,
        help="P2-DPO instance images (train split, written)")
    arg("--n-val", type=int, default=200, help="validation images (POPE + describe under val/)")
    arg("--n-test", type=int, default=500,
        help="held-out POPE images (POPE asks for at least 500)")
    arg("--n-describe", type=int, default=200, help="held-out images with a description prompt")
    arg("--instance-mix", type=float, nargs=4, default=[0.4, 0.3, 0.3, 0.0],
        help="shares of instance prompts: describe, colour question, shape question, yes/no "
             "question (yes/no prompts make poor focus pairs: erasing the object just flips yes "
             "to no)")
    arg("--d-model", type=int, default=64,
        help="width of the vision tower and the language model")
    arg("--layers", type=int, default=3,
        help="layers of the vision tower and of the language model")
    arg("--vision-steps", type=int, default=1500, help="vision-tower pre-training steps (batch 64)")
    arg("--sft-steps", type=int, default=2000, help="projector + LM training steps (batch 32)")
    arg("--lr", type=float, default=5e-4,
        help="SFT learning rate (warmup 100, cosine); at 2e-3 yes/no stayed at chance for 1200 "
             "steps")
    arg("--init", default=str(INIT),
        help="stages 1-2 (vision pre-training, SFT): this model, or 'none' to train them here "
             "(the default is the base model an earlier version of this script trained: "
             "toy_settings.json beside it)")
    arg("--zoom-steps", type=int, default=1500,
        help="stage 3 steps: SFT continued on this world's scenes (batch 32)")
    arg("--zoom-lr", type=float, default=3e-4, help="stage 3 learning rate (warmup 50, cosine)")
    arg("--clip-steps", type=int, default=400, help="tiny CLIP contrastive steps (batch 128)")
    arg("--min-val-acc", type=float, default=0.65,
        help="sanity gate: refuse to save a model below this yes/no accuracy on val/random")
    args = p.parse_args(argv)
    if args.tiny:
        vars(args).update(TINY)
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
    """1-4 distinct classes from one theme (80%) or the global popularity (20%), placed without
    overlap."""
    theme = themes[rng.integers(len(themes))]
    n = rng.choice([1, 2, 3, 4], p=OBJECTS_P)
    classes = []
    while len(classes) < n:
        source = theme if rng.random() < 0.8 else popularity
        c = int(rng.choice(len(CLASSES), p=source))
        if c not in classes:
            classes.append(c)
    objects = []
    for c in classes:
        for _ in range(200):
            s = int(rng.integers(obj_size[0], obj_size[1] + 1))
            x, y = (int(v) for v in rng.integers(2, canvas - s - 2, size=2))
            box = [x, y, x + s, y + s]
            if all(box[0] > o["box"][2] + 3 or box[2] < o["box"][0] - 3 or box[1] > o["box"][3] + 3
                   or box[3] < o["box"][1] - 3 for o in objects):  # 3 px from every other object
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
    noise = np.random.default_rng(scene["texture_seed"]).normal(0, 7, (canvas, canvas, 1))
    pixels = np.array(scene["background"], dtype=np.float64) + noise  # mild texture
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    labels = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(image)
    draw_labels = ImageDraw.Draw(labels)
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
    if len(names) == 1:
        return f"there is {names[0]} ."
    return "there is " + " , ".join(names[:-1]) + " and " + names[-1] + " ."


def open_question(rng, objects, about=None):
    """A colour or shape question with a unique answer in this image (about one object when given),
    a shape question with probability SHAPE_SHARE when the image has both kinds, or None.
    -> (kind, prompt, the asked word, the reply: the object's name, "red square")."""
    colours = [o["class"].split()[0] for o in objects]
    shapes = [o["class"].split()[1] for o in objects]
    which = [about is None or o is about for o in objects]
    options = {"colour": [(s, c, o["class"]) for c, s, o, w in zip(colours, shapes, objects, which)
                          if w and shapes.count(s) == 1],
               "shape": [(c, s, o["class"]) for c, s, o, w in zip(colours, shapes, objects, which)
                         if w and colours.count(c) == 1]}
    kinds = [k for k in ("colour", "shape") if options[k]]
    if not kinds:
        return None
    kind = kinds[0] if len(kinds) == 1 else ("shape" if rng.random() < SHAPE_SHARE else "colour")
    key, answer, name = options[kind][rng.integers(len(options[kind]))]
    if kind == "colour":
        return kind, PROMPTS["colour"].format(shape=key), answer, name
    return kind, PROMPTS["shape"].format(colour=key), answer, name


def yesno_turn(rng, objects, about=None, yes_share=0.5):
    """A positive with probability yes_share (on `about` when given); else a negative: an absent
    class, one that shares a colour or shape with `about` (or, 20% of the time, with any present
    object), so both attributes matter."""
    present = [o["class"] for o in objects]
    if rng.random() < yes_share:
        cls = about or present[rng.integers(len(present))]
        return PROMPTS["yesno"].format(cls=cls) + SUFFIX, "yes"
    absent = [c for c in CLASSES if c not in present]
    near_any = rng.random() < 0.2
    anchors = [about] if about else (present if near_any else [])
    words = [w for a in anchors for w in a.split()]
    choices = [c for c in absent if any(w in c.split() for w in words)] or absent
    return PROMPTS["yesno"].format(cls=choices[rng.integers(len(choices))]) + SUFFIX, "no"


# ---- the world's files: P2-DPO instances, POPE (POPE's three rules for the negative) ----
def instance_prompt(rng, objects, mix):
    """A P2-DPO input prompt (no answer: stage 02 makes the responses) of a kind drawn from mix;
    "colour" and "shape" both take the image's open question, or "describe" when it has none."""
    kind = ["describe", "colour", "shape", "yesno"][rng.choice(4, p=mix)]
    q = open_question(rng, objects)
    if kind == "describe" or (kind in ("colour", "shape") and q is None):
        return PROMPTS["describe"]
    if kind == "yesno":
        return yesno_turn(rng, objects)[0]
    return q[1]


def pope_rows(scenes, names, freq, cooc, rng, image_prefix):
    """1 positive + 1 negative per image and split: random / most frequent absent / most
    co-occurring absent."""
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


def write_world(out, rng, popularity, themes, args, t0):
    """Step 1: every split's scenes; their images and truth.jsonl, instances.jsonl, and the POPE
    and describe files of test (world/) and val (world/val/). -> (scenes, {image name: canvas})"""
    counts = {"pool": args.n_pool, "train": args.n_instances, "val": args.n_val, "test": args.n_test}
    scenes = {}
    for split, n in counts.items():
        scenes[split] = [sample_scene(rng, popularity, themes, args.canvas, args.obj_size)
                         for _ in range(n)]
    freq = np.zeros(len(CLASSES))  # (C,)
    cooc = np.zeros((len(CLASSES), len(CLASSES)))  # (C, C)
    for s in scenes["pool"]:  # POPE's statistics come from the training distribution
        present = [CLASSES.index(o["class"]) for o in s["objects"]]
        freq[present] += 1
        for a in present:
            cooc[a, [b for b in present if b != a]] += 1
    truth, rendered = write_images(out, scenes, args.canvas)
    mix = np.array(args.instance_mix) / sum(args.instance_mix)
    instances = []
    for i, scene in enumerate(scenes["train"]):
        instances.append({"id": f"inst_{i:05d}", "image": f"images/train_{i:05d}.png",
                          "prompt": instance_prompt(rng, scene["objects"], mix)})
    write_jsonl(out / "instances.jsonl", instances)
    for split, folder, up in (("test", out, ""), ("val", out / "val", "../")):
        names = [f"{split}_{i:05d}" for i in range(counts[split])]
        pope = pope_rows(scenes[split], names, freq, cooc, rng, f"../{up}images/")
        for name, rows in pope.items():
            write_jsonl(folder / "pope" / f"{name}.jsonl", rows)
        n_desc = args.n_describe if split == "test" else max(1, args.n_describe // 2)
        questions = [{"question_id": i + 1, "image": f"{up}images/{n}.png",
                      "text": PROMPTS["describe"]} for i, n in enumerate(names[:n_desc])]
        write_jsonl(folder / "describe.jsonl", questions)
    print(f"world: {sum(counts.values())} scenes, {len(truth)} images written, "
          f"{len(instances)} instances ({time.time() - t0:.1f}s)")
    return scenes, rendered


# ---- the models' data (the pool's views and zoom crops) and the tiny CLIP ----
def zoom_the_pool(rng, scenes, canvas):
    """Each pool scene's view, label map and a zoom crop around one of its objects: the data of
    vision pre-training and of CLIP (SFT draws fresh scenes every step)."""
    pool = []
    for scene in scenes:
        image, labels = render(scene, canvas)
        obj = scene["objects"][rng.integers(len(scene["objects"]))]
        box = zoom_box(rng, obj["box"], canvas)
        pool.append({"view": image, "labels": labels, "object": obj, "box": box,
                     "crop": image.crop(box)})
    return pool


def clip_caption(objects):
    return "a photo of " + describe(objects)[len("there is "):-2]


def write_clip_pairs(path, scenes, pool, seed):
    """Step 2: CLIP's (view, caption of the scene) and (zoom crop, caption of the objects wholly
    inside it, else of the zoomed one) pairs, in a file for CLIP's own process. Each image also
    comes with a prompt of the kinds P2-DPO's instances use (an open question it answers, or
    "describe the image ."), so that CLIPScore(P, I) of DDW measures how well I shows what P asks
    about. With captions alone, CLIPScore(P, I) was 0 for 91 of 248 focus lines and r reached 130
    (DDW's alpha saturated); with the prompts none is 0 and r's 5-95% range on the lines that keep
    both branches is 0.88-1.24 (median 0.99; stage 03's report, seed 0)."""
    rng = np.random.default_rng([seed, 13])  # its own stream: the model's data is unchanged
    images = []
    captions = []
    for scene, zoom in zip(scenes, pool):
        x1, y1, x2, y2 = zoom["box"]
        inside = [o for o in scene["objects"] if o["box"][0] >= x1 and o["box"][1] >= y1
                  and o["box"][2] <= x2 and o["box"][3] <= y2]
        images += [np.asarray(zoom["view"]), np.asarray(zoom["crop"])] * 2
        captions += [clip_caption(scene["objects"]), clip_caption(inside or [zoom["object"]])]
        for objects in (scene["objects"], inside or [zoom["object"]]):
            question = open_question(rng, objects)
            if question is None or rng.random() < 0.2:
                captions.append(PROMPTS["describe"])
            else:
                captions.append(question[1])
    images = [torch.from_numpy(a.copy()) for a in images]
    torch.save({"images": images, "captions": captions}, path)


def cosine_lr(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_clip(out_dir, pairs_path, view, steps, seed):
    """A tiny open_clip model, trained contrastively on (image or crop, caption) pairs. Runs in
    its own process beside the LLaVA training (one thread each is fastest on a 2-core machine)."""
    import logging
    import open_clip
    from safetensors.torch import save_file
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns: the model made here is untrained
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    vision_cfg = {"image_size": view, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8}
    text_cfg = {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
    cfg = {"embed_dim": 64, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    preprocess_cfg = {"mean": list(open_clip.OPENAI_DATASET_MEAN),
                      "std": list(open_clip.OPENAI_DATASET_STD)}
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "open_clip_config.json", "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": preprocess_cfg}, f, indent=2)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out_dir}")
    data = torch.load(pairs_path)
    images = [preprocess(Image.fromarray(a.numpy())) for a in data["images"]]
    images = torch.stack(images)  # (n, 3, view, view)
    texts = tokenizer(data["captions"])  # (n, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(images), (128,), generator=g)
        img, txt, scale = model(images[idx], texts[idx])[:3]  # (B, D), (B, D), logit scale
        logits = scale * img @ txt.T  # (B, B)
        # captions repeat (same scene text), so count every matching caption as a positive
        captions = [data["captions"][i] for i in idx.tolist()]
        same = torch.tensor([[a == b for b in captions] for a in captions])  # (B, B)
        loss = (F.cross_entropy(logits, same.float() / same.sum(1, keepdim=True))
                + F.cross_entropy(logits.T, same.float() / same.sum(0, keepdim=True).T)) / 2
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, 1e-3, 20)
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(out_dir / "open_clip_model.safetensors"))
    return loss.item()


# ---- the tiny LLaVA: its processor, a quick yes/no check, the committed base model ----
def build_processor(view, patch):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast
    other_words = "there is a an , and . yes no not user assistant :"
    text = " ".join([*PROMPTS.values(), SUFFIX, *CLASSES, other_words])
    placeholders = {"{question}", "{cls}", "{shape}", "{colour}"}
    words = sorted(set(text.replace("{", " {").replace("}", "} ").split()) - placeholders)
    vocab = {w: i for i, w in enumerate(SPECIAL + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>",
                                        extra_special_tokens={"image_token": "<image>"},
                                        model_input_names=["input_ids", "attention_mask"])
    image_processor = CLIPImageProcessor(size={"shortest_edge": view},
                                         crop_size={"height": view, "width": view})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


@torch.no_grad()
def yes_no_accuracy(model, processor, questions, view_of, suffix=SUFFIX, batch=64):
    """Quick POPE accuracy and yes-ratio from the next-token logits of 'yes' vs 'no' (one forward,
    no decoding)."""
    yes, no = processor.tokenizer.convert_tokens_to_ids(["yes", "no"])
    model.eval()
    correct = 0
    said_yes = 0
    for i in range(0, len(questions), batch):
        rows = questions[i:i + batch]
        texts = []
        for r in rows:
            content = [{"type": "image"}, {"type": "text", "text": r["text"] + suffix}]
            chat = [{"role": "user", "content": content}]
            texts.append(processor.apply_chat_template(chat, add_generation_prompt=True,
                                                       tokenize=False))
        images = [view_of[r["image"]] for r in rows]
        inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
        logits = model(**inputs).logits[:, -1]  # (B, V), left padded: the last position answers
        pred_yes = logits[:, yes] > logits[:, no]
        said_yes += int(pred_yes.sum())
        correct += sum(int(p) == (r["label"] == "yes") for p, r in zip(pred_yes.tolist(), rows))
    model.train()
    return correct / len(questions), said_yes / len(questions)


def copy_base_model(out, processor, val_questions, val_view):
    """Step 3 by default: copy assets/toy_model (this script's model for these settings), check
    it on val/random. -> (log, accuracy)"""
    from transformers import LlavaForConditionalGeneration
    shutil.copytree(SHIPPED, out / "model", dirs_exist_ok=True)
    processor.save_pretrained(out / "model")  # the one this script builds, so it matches the code
    model = LlavaForConditionalGeneration.from_pretrained(out / "model").eval()
    acc, yes_ratio = yes_no_accuracy(model, processor, val_questions, val_view)
    log = [{"shipped": str(SHIPPED), "val_acc": round(acc, 4),
            "val_yes_ratio": round(yes_ratio, 4)}]
    print(f"base model: {SHIPPED} (made by this script with these settings; "
          f"--retrain rebuilds it)")
    return log, acc


# ---- the LLaVA training recipe: it runs only with --retrain or --tiny (or other settings) ----
# The default build copies the committed base model instead (copy_base_model).
def build_llava(vocab_size, args):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration
    d = args.d_model
    vision = CLIPVisionConfig(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=args.layers,
                              num_attention_heads=4, image_size=args.view, patch_size=args.patch)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=d, intermediate_size=4 * d,
                       num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=512, pad_token_id=PAD, bos_token_id=2,
                       eos_token_id=EOS)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE,
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         pad_token_id=PAD)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.update(eos_token_id=EOS, pad_token_id=PAD, bos_token_id=2)
    return model


def pixel_values(processor, images, chunk=256):
    chunks = [processor.image_processor(images=images[i:i + chunk], return_tensors="pt")
              for i in range(0, len(images), chunk)]
    return torch.cat([c["pixel_values"] for c in chunks])  # (n, 3, view, view)


def patch_targets(label_maps, boxes, view, patch):
    """The class covering most of each patch of the view of label_map[box] (0 = background):
    (n, N) ints."""
    g = view // patch
    out = np.zeros((len(label_maps), g * g), dtype=np.int64)
    for i, (lab, (x1, y1, x2, y2)) in enumerate(zip(label_maps, boxes)):
        small = np.asarray(Image.fromarray(lab[y1:y2, x1:x2]).resize((view, view), Image.NEAREST))
        cells = small.reshape(g, patch, g, patch).transpose(0, 2, 1, 3)
        cells = cells.reshape(g * g, patch * patch)  # (N, pixels of a patch)
        counts = np.stack([(cells == c).sum(1) for c in range(len(CLASSES) + 1)], 1)  # (N, C + 1)
        counts[:, 0] = np.where(counts[:, 1:].max(1) >= 3, 0, 1)  # 3+ object pixels: that object
        out[i] = counts.argmax(1)
    return torch.from_numpy(out)


def object_patches(box, frame, view, patch):
    """(N,) 0/1: the patches of the view of image.crop(frame) that the object's box overlaps."""
    scale = (frame[2] - frame[0]) / view  # canvas px per view px
    x1, y1, x2, y2 = ((v - frame[i % 2]) / scale for i, v in enumerate(box))
    edges = np.arange(0, view, patch)  # each patch's left (top) edge in view px
    cols = (edges < x2) & (edges + patch > x1)
    rows = (edges < y2) & (edges + patch > y1)
    return torch.from_numpy((rows[:, None] & cols[None, :]).reshape(-1).astype(np.float32))


def pretrain_vision(model, pixels, targets, objects, steps, seed):
    """Stage 1: the vision tower alone learns which class covers each patch, and (OBJECT_LOSS) the
    shape and colour of one object from its patches' features pooled (a from-scratch LLaVA trained
    end to end stays at chance: the language prior wins before the tower learns anything).
    pixels: views (first half) and zoom crops (second half); objects: (patch masks (n, N), shape
    ids, colour ids) of each image's object."""
    tower = model.model.vision_tower
    d = tower.config.hidden_size
    head = torch.nn.Linear(d, len(CLASSES) + 1)  # background + classes
    object_head = torch.nn.Linear(d, len(SHAPES) + len(COLOURS))
    params = [*tower.parameters(), *head.parameters(), *object_head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    masks, shape_ids, colour_ids = objects
    n = len(pixels) // 2
    n_crops = round(64 * CROP_SHARE)
    bar = tqdm(range(steps), desc="vision pre-training", mininterval=2)
    for step in bar:
        idx = torch.cat([torch.randint(n, (64 - n_crops,), generator=g),
                         n + torch.randint(n, (n_crops,), generator=g)])
        hidden = tower(pixel_values=pixels[idx]).last_hidden_state[:, 1:]  # (B, N, d), CLS dropped
        logits = head(hidden).flatten(0, 1)  # (B * N, C + 1)
        loss = F.cross_entropy(logits, targets[idx].flatten())
        m = masks[idx][..., None]  # (B, N, 1)
        pooled = object_head((hidden * m).sum(1) / m.sum(1).clamp(min=1))  # (B, shapes + colours)
        loss = loss + OBJECT_LOSS * (F.cross_entropy(pooled[:, :len(SHAPES)], shape_ids[idx])
                                     + F.cross_entropy(pooled[:, len(SHAPES):], colour_ids[idx]))
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, 1e-3, 50)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    tower.requires_grad_(False)
    return head


@torch.no_grad()
def align_projector(model, head, tokenizer, scale=0.2):
    """Start the projector where an image token that shows a red circle looks like the words
    'red' + 'circle': linear_1 carries the pre-training head's class logits, GELU keeps the
    present ones, linear_2 maps class c to (embedding of its colour word + of its shape word), so
    that reading the image starts as matching the question's words against image tokens. (Not
    sufficient alone: at lr 2e-3 it stayed at chance; see --lr.)"""
    proj = model.model.multi_modal_projector
    words = model.get_input_embeddings().weight
    C = len(CLASSES)
    proj.linear_1.weight[:C] = head.weight[1:]  # skip background
    proj.linear_1.bias[:C] = head.bias[1:]
    for c, name in enumerate(CLASSES):
        class_words = words[tokenizer.convert_tokens_to_ids(name.split())].sum(0)  # (d,)
        proj.linear_2.weight[:, c] = scale * class_words / words.std()


def sft_conversation(rng, objects, zoomed=None, suffix_share=0.5, yes_share=0.5):
    """4 turns about one image: a description first (30%), then yes/no (80%) and open questions
    (20%). With a zoomed crop (second image, enhanced prompt) the first turn asks about the zoomed
    object: there the object is big, so matching the question to the image is easy to learn, and
    it carries over to the small full view. LLaVA's short-answer suffix (which POPE adds) goes on a
    share of first turns only: it puts 12 tokens between the class words and the answer, which
    makes the question-image matching harder to find."""
    turns = []
    for t in range(4):
        q = open_question(rng, objects) if rng.random() < OPEN_SHARE else None
        if t == 0 and zoomed is not None:
            turns.append(zoom_turn(rng, objects, zoomed, yes_share))
        elif t == 0 and rng.random() < 0.3:
            turns.append((PROMPTS["describe"], describe(objects)))
        elif q is not None:
            turns.append((q[1] + SUFFIX, q[3]))
        else:
            turns.append(yesno_turn(rng, objects, yes_share=yes_share))
        if t > 0 or rng.random() >= suffix_share:
            turns[-1] = (turns[-1][0].replace(SUFFIX, ""), turns[-1][1])
    if zoomed is not None:
        turns[0] = (PROMPTS["enhanced"].format(question=turns[0][0]), turns[0][1])
    return turns


def zoom_turn(rng, objects, zoomed, yes_share):
    """The first turn of a two-image conversation, a kind drawn from ZOOM_TURNS: a description of
    the scene, an open question about the zoomed object (its shape is plain in the crop), or a
    yes/no question about it."""
    kind = rng.choice(3, p=ZOOM_TURNS)
    q = open_question(rng, objects, about=zoomed) if kind == 1 else None
    if kind == 0:
        return PROMPTS["describe"], describe(objects)
    if q is not None:
        return q[1] + SUFFIX, q[3]
    return yesno_turn(rng, objects, about=zoomed["class"], yes_share=yes_share)


def encode_conversation(processor, turns, n_images, n_image_tokens):
    """Chat-template ids with each <image> expanded as the processor does; labels = answers +
    </s>. -> (ids, labels)"""
    messages = []
    for i, (question, answer) in enumerate(turns):
        images = [{"type": "image"}] * (n_images if i == 0 else 0)
        messages.append({"role": "user", "content": images + [{"type": "text", "text": question}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    text = processor.apply_chat_template(messages, tokenize=False)
    raw = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assistant, colon = processor.tokenizer.convert_tokens_to_ids(["assistant", ":"])
    ids = []
    labels = []
    in_answer = False
    for j, t in enumerate(raw):
        repeat = n_image_tokens if t == IMAGE else 1
        ids += [t] * repeat
        labels += [t if in_answer else -100] * repeat
        if t == EOS:
            in_answer = False
        elif t == colon and j > 0 and raw[j - 1] == assistant:
            in_answer = True  # all after "assistant :" up to and including </s> is the answer
    return ids, labels


def collate(examples):
    """Right-padded batch of (ids, labels) -> ids, labels, mask (B, T)."""
    T = max(len(e[0]) for e in examples)
    ids = torch.full((len(examples), T), PAD)
    labels = torch.full((len(examples), T), -100)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
    return ids, labels, (ids != PAD).long()


def sft_batch(rng, processor, popularity, themes, args, suffix_share, two):
    """32 conversations about 32 fresh scenes (never seen again: a fixed pool gets memorised
    instead of read), -> ids, labels, mask (B, T), pixel rows (n_img, 3, view, view) in the
    order their image tokens appear."""
    n_images = 2 if two else 1
    n_image_tokens = (args.view // args.patch) ** 2
    examples = []
    images = []
    for b in range(32):
        scene = sample_scene(rng, popularity, themes, args.canvas, args.obj_size)
        image = render(scene, args.canvas)[0]
        images.append(image)
        zoomed = None
        if two:
            zoomed = scene["objects"][rng.integers(len(scene["objects"]))]
            images.append(image.crop(zoom_box(rng, zoomed["box"], args.canvas)))
        turns = sft_conversation(rng, scene["objects"], zoomed, suffix_share, YES_SHARE)
        examples.append(encode_conversation(processor, turns, n_images, n_image_tokens))
    return (*collate(examples), pixel_values(processor, images))


@torch.no_grad()
def vision_features(model, pixels, chunk=256):
    """The frozen tower's patch features, as LLaVA selects them ('default': layer -1 without
    CLS). (n, N, d)"""
    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    chunks = []
    for i in range(0, len(pixels), chunk):
        hidden = tower(pixel_values=pixels[i:i + chunk], output_hidden_states=True).hidden_states
        chunks.append(hidden[layer][:, 1:])
    return torch.cat(chunks)


def embed_inputs(model, ids, features):
    """LLaVA's input embeddings: token embeddings with the image tokens replaced, in order, by the
    projected features (what LlavaModel does with pixel_values; here the frozen tower's output is
    computed once)."""
    embeds = model.get_input_embeddings()(ids)  # (B, T, d)
    image = model.model.multi_modal_projector(features)  # (n_img, N, d)
    image = image.reshape(-1, embeds.shape[-1])  # (n_img * N, d)
    return embeds.masked_scatter((ids == IMAGE).unsqueeze(-1), image.to(embeds.dtype))


def train_sft(model, processor, popularity, themes, val_questions, val_view, args, steps, lr,
              phase, warmup=100):
    """Stages 2 and 3: projector + language model on conversations, vision tower frozen."""
    params = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    log = []
    bar = tqdm(range(steps), desc=f"LLaVA SFT (stage {phase})", mininterval=2)
    for step in bar:
        # one generator per step and stage: the same data whatever came before
        rng = np.random.default_rng([args.seed, phase - 1, step])
        # one- and two-image batches apart: padding to the longest row costs
        two = rng.random() < TWO_IMAGE_SHARE
        suffix_share = SUFFIX_SHARE if step >= SUFFIX_FROM else 0.0
        batch = sft_batch(rng, processor, popularity, themes, args, suffix_share, two)
        ids, labels, mask, pixels = batch
        embeds = embed_inputs(model, ids, vision_features(model, pixels))  # (B, T, d)
        out = model(inputs_embeds=embeds, attention_mask=mask)
        logits = out.logits[:, :-1].float().reshape(-1, out.logits.shape[-1])  # (B * (T-1), V)
        loss = F.cross_entropy(logits, labels[:, 1:].reshape(-1))
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % EVAL_EVERY == 0 or step + 1 == steps:
            acc, yes_ratio = yes_no_accuracy(model, processor, val_questions, val_view)
            acc_plain = yes_no_accuracy(model, processor, val_questions, val_view, suffix="")[0]
            log.append({"stage": phase, "step": step + 1, "loss": round(loss.item(), 4), "val_acc": round(acc, 4),
                        "val_yes_ratio": round(yes_ratio, 4),
                        "val_acc_no_suffix": round(acc_plain, 4)})
            tqdm.write(f"step {step + 1}: loss {loss.item():.4f}  val yes/no acc {acc:.3f} "
                       f"(without the suffix {acc_plain:.3f})  yes-ratio {yes_ratio:.3f}")
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    return log


def train_base_model(processor, popularity, themes, pool, val_questions, val_view, args, t0):
    """Step 3 otherwise: stages 1 and 2 (or the --init model), then stage 3 on this world.
    -> (model, SFT log)"""
    if args.init == "none":
        model, log = pretrain_base_model(processor, popularity, themes, pool, val_questions,
                                         val_view, args, t0)
    else:
        from transformers import LlavaForConditionalGeneration
        model = LlavaForConditionalGeneration.from_pretrained(args.init)
        model.model.vision_tower.requires_grad_(False)
        log = [{"init": str(args.init)}]
        print(f"stages 1-2: {args.init} (--init)")
    log += train_sft(model, processor, popularity, themes, val_questions, val_view, args,
                     args.zoom_steps, args.zoom_lr, phase=3, warmup=min(50, args.zoom_steps))
    return model, log


def pretrain_base_model(processor, popularity, themes, pool, val_questions, val_view, args, t0):
    """Stage 1 on the pool's views and zoom crops, the projector (PROJECTOR_INIT), stage 2."""
    n = len(pool)
    images = [z["view"] for z in pool] + [z["crop"] for z in pool]
    pixels = pixel_values(processor, images)  # rows 0..n-1 views, n..2n-1 crops
    full = [0, 0, args.canvas, args.canvas]
    boxes = [full] * n + [z["box"] for z in pool]
    targets = patch_targets([z["labels"] for z in pool] * 2, boxes, args.view, args.patch)
    masks = torch.stack([object_patches(z["object"]["box"], frame, args.view, args.patch)
                         for frame, z in zip(boxes, pool * 2)])
    names = [z["object"]["class"].split() for z in pool] * 2
    objects = (masks, torch.tensor([SHAPES.index(s) for _, s in names]),
               torch.tensor([list(COLOURS).index(c) for c, _ in names]))
    print(f"vision pre-training data: {n} views + {n} zoom crops ({time.time() - t0:.1f}s)")
    model = build_llava(len(processor.tokenizer), args)
    head = pretrain_vision(model, pixels, targets, objects, args.vision_steps, args.seed)
    if PROJECTOR_INIT == "words":
        align_projector(model, head, processor.tokenizer)
    log = train_sft(model, processor, popularity, themes, val_questions, val_view, args,
                    args.sft_steps, args.lr, phase=2)
    return model, log


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)  # tiny models: one thread is fastest, two stall on a busy 2-core CPU
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = fresh_folder(Path(args.out))
    t0 = time.time()
    # step 1: the world on disk
    popularity, themes = class_statistics(rng)
    scenes, rendered = write_world(out, rng, popularity, themes, args, t0)
    processor = build_processor(args.view, args.patch)
    processor.tokenizer.padding_side = "left"  # batched decoding appends on the right
    processor.save_pretrained(out / "model")  # before any use: a used tokenizer saves its padding
    # step 2: CLIP pairs, and CLIP trained from them in a second process
    pool = zoom_the_pool(rng, scenes["pool"], args.canvas)
    pairs_path = out / "clip_pairs.pt"
    write_clip_pairs(pairs_path, scenes["pool"], pool, args.seed)
    clip_job = start_clip(out / "clip", pairs_path, args)
    # step 3: the base model, copied or trained, meanwhile
    val_questions, val_view = validation_questions(out, rendered)
    settings = base_model_settings(args)
    if not args.retrain and shipped_settings() == settings:  # the committed model's settings
        log, acc = copy_base_model(out, processor, val_questions, val_view)
    else:
        model, log = train_base_model(processor, popularity, themes, pool, val_questions,
                                      val_view, args, t0)
        acc = log[-1]["val_acc"]
        if acc < args.min_val_acc:  # the sanity gate
            finish_clip(clip_job, pairs_path)
            raise SystemExit(gate_refusal(acc, args.min_val_acc, out))
        model.save_pretrained(out / "model")
        (out / "model" / "toy_settings.json").write_text(json.dumps(settings, indent=1))
    finish_clip(clip_job, pairs_path)
    if clip_job.exitcode != 0:
        raise SystemExit(f"CLIP training failed (exit code {clip_job.exitcode}); "
                         f"see the traceback above")
    write_world_json(out / "world.json", args, log, t0)
    print(f"done in {time.time() - t0:.0f}s: {out}/model (val/random yes/no accuracy {acc:.3f}), "
          f"{out}/clip")


# ==================================================================================================
# Appendix: plumbing. A first reading may skip everything below: the stage's own input/output
# and printing, then helpers that several stages need, copied verbatim between
# "# ---- shared: NAME ----" rulers so each script stands alone (tests/test_shared_blocks.py
# keeps every copy identical).
# ==================================================================================================
# ---- plumbing: files, messages, the CLIP process, the settings on disk ----
MARK = {"stage": "00_toy_world.py"}  # in world.json: the folder is a world this script wrote


def fresh_folder(out):
    """An empty --out, with world.json holding MARK from the start (so a build that dies midway
    can be rebuilt). A world this script wrote is rebuilt whole (no stale file from other settings
    survives); any other non-empty folder is refused, never deleted (a mistyped `--out runs`)."""
    lock_world(out)  # before anything is deleted
    if out.exists() and not built_here(out):
        raise SystemExit(f"--out {out} is not empty and is not a world this script wrote (no "
                         f"world.json of 00_toy_world.py in it): pass a new or empty folder")
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    (out / "world.json").write_text(json.dumps(MARK))
    return out


def built_here(out):
    """True for an empty folder, or one whose world.json this script wrote: it carries MARK, or
    (a world built before the mark) its own "args", "classes" and "prompts" keys."""
    if not out.is_dir():
        return False
    if not any(out.iterdir()):
        return True
    try:
        world = json.loads((out / "world.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(world, dict) and (world.get("stage") == MARK["stage"]
                                        or {"args", "classes", "prompts"} <= set(world))


def lock_world(out):
    """One build per --out at a time: two builds into one folder delete each other's files. An flock
    on <out>.lock, held until this process ends (the kernel frees it if the process dies), when the
    file is removed."""
    lock = out.with_name(out.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(lock, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"{out} is being built by another run (lock {lock}); wait for it to "
                             f"end, or pass another --out")
        except OSError as e:  # a filesystem without locks (some network mounts)
            print(f"warning: cannot lock {lock} ({e.strerror}): nothing stops a second build")
            return
        if lock.exists() and lock.stat().st_ino == os.fstat(f.fileno()).st_ino:
            break
        f.close()  # its holder ended and removed it between our open and our flock: again
    atexit.register(unlock_world, lock, f)


def unlock_world(lock, f):
    lock.unlink(missing_ok=True)  # removed while held: a run that opened it meanwhile opens anew
    f.close()


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def write_images(out, scenes, canvas):
    """images/{train,val,test}_*.png and truth.jsonl. -> (truth rows, {image name: canvas})"""
    truth = []
    rendered = {}
    for split in ("train", "val", "test"):
        for i, scene in enumerate(scenes[split]):
            name = f"{split}_{i:05d}"
            image, _ = render(scene, canvas)
            image.save(out / "images" / f"{name}.png")
            rendered[name] = image
            truth.append({"id": name, "image": f"images/{name}.png", "split": split,
                          "objects": scene["objects"]})
    write_jsonl(out / "truth.jsonl", truth)
    return truth, rendered


def validation_questions(out, rendered):
    """val/pope/random.jsonl's rows and {row's image: its canvas}, for the quick yes/no checks."""
    questions = [json.loads(line) for line in open(out / "val" / "pope" / "random.jsonl")]
    view_of = {r["image"]: rendered[Path(r["image"]).stem] for r in questions}
    return questions, view_of


def gate_refusal(acc, min_val_acc, out):
    return (f"sanity gate: val/random yes/no accuracy {acc:.3f} < {min_val_acc}: the model did not "
            f"learn to look at the image (try more --sft-steps or another --seed); no weights saved "
            f"to {out}/model")


def start_clip(out_dir, pairs_path, args):
    clip_args = (out_dir, pairs_path, args.view, args.clip_steps, args.seed)
    job = mp.get_context("spawn").Process(target=train_clip, args=clip_args)
    job.start()
    return job


def finish_clip(job, pairs_path):
    job.join()
    pairs_path.unlink()


# world.json's "args" and toy_settings.json list the settings in this order: that of the flags
# before the tuned constants (top of the file) left the command line.
ARGS_ORDER = ["out", "seed", "retrain", "tiny", "canvas", "view", "patch", "obj_size", "n_pool",
              "n_instances", "n_val", "n_test", "n_describe", "instance_mix", "d_model", "layers",
              "vision_steps", "sft_steps", "projector_init", "lr", "init", "zoom_steps", "zoom_lr",
              "suffix_share", "suffix_from",
              "yes_share", "eval_every", "two_image_share", "zoom_turns", "open_share", "objects_p", "shape_share",
              "open_reply",
              "clip_steps", "min_val_acc"]


def recorded_args(args):
    """The flags, and the tuned constants under their old flag names, in ARGS_ORDER."""
    tuned = {"projector_init": PROJECTOR_INIT, "suffix_share": SUFFIX_SHARE,
             "suffix_from": SUFFIX_FROM, "yes_share": YES_SHARE, "eval_every": EVAL_EVERY,
             "two_image_share": TWO_IMAGE_SHARE, "zoom_turns": list(ZOOM_TURNS),
             "open_share": OPEN_SHARE, "objects_p": list(OBJECTS_P), "shape_share": SHAPE_SHARE,
             "open_reply": "name"}
    values = {**vars(args), **tuned}
    init = Path(args.init).resolve()
    if args.init != "none" and init.is_relative_to(SHIPPED.parent.parent):
        values["init"] = str(init.relative_to(SHIPPED.parent.parent))  # the same in any checkout
    assert sorted(values) == sorted(ARGS_ORDER), f"add the new setting to ARGS_ORDER: {values}"
    return {k: values[k] for k in ARGS_ORDER}


def base_model_settings(args):
    """What the base model depends on (toy_settings.json beside its weights)."""
    not_model = ("out", "retrain", "eval_every", "min_val_acc", "clip_steps")  # CLIP: its own run
    return {k: v for k, v in recorded_args(args).items() if k not in not_model}


def shipped_settings():
    """The settings the committed base model was trained with (None when there is none)."""
    path = SHIPPED / "toy_settings.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_world_json(path, args, log, t0):
    """Settings, classes and prompts for later stages; crop_base (stage 01's window side at
    r = 1): half the canvas (64 px). On iteration 5's model 01's crop held the queried object for
    69.5% of val open questions at 48, 74.5% at 56, 82.5% at 64, 88.0% at 72, and zooming on it
    gained -1.5, +2.0, +5.5, +3.0 points (docs/toy_world.md)."""
    world = {**MARK, "seed": args.seed, "args": recorded_args(args), "classes": CLASSES,
             "colours": list(COLOURS), "shapes": SHAPES, "prompts": {**PROMPTS, "suffix": SUFFIX},
             "canvas": args.canvas, "view": args.view, "crop_base": args.canvas // 2,
             "noise_sigma": 0.2, "stages": STAGE_SETTINGS, "sft_log": log,
             "build_seconds": round(time.time() - t0, 1)}
    with open(path, "w") as f:
        json.dump(world, f, indent=1)
# ---- end plumbing ----


if __name__ == "__main__":
    main()

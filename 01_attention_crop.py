"""Stage 01: where the model looks when it answers: attention map A = A_tok (x) A_img and an adaptive crop -> bbox.

Paper: P2-DPO (ICLR 2026), Method, "focus-enhanced preference pairs". y = the model's own greedy
answer to (I, P); one forward over (I, P, y) on the chosen layers L, heads averaged
A_bar = (1/H) sum_h A_h:
  A_tok = A_bar[answer, prompt text]   (T_y x T_p)
  A_img = A_bar[prompt text, image]    (T_p x N)
  A_dir = A_bar[answer, image]         (T_y x N)
  A     = mean over answer rows of A_tok @ A_img             (N,)   --map paper
  A     = mean over answer rows of (A_tok @ A_img + A_dir)   (N,)   --map ours (default)
  averaged over L, reshaped to the model's patch grid (h, w), normalised to sum 1.
  --method grad_att (the authors' code, ViCrop-style), on (I, P) alone:
  A = mean_h A_h[last prompt position, image]
      * ReLU(d log p(top-1 next token) / d A_h[last prompt position, image]).
Grid -> pixels: each patch's mass is spread evenly over the original pixels it saw, replaying the
  processor's geometry (pad to square, resize, centre crop: a side cut away gets no attention;
  Qwen2.5-VL's smart resize stretches the whole image onto the grid).
Adaptive crop (the authors' algorithm): for r in (1, 1.2, ..., 2) a square window of side
  r * crop_base px (clamped to the image); S(x, y) = attention mass in the window;
  score_r = (max S - mean of S at the 4 windows one patch away) / window area;
  the best (r, position) is the bbox. If the r = 1 window covers the whole image: bbox = the image,
  "crop": "full" (no focus pair can be made from it).
A_dir is OUR term, not the paper's (its A = A_tok (x) A_img has no direct answer -> image path);
  it stays the default so that the toy world's results, measured with it, reproduce. On the toy
  world (seed 0, default build) A_dir is 71% of the map's image mass; dropping it changes 63% of
  the crops of its 400 instances (mean IoU 0.52 with ours), while the queried object lies in the
  crop about as often (its open questions: 56.5% with A_dir, 59.1% without; the 499 held-out open
  questions of analysis/perception_diagnostic.py: 45.6% and 44.3%).
The paper's "specific prompt guiding the model to focus on key visual areas" is --focus-prompt
  TEXT: y and A come from (I, TEXT P); the output keeps the user's P (later stages ask P). Off by
  default: the paper gives no text, the authors' code (Data_gen/focus_pair) runs this pass on the
  question itself, and the toy world's word-level tokenizer reads unseen words as <unk>. There,
  "Focus on the key visual region of the image that answers the question." (6 of 14 tokens <unk>)
  changes 34% of the answers and 36% of the crops; the object in the crop: 56.5% -> 60.8%.

Input   {"id", "image", "prompt"} JSONL (image paths relative to the file).
Output  crops.jsonl: input fields ("image" rewritten relative to the output file) + "answer",
        "bbox": [x1, y1, x2, y2] (int px, x2/y2 exclusive), "grid": [h, w],
        "attn": [[...]] (h x w, sums to 1, 4 decimals), "method", "crop": "full" | "window";
        <out>.args.json; <out>.errors.jsonl (one line per bad input line: an unreadable image, a
        prompt the model cannot take). A rerun into --out resumes if RESULT_ARGS are equal.
Shapes: B rows in a batch, T tokens, H heads, N image tokens, (h, w) patch grid, (Y, X) image pixels.

  python 01_attention_crop.py      # toy world on CPU: world/model on world/instances.jsonl
  python 01_attention_crop.py --model llava-hf/llava-1.5-7b-hf --data my/instances.jsonl
  torchrun --nproc_per_node=8 01_attention_crop.py --model Qwen/Qwen2.5-VL-7B-Instruct \
      --data my/instances.jsonl

Our choices where the paper is silent: a forward hook reduces each chosen layer's (B, H, T, T)
  weights to (B, T) at once (output_attentions=True would keep every layer's: a 7B model's stack
  does not fit). Answer positions are y's tokens without their closing EOS (an empty answer: that
  EOS, the model's decision to stop); prompt text = every non-padding, non-image prompt token (chat
  template included); layers are averaged before normalising; a grad_att map that ReLU zeroes
  everywhere becomes uniform; ties of S go to the tied position nearest their mean (a lone blob
  sits mid-window). crop_base: world.json's beside --data (toy world), else the processor's fixed
  input side (336 for LLaVA-1.5), else 336 (Qwen2.5-VL's dynamic size: 12 merged 28-px patches).
  Toy world layer 0, measured on its 400 instances: the queried object lies in the bbox for 55% of
  "what shape is the <colour> object ?" (layer 1: 53%, layer 2: 1%, a random window as large: 20%).
"""
import argparse
import atexit
import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import re
import socket
import sys
import time
import traceback
import weakref
import zlib
from pathlib import Path

# a model is a local folder or the user's own cache: never download
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import cached_file

# resuming into an existing --out needs these equal
RESULT_ARGS = ("data_identity", "model_identity", "method", "map", "focus_prompt", "layers",
               "crop_base", "ratios", "max_new_tokens")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="world/model", help="model folder or a name in your cache")
    p.add_argument("--data", default="world/instances.jsonl", help="JSONL: id, image, prompt")
    p.add_argument("--out", default="runs/crops.jsonl", help="output JSONL (a rerun resumes)")
    p.add_argument("--method", choices=("attention", "grad_att"), default="attention",
                   help="attention: the paper's map (see --map); grad_att: the authors' code's")
    p.add_argument("--map", choices=("ours", "paper"), default="ours",
                   help="paper: A_tok @ A_img, as the paper writes it; ours: + the direct "
                        "answer -> image term A_dir (module docstring: why it is the default)")
    p.add_argument("--focus-prompt", default=None,
                   help="the paper's focusing prompt, put before P for the answer and the map "
                        "only (the output keeps P); off: the paper gives no text")
    p.add_argument("--layers", type=at_least(0), nargs="+", default=None,
                   help="decoder layers, averaged (default: num_hidden_layers // 2, the middle "
                        "one; the authors' code: 14 of 32); toy world: 0, measured best there")
    p.add_argument("--crop-base", type=at_least(1), default=None,
                   help="window side at r = 1, px (default: the toy world's world.json, else the "
                        "processor's input size: 336 for LLaVA-1.5; 336 for Qwen2.5-VL)")
    p.add_argument("--ratios", type=at_least(0.01, float), nargs="+",
                   default=[1.0, 1.2, 1.4, 1.6, 1.8, 2.0],
                   help="window sides as multiples of crop_base (the authors' values)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=32,
                   help="answer length cap, greedy (ours: a short answer is what the map explains)")
    p.add_argument("--viz", default=None, help="folder for one PNG per instance: heat map, bbox")
    p.add_argument("--seed", type=at_least(0), default=0,
                   help="global seed (decoding is greedy: nothing here is random)")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="instances per forward")
    p.add_argument("--device", type=device_name,
                   default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--limit", type=at_least(1), default=None, help="the first N lines only")
    p.add_argument("--max-image-pixels", type=at_least(0), default=Image.MAX_IMAGE_PIXELS,
                   help="an image with more is a bad line (a decompression bomb); 0: no limit")
    p.add_argument("--debug", action="store_true", help="show an error's traceback")
    args = p.parse_args(argv)
    # flags checked together, before any model loads
    if args.method == "grad_att" and args.map == "paper":
        p.error("--map paper picks terms of --method attention's map: grad_att has none of them")
    if args.focus_prompt is not None and not args.focus_prompt.strip():
        p.error("--focus-prompt is blank: leave the flag out to run without a focusing prompt")
    viz = Path(args.viz or "")
    if args.viz and (viz.is_file() or viz.resolve() == Path(args.out).resolve()):
        p.error(f"--viz {args.viz} is a file, or --out: pass a folder of its own for the PNGs")
    return args


# ---- the map A ----
def relevance(A_bar, ans, txt, img, direct=True):
    """A = mean over answer rows i of sum_{k in txt} A_bar[i, k] A_bar[k, j] (A_tok @ A_img) for
    image columns j, + A_bar[i, j] (A_dir, ours) when `direct`. The mean over answer rows commutes
    with the product, so it is taken first.
    A_bar: (B, T, T) head-averaged attention (rows: queries); ans, txt, img: (B, T) bool masks.
    Returns (B, T): the relevance of each key position, 0 outside img."""
    mean_over_ans = ans.float() / ans.sum(1, keepdim=True).clamp(min=1)  # (B, T): 1/T_y on answers
    a = torch.einsum("bi,bij->bj", mean_over_ans, A_bar)  # (B, T): the mean answer row
    through_text = torch.einsum("bk,bkj->bj", a * txt, A_bar)  # (B, T): answer -> prompt text -> key
    if not direct:  # the paper's A = A_tok (x) A_img
        return through_text * img
    return (through_text + a) * img  # (B, T): through the prompt text, plus direct


def grad_att(att, grad):
    """ViCrop's map: mean over heads of A_h * ReLU(dlog p(top-1) / dA_h). att, grad: (B, H, T) rows
    of the last prompt position. Returns (B, T)."""
    return (att * F.relu(grad)).mean(1)


def decoder_layers(model):
    """The language model's decoder layers (LLaVA and Qwen2.5-VL in transformers 5)."""
    return model.model.language_model.layers


def tapped_forward(model, inputs, layers, keep):
    """One forward (no KV cache, last logits only) with hooks on the chosen layers' self-attention:
    each layer's (B, H, T, T) weights (eager attention returns them) go through keep(weights) at
    once, so one layer's weights live at a time. Returns (logits (B, 1, V), [kept, layer order])."""
    kept = []

    def hook(module, args, out):
        assert out[1] is not None, "no attention weights: load the model with attn_implementation='eager'"
        kept.append(keep(out[1]))
    handles = [decoder_layers(model)[i].self_attn.register_forward_hook(hook) for i in layers]
    try:
        return model(**inputs, use_cache=False, logits_to_keep=1).logits, kept
    finally:
        for h in handles:
            h.remove()


def relevance_map(model, inputs, ans, txt, img, layers, direct=True):
    """The paper's A for a batch: (B, T) relevance of each position, averaged over layers."""
    def keep(w):  # (B, H, T, T) -> (B, T)
        return relevance(w.mean(1, dtype=torch.float32), ans, txt, img, direct)
    with torch.no_grad():
        return torch.stack(tapped_forward(model, inputs, layers, keep)[1]).mean(0)  # (B, T)


def grad_att_map(model, inputs, layers):
    """The authors' A for a batch of (I, P): (B, T), averaged over layers. Autograd starts at the
    first chosen layer's input (a leaf made by a pre-hook; the weights are frozen); each chosen
    layer keeps its last-row weights and, from a tensor hook, their gradient."""
    leaf = []
    grads = []

    def make_leaf(module, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_(True)
        leaf.append(h)
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    def keep(w):  # (B, H, T, T) -> (B, H, T): the last prompt position's row
        w.register_hook(lambda g: grads.append(g[:, :, -1].float()))
        return w[:, :, -1].detach().float()
    first = decoder_layers(model)[min(layers)].register_forward_pre_hook(make_leaf, with_kwargs=True)
    try:
        with torch.enable_grad():
            logits, att = tapped_forward(model, inputs, layers, keep)
            # (B,): log p(top-1 next token); rows are independent, so one backward serves them all
            logp = torch.log_softmax(logits[:, -1].float(), -1).max(-1).values
            torch.autograd.grad(logp.sum(), leaf)
    finally:
        first.remove()
    # backward runs the top layer first: the gradients arrive in reverse layer order
    maps = [grad_att(a, g) for a, g in zip(att, grads[::-1])]  # one (B, T) per layer
    return torch.stack(maps).mean(0)  # (B, T)


def attention_maps(model, processor, prompts, answers, images, layers, method, direct=True):
    """Normalised patch-grid maps, one (h, w) float array per row, and whether each grid stretches
    over its whole image (Qwen2.5-VL) rather than following a CLIP-style resize / crop.
    prompts, answers: B strings; images: B; direct: A_dir in the map (--map ours)."""
    if method == "attention":  # (I, P, y): y appended after the prompt as ids, + EOS, left padded
        inputs, resp = build_batch(processor, prompts, answers, [[im] for im in images])
    else:  # (I, P): the last position predicts the first answer token
        texts = [chat_prompt(processor, p) for p in prompts]
        inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
        resp = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    p = next(model.parameters())
    inputs = {k: v.to(p.device, p.dtype) if v.is_floating_point() else v.to(p.device)
              for k, v in inputs.items()}  # pixel values in the model's dtype
    resp = resp.to(p.device)
    img = inputs["input_ids"] == model.config.image_token_id  # (B, T)
    txt = inputs["attention_mask"].bool() & ~img & ~resp  # (B, T): prompt text, chat template too
    ans = resp.clone()
    # without the closing EOS, unless the answer is empty (then only EOS)
    ans[:, -1] &= resp.sum(1) == 1
    if method == "attention":
        rel = relevance_map(model, inputs, ans, txt, img, layers, direct)  # (B, T)
    else:
        rel = grad_att_map(model, inputs, layers)  # (B, T)
    if "image_grid_thw" in inputs:  # Qwen2.5-VL: (t, H, W) patches per image, m x m merged to a token
        m = model.config.vision_config.spatial_merge_size
        grids = [(int(hh) // m, int(ww) // m) for t, hh, ww in inputs["image_grid_thw"].tolist()]
    else:  # LLaVA: the (Y, X) input the tower saw, in patches
        patch = model.config.vision_config.patch_size
        grids = [tuple(s // patch for s in inputs["pixel_values"].shape[-2:])] * len(prompts)
    maps = []
    for b, (h, w) in enumerate(grids):
        v = rel[b][img[b]].double().cpu().numpy()  # (N,)
        if v.size == h * w + 1:  # "full" feature strategy: the first image token is CLS
            v = v[1:]
        assert v.size == h * w, f"row {b}: {v.size} image tokens for a {h}x{w} grid"
        # a grad_att map that ReLU zeroed everywhere becomes uniform
        v = v / v.sum() if v.sum() > 0 else np.full(v.size, 1.0 / v.size)
        maps.append(v.reshape(h, w))
    return maps, "image_grid_thw" in inputs


# ---- grid -> original pixels ----
def pixel_cells(image_processor, image_size, grid, stretch):
    """Which grid cell saw each original pixel, replaying the processor's geometry.
    image_size: (X, Y) px; grid: (h, w). Returns (cols (X,), rows (Y,)) int, -1 where the pixel was
    cut away, and the cell size in original px.
    stretch: the image is resized onto the whole grid (Qwen2.5-VL). Else CLIP-style: [pad to square
    (do_pad),] resize (shortest_edge, or height x width), [centre crop]; pixel centres land on the
    model's input frame."""
    def get(d, k):  # d: a dict or a SizeDict
        return d.get(k) if isinstance(d, dict) else getattr(d, k, None)

    X, Y = image_size
    # stretch: the whole image onto the grid, nothing padded or cut away
    padded = (X, Y)
    resized = (X, Y)
    frame = (X, Y)
    pad = (0, 0)
    offset = (0, 0)
    if not stretch:
        ip = image_processor
        if getattr(ip, "do_pad", False) and hasattr(ip, "pad_to_square"):  # LLaVA's: image centred
            padded = (max(X, Y),) * 2
            pad = ((padded[0] - X) // 2, (padded[1] - Y) // 2)
        X1, Y1 = padded
        short = get(ip.size, "shortest_edge")
        if not getattr(ip, "do_resize", True):
            resized = padded
        elif short:  # transformers' get_resize_output_image_size: the long side truncated to int
            resized = (short, int(short * Y1 / X1)) if X1 <= Y1 else (int(short * X1 / Y1), short)
        elif get(ip.size, "height") and get(ip.size, "width"):
            resized = (get(ip.size, "width"), get(ip.size, "height"))
        else:
            raise NotImplementedError(
                f"{type(ip).__name__}: size {ip.size} (neither shortest_edge nor height/width)")
        frame = resized
        if getattr(ip, "do_center_crop", False):  # offset < 0: a crop larger than the image pads it
            frame = (get(ip.crop_size, "width"), get(ip.crop_size, "height"))
            offset = tuple(int((r - f) / 2.0) if f <= r else -((f - r) // 2)
                           for r, f in zip(resized, frame))
    cells = []
    size = []
    for axis in (0, 1):  # 0: x, the grid's w columns; 1: y, the grid's h rows
        n = (X, Y)[axis]  # original px
        r = resized[axis]
        f = frame[axis]
        g = grid[1 - axis]
        u = (np.arange(n) + 0.5 + pad[axis]) * r / padded[axis] - offset[axis]  # (n,): on the frame
        cells.append(np.where((u >= 0) & (u < f), np.floor(u * g / f), -1).astype(np.int64))
        size.append(f / g * padded[axis] / r)  # one cell in original px
    return cells[0], cells[1], float(np.mean(size))


def pixel_heat(grid_map, cols, rows):
    """(Y, X) attention mass per original pixel: each cell's mass spread evenly over the pixels it
    saw (cut-away pixels 0; a cell that saw only padding loses its mass); renormalised to sum 1.
    grid_map: (h, w)."""
    h, w = grid_map.shape
    n_rows = np.bincount(rows[rows >= 0], minlength=h)  # (h,): pixel rows each cell row saw
    n_cols = np.bincount(cols[cols >= 0], minlength=w)  # (w,)
    density = grid_map / np.maximum(np.outer(n_rows, n_cols), 1)  # (h, w): mass per pixel of a cell
    seen = np.outer(rows >= 0, cols >= 0)  # (Y, X): pixels not cut away
    heat = density[np.ix_(rows.clip(0), cols.clip(0))] * seen  # (Y, X)
    return heat / heat.sum() if heat.sum() > 0 else heat


# ---- the adaptive crop ----
def adaptive_crop(attn, image_size, crop_base, ratios, step=1.0):
    """The authors' multi-ratio window search. For each r: side = round(r * crop_base) px, clamped
    to the image (a ratio whose window covers the whole image is skipped; at the smallest r, 1, the
    answer is the image, "full"); S = the attention mass of every window position (integral image,
    stride 1 px);
    score_r = (max S - mean of S at the windows shifted by `step` px left / right / up / down,
               where they fit) / window area.
    attn: (Y, X) mass per original pixel (pixel_heat); image_size: (X, Y); step: one grid cell in
    original px (the authors slide on the grid, so their neighbours are one cell away).
    Returns ([x1, y1, x2, y2] ints, x2/y2 exclusive, "full" | "window", r)."""
    X, Y = image_size
    assert attn.shape == (Y, X), f"attention map {attn.shape} for an image of {X}x{Y} (X, Y)"
    if round(min(ratios) * crop_base) >= max(X, Y):  # even the r = 1 window covers the image
        return [0, 0, X, Y], "full", min(ratios)
    I = np.zeros((Y + 1, X + 1))
    # (Y + 1, X + 1): I[y, x] = mass of attn[:y, :x]
    I[1:, 1:] = attn.astype(np.float64).cumsum(0).cumsum(1)
    s = max(1, round(step))  # the neighbours' shift, px
    best = None
    for r in ratios:
        side = round(r * crop_base)
        w = min(side, X)
        h = min(side, Y)
        if w == X and h == Y:
            continue
        # (Y - h + 1, X - w + 1): S[y, x] = mass of the window with its top-left corner at (x, y)
        S = I[h:, w:] - I[:-h, w:] - I[h:, :-w] + I[:-h, :-w]
        ys, xs = np.nonzero(S >= S.max() - 1e-6 * abs(S.max()))  # the maximum, with float-noise ties
        k = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)  # tie nearest the ties' mean
        y = int(ys[k])
        x = int(xs[k])
        nbrs = {(y, min(x + s, S.shape[1] - 1)), (y, max(x - s, 0)),
                (min(y + s, S.shape[0] - 1), x), (max(y - s, 0), x)} - {(y, x)}
        score = (S[y, x] - np.mean([S[p] for p in nbrs])) / (w * h)
        if best is None or score > best[0]:
            best = (score, [x, y, x + w, y + h], r)
    return best[1], "window", best[2]


# ---- the method on one batch ----
def crop_batch(model, processor, args, batch):
    """B input rows -> B output rows (or an error message for a row that cannot run: an unreadable
    image, a prompt the model cannot take). The paper's steps in order: the answer y, the map A,
    grid -> pixels, the crop."""
    # P as the model sees it
    asked = [with_focus(row["prompt"], args.focus_prompt) for row in batch]
    images, results = usable_rows(model, processor, args, batch, asked)  # {row index: image}
    idx = list(images)
    if not idx:
        return results
    imgs = [images[i] for i in idx]
    texts = [chat_prompt(processor, asked[i]) for i in idx]
    # y: the model's own greedy answer to (I, P)
    answers = generate_greedy(model, processor, texts, imgs, args.max_new_tokens)
    # A: one forward over (I, P, y) (grad_att: over (I, P)), on the patch grid
    maps, stretch = attention_maps(model, processor, [asked[i] for i in idx], answers, imgs,
                                   args.layers, args.method, direct=args.map == "ours")
    for i, answer, grid_map in zip(idx, answers, maps):
        row = batch[i]
        image = images[i]
        cols, rows, cell = pixel_cells(processor.image_processor, image.size, grid_map.shape, stretch)
        heat = pixel_heat(grid_map, cols, rows)  # (Y, X): A on the original pixels
        bbox, crop, _ = adaptive_crop(heat, image.size, args.crop_base, args.ratios, step=cell)
        results[i] = {**row, "image": relpath_for(args.out, row["_image"]), "answer": answer,
                      "bbox": bbox, "grid": list(grid_map.shape),
                      "attn": np.round(grid_map, 4).tolist(), "method": args.method, "crop": crop}
        if args.viz:
            caption = f"{row['prompt']} -> {answer}"
            save_viz(Path(args.viz) / viz_name(row["id"]), image, heat, bbox, caption)
    return results


def with_focus(prompt, focus_prompt):
    """P as the answer and the attention pass see it: the paper's focusing prompt first, if any."""
    return f"{focus_prompt.strip()} {prompt}" if focus_prompt else prompt


def main(argv=None):
    args = parse_args(argv)
    # ---- plumbing: processes, the output's lock, the input lines, the model ----
    Image.MAX_IMAGE_PIXELS = args.max_image_pixels or None
    torch.manual_seed(args.seed)
    rank, world, device = dist_setup(args.device)
    on_rank0(lambda: claim_out(args.out, {"--data": args.data}), rank, world)
    rows, errors = read_instances(args.data, ("image", "prompt"), args.limit)
    if not rows:  # every line bad: run_rows lists them and exits non-zero, before a model loads
        return run_rows(rows, errors, None, args.out, args.batch_size, rank, world)
    # a rerun into --out compares these: the input and the model, not only their names
    args.data_identity = file_identity(args.data)
    args.model_identity = model_identity(args.model)
    # eager attention: the weights reach the hooks
    model, processor = load_model(args.model, device, attn_implementation="eager")
    model.requires_grad_(False)  # grad_att differentiates activations only
    resolve_defaults(args, model, processor, rank)  # --layers, --crop-base
    on_rank0(lambda: save_args(args, args.out, RESULT_ARGS), rank, world)
    # ---- the method, batch by batch (crop_batch): y, the map A, grid -> pixels, the crop ----
    work = functools.partial(crop_batch, model, processor, args)
    run_rows(rows, errors, work, args.out, args.batch_size, rank, world, desc="crops")
    if world > 1:
        dist.destroy_process_group()


# ==================================================================================================
# Appendix: plumbing. A first reading may skip everything below: the stage's own input/output
# and printing, then helpers that several stages need, copied verbatim between
# "# ---- shared: NAME ----" rulers so each script stands alone (tests/test_shared_blocks.py
# keeps every copy identical).
# ==================================================================================================
# ---- plumbing: usable rows, defaults from the data and the processor, the viz PNG ----
def usable_rows(model, processor, args, batch, asked):
    """({row index: its image} for the rows that can run, [None, or why a row cannot]): its image
    must load, and the model must take its prompt `asked` + --max-new-tokens (prompt_problems)."""
    images = {}
    results = [None] * len(batch)
    for i, row in enumerate(batch):
        try:
            images[i] = load_image(row["_image"])
        except (OSError, ValueError) as e:
            results[i] = f"unreadable image {row['_image']}: {e}"
    texts = [chat_prompt(processor, asked[i]) for i in images]
    extra = [args.max_new_tokens] * len(images)
    problems = prompt_problems(model, processor, texts, [[im] for im in images.values()], extra,
                               "answer tokens (--max-new-tokens)")
    for i, problem in zip(list(images), problems):
        if problem:
            results[i] = problem
            del images[i]
    return images, results


def resolve_defaults(args, model, processor, rank):
    """--layers and --crop-base left out: the toy world's (world.json beside --data; said), else the
    middle layer and the processor's input side. Checked against the model and --ratios."""
    n_layers = len(decoder_layers(model))
    path = Path(args.data).parent / "world.json"
    toy = json.loads(path.read_text()) if path.is_file() else {}
    if rank == 0 and toy and not (args.layers and args.crop_base):
        print(f"settings from {path}: --layers 0, --crop-base {toy.get('crop_base')} "
              f"(where a flag does not set them)", flush=True)
    args.layers = sorted(set(args.layers or [0 if toy else n_layers // 2]))
    if not all(0 <= i < n_layers for i in args.layers):
        fail(f"--layers {args.layers}: the model has layers 0 to {n_layers - 1}")
    args.crop_base = args.crop_base or int(toy.get("crop_base", 0)) or input_side(processor)
    if round(min(args.ratios) * args.crop_base) < 1:
        fail(f"--ratios {min(args.ratios)} x crop_base {args.crop_base} px is a window under one "
             f"pixel: raise --ratios or --crop-base")


def input_side(processor):
    """The processor's fixed input side (LLaVA-1.5: the 336 crop), else 336 (Qwen2.5-VL)."""
    ip = processor.image_processor
    size = ip.crop_size if getattr(ip, "do_center_crop", False) else getattr(ip, "size", None)
    side = size.get("height") if isinstance(size, dict) else getattr(size, "height", None)
    return int(side) if side else 336


def viz_name(key):
    """The PNG of an id: characters outside [A-Za-z0-9._-] become "_", and an id so changed, or with
    capitals, gets its crc32, so no two ids share a file ("a b" and "a_b"; "A" and "a" on a
    case-insensitive disk)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(key))[:100].lstrip(".") or "_"
    if safe != str(key) or safe != safe.lower():
        safe += f"-{zlib.crc32(str(key).encode()):08x}"
    return safe + ".png"


def save_viz(path, image, heat, bbox, caption):
    """PNG: the heat map in red over the image, the bbox in green, the caption below."""
    k = max(1, 256 // max(image.size))  # small images are scaled up, pixels kept sharp
    size = (image.width * k, image.height * k)
    a = 0.7 * (heat - heat.min()) / max(heat.max() - heat.min(), 1e-12)  # (Y, X) in [0, 0.7]
    a = a[..., None]  # (Y, X, 1)
    over = np.asarray(image, np.float32) * (1 - a) + np.array([255, 40, 0]) * a  # (Y, X, 3)
    canvas = Image.new("RGB", (size[0], size[1] + 28), "white")
    canvas.paste(Image.fromarray(over.round().astype(np.uint8)).resize(size, Image.NEAREST))
    x1, y1, x2, y2 = (v * k for v in bbox)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=(0, 220, 0), width=2)
    draw.text((4, size[1] + 6), caption[:120], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
# ---- end plumbing ----


# ---- shared: jsonl ----
def read_jsonl(path, on_error=None):
    """[(line_number, row)] for each non-blank line of a JSONL file (CRLF endings and a UTF-8 BOM
    are fine).

    A line that is not a JSON object (or not UTF-8, or nested past Python's recursion limit)
    raises ValueError naming the file and line, or, when on_error is given, is reported as
    on_error(line_number, message) and skipped.
    """
    rows = []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is that line's error
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            except (ValueError, RecursionError) as e:
                message = f"{path}:{n}: bad JSON line ({e})"
                if on_error is None:
                    raise ValueError(message) from None
                on_error(n, message)
                continue
            rows.append((n, row))
    return rows


def append_jsonl(f, row):
    """Write one row and flush, so a crash or Ctrl-C loses at most the line being written."""
    f.write(json.dumps(row) + "\n")
    f.flush()
# ---- end shared ----


# ---- shared: resume ----
def continue_jsonl(path):
    """Rows already in an output JSONL, after cutting a last line left unfinished by a crash
    (appends must start on a fresh line). Any other bad line ends the run, naming it."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
    try:
        return [row for _, row in read_jsonl(path)]
    except ValueError as e:  # not a crash's trace: an edit, or two writers (see claim_out)
        raise SystemExit(f"{e}: a line inside the output is damaged; mend or delete that line, "
                         f"or delete {path} to start over") from None
# ---- end shared ----


# ---- shared: images ----
def open_image(path):
    """An image file opened lazily (header only), after checking that it has at most
    Image.MAX_IMAGE_PIXELS pixels (--max-image-pixels): a small file can claim a huge canvas (a
    decompression bomb). Raises ValueError naming the file, its size and the limit, or OSError when
    the file is no image PIL knows."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # PIL warns above the limit and refuses twice it: checked here
    try:
        img = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if limit and img.width * img.height > limit:
        img.close()
        raise ValueError(f"{path}: {img.width}x{img.height} pixels, over the limit of {limit} "
                         f"(a guard against decompression bombs; --max-image-pixels raises it)")
    return img


def load_image(path):
    """Open an image as 8-bit RGB, upright by its EXIF orientation (what a viewer shows).
    Grayscale, palette and 16-bit images are converted; transparency is composited on white.
    Raises OSError/ValueError naming the file when unreadable or too large (open_image)."""
    with open_image(path) as img:
        try:
            img.load()
        except Image.DecompressionBombError as e:  # a frame larger than the header said
            raise ValueError(f"{path}: {e}") from None
        img = ImageOps.exif_transpose(img)
        if img.mode == "F":  # 32-bit float: no range says what is white (1.0? 255? 65535?)
            raise ValueError(f"{path}: a 32-bit float image; convert it to 8 or 16 bits")
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
            # 16-bit grayscale: scale to 8 bits, not clip
            a = np.asarray(img, dtype=np.float64)
            a = np.round(a * (255.0 / 65535.0)).clip(0, 255)
            img = Image.fromarray(a.astype(np.uint8))
        has_alpha = img.mode in ("RGBA", "LA", "PA")
        if has_alpha or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        return img.convert("RGB")
# ---- end shared ----


# ---- shared: model ----
def find_model(path):
    """The folder of --model: a local folder, or the snapshot of a name in the user's own Hugging
    Face cache (never downloaded). One sentence when it is neither, or holds no config.json."""
    if os.path.isdir(path):
        folder = Path(path)
    else:
        try:
            folder = Path(cached_file(path, "config.json", local_files_only=True)).parent
        except OSError:
            if os.path.isabs(path) or path.startswith(".") or path.count("/") > 1:
                fail(f"--model {path}: no such folder")
            fail(f"--model {path}: no such folder, and no model of that name in your Hugging Face "
                 f"cache (nothing is downloaded here: fetch it first, e.g. `hf download {path}`)")
    if not (folder / "config.json").is_file():
        fail(f"--model {path}: {folder} holds no config.json, so it is not a saved model")
    return folder


def model_identity(path):
    """What a rerun compares to tell a model from another: its folder, and the number, total size
    and newest modification time (UTC) of the files from_pretrained reads, so a model retrained or
    replaced in place reads as another one."""
    folder = find_model(path).resolve()
    kinds = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja", ".tiktoken")
    files = [p for p in folder.iterdir() if p.suffix in kinds and p.is_file()]
    size = sum(p.stat().st_size for p in files)
    newest = max(p.stat().st_mtime_ns for p in files)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(newest // 10**9))
    return f"{folder}: {len(files)} files, {size} bytes, newest {when}.{newest % 10**9:09d}"


def load_model(path, device, attn_implementation=None):
    """(model, processor) from a local folder or a name in the user's own Hugging Face cache
    (offline). bf16 on CUDA, fp32 on CPU; left padding, since batched decoding appends on the
    right. A folder that does not hold a loadable model ends the run in one sentence."""
    find_model(path)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        processor = AutoProcessor.from_pretrained(path)
        processor.tokenizer.padding_side = "left"
        chat_prompt(processor, "?")  # a processor without a chat template fails here, not mid-run
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation)
    except Exception as e:  # noqa: BLE001 (whatever the folder lacks; --debug shows the traceback)
        reason = str(e).strip().split("\n")[0][:300]
        fail(f"--model {path}: no image-text model and processor load from it "
             f"({type(e).__name__}: {reason})")
    return model.to(device).eval(), processor


def chat_prompt(processor, prompt, n_images=1):
    """The model's own chat template around one user turn (n_images images, then the text), ready
    for the answer."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
# ---- end shared ----


# ---- shared: generate ----
@torch.no_grad()
def generate_greedy(model, processor, texts, images, max_new_tokens):
    """Greedy answers for a batch (left padded; each row stops at EOS). texts: B chat prompts;
    images: flat list, in the order their image tokens appear."""
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    inputs = inputs.to(model.device, dtype=model.dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id)  # (B, T + new)
    new = out[:, inputs["input_ids"].shape[1]:]  # (B, new)
    return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
# ---- end shared ----


# ---- shared: batch ----
def build_batch(processor, prompts, responses, images):
    """(inputs, response_mask (R, T) bool) scoring R (chat prompt with images, response) rows.

    prompts, responses: R strings; images: R lists of PIL images in prompt order (a repeated image
    is listed again: pixel_values and image_grid_thw follow row order). A response is tokenized
    alone + EOS and appended at the id level, as generation made it; rows are left padded, so a
    response is its row's last tokens."""
    assert len(prompts) == len(responses) == len(images), (len(prompts), len(responses), len(images))
    tok = processor.tokenizer
    texts = [chat_prompt(processor, p, len(imgs)) for p, imgs in zip(prompts, images)]
    flat_images = [im for imgs in images for im in imgs]
    enc = processor(text=texts, images=flat_images, padding=True, return_tensors="pt")
    resp = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in responses]
    real = enc["attention_mask"].bool()  # (R, Tp): the prompt tokens; padding is redone below
    T = max(int(m.sum()) + len(r) for m, r in zip(real, resp))
    inputs = dict(enc)  # pixel_values, image_grid_thw: as the processor made them
    per_token = [k for k, v in enc.items() if torch.is_tensor(v) and v.shape == real.shape]
    for k in per_token:  # input_ids, attention_mask, mm_token_type_ids
        if k == "input_ids":
            tails = resp
        else:  # attention 1 on the response; mm type 0: text
            tails = [[int(k == "attention_mask")] * len(r) for r in resp]
        rows = [torch.cat([v[m], torch.tensor(t, dtype=v.dtype)])
                for v, m, t in zip(enc[k], real, tails)]
        pad = tok.pad_token_id if k == "input_ids" else 0
        inputs[k] = torch.stack([F.pad(row, (T - len(row), 0), value=pad) for row in rows])  # (R, T)
    lengths = torch.tensor([len(r) for r in resp])  # (R,)
    response_mask = torch.arange(T) >= T - lengths[:, None]  # (R, T)
    return inputs, response_mask
# ---- end shared ----


# ---- shared: context ----
# processor -> {image sizes: tokens the processor adds for those images}; weak: a processor
# collected (tests, notebooks) cannot pass its counts to a new one at its address
IMAGE_TOKENS = weakref.WeakKeyDictionary()


def prompt_problems(model, processor, texts, images, extra, what):
    """For each row None, or why the model cannot take it: its text holds an image placeholder
    itself (the processor would count one image too many and fail the whole batch), or its tokens
    as the processor makes them (image tokens included) + extra[i] more (tokens to generate, or a
    response) run past max_position_embeddings, where the model gives garbage without an error.
    The image tokens depend on the images' sizes alone: measured once per sizes (on blank images),
    so a row costs a tokenizer call. texts: R chat prompts; images: R lists of images; what: the
    extra tokens' name."""
    marks = [getattr(processor, k, None) for k in ("image_token", "video_token")]
    problems = [None] * len(texts)
    for r, text in enumerate(texts):
        for mark, n in zip(marks, (len(images[r]), 0)):
            if isinstance(mark, str) and text.count(mark) != n:
                problems[r] = f"the text holds the model's image placeholder {mark!r}"
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if not (limit and texts):
        return problems
    n_text = [len(ids) for ids in processor.tokenizer(texts)["input_ids"]]  # placeholders: 1 each
    added = IMAGE_TOKENS.setdefault(processor, {})
    for r in [r for r, problem in enumerate(problems) if problem is None]:
        sizes = tuple(im.size for im in images[r])
        if sizes not in added:
            blanks = [Image.new("RGB", size) for size in sizes]
            n = processor(text=[texts[r]], images=blanks or None)["input_ids"][0]
            added[sizes] = len(n) - n_text[r]
        n = n_text[r] + added[sizes]
        if n + extra[r] > limit:
            problems[r] = (f"the prompt is {n} tokens (images included), + {extra[r]} {what} is "
                           f"over the model's context of {limit} positions")
    return problems
# ---- end shared ----


# ---- shared: dist ----
def dist_setup(device):
    """(rank, world, device). torchrun is detected from WORLD_SIZE: a process group on gloo (CPU)
    or nccl (CUDA, one GPU per local rank). One process: (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if torch.device(device).type == "cuda":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world, device


def on_rank0(step, rank, world):
    """Run step() on rank 0 alone (checks, the lock, args.json); its refusal (SystemExit) ends
    every rank with the same message instead of leaving the others waiting at the next
    collective."""
    problem = [None]
    if rank == 0:
        try:
            step()
        except SystemExit as e:
            problem = [str(e)]
    if world > 1:
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise SystemExit(problem[0])
# ---- end shared ----


# ---- shared: stage ----
def read_instances(path, fields, limit=None):
    """(rows, errors) from an input JSONL (the first `limit` non-blank lines).

    A row needs "id" and every name in `fields` non-empty; its "image" (when in fields) must be a
    file, relative to the JSONL's folder unless absolute. Good rows get "_file", "_line" and, with
    an image, "_image" (a Path). A bad line becomes an error {"file", "line", "id", "error"} and the
    others go on."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path}: input file not found")
    lines = []
    read = read_jsonl(path, on_error=lambda n, message: lines.append((n, message)))
    lines = sorted(lines + read, key=lambda x: x[0])[:limit]
    if not lines:
        fail(f"{path}: no input lines (the file is empty)")
    rows = []
    errors = []
    seen = {}  # id -> line
    for n, row in lines:
        if isinstance(row, str):  # read_jsonl's message for a line that is not a JSON object
            errors.append({"file": str(path), "line": n, "id": None, "error": row})
            continue
        problem = None
        for field in ("id", *fields):
            value = row.get(field)
            if value is None:
                problem = f"missing field '{field}'"
            elif isinstance(value, str) and not value.strip():
                problem = f"empty field '{field}'"
            elif field in ("image", "prompt") and not isinstance(value, str):
                problem = f"field '{field}' must be text, not {type(value).__name__}"
            elif field == "id" and (type(value) not in (str, int)):  # a list, NaN: no file name
                problem = f"field 'id' must be text or an integer, not {type(value).__name__}"
            if problem:
                break
        if problem is None and str(row["id"]) in seen:
            problem = f"id {row['id']!r} repeats line {seen[str(row['id'])]}"
        if problem is None and "image" in fields:
            row["_image"] = path.parent / str(row["image"])
            if not row["_image"].is_file():
                problem = f"image not found: {row['_image']}"
        if problem:
            message = f"{path}:{n}: {problem}"
            errors.append({"file": str(path), "line": n, "id": row.get("id"), "error": message})
            continue
        seen[str(row["id"])] = n
        rows.append({**row, "_file": str(path), "_line": n})
    return rows, errors


def relpath_for(out, path):
    """A path as written inside the JSONL `out`: relative to out's folder (SPEC: paths are relative
    to the file)."""
    return os.path.relpath(Path(path).resolve(), Path(out).resolve().parent)


def save_args(args, out, result_args):
    """Write <out>.args.json once the run is known to be valid. If `out` (or a rank's part of it)
    already holds lines, every one of `result_args` (the input file's and the model's identity
    among them) must equal what the run that wrote them recorded; else refuse in one sentence,
    before anything is written."""
    out = Path(out)
    path = out.with_suffix(".args.json")
    holds = out.is_file() or any(out.parent.glob(f"{out.name}.rank*"))
    old = {}
    if holds and not path.is_file():
        fail(f"{out} holds lines but no {path} says how they were made: use another --out, or "
             f"delete {out} to start over")
    if holds:
        try:
            old = json.loads(path.read_text())
        except ValueError:
            fail(f"{path} is not JSON: delete it and {out} to start over")
    for k in result_args:
        if k in old and old[k] != vars(args)[k]:
            fail(f"{out} holds lines made with {k}={old[k]!r}, not {vars(args)[k]!r}: "
                 f"use another --out, or delete {out} to start over")
    path.parent.mkdir(parents=True, exist_ok=True)  # the first stage run makes runs/
    resolved = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path.write_text(json.dumps(resolved, indent=1))


def write_jsonl(path, rows):
    """Write a whole JSONL file atomically: a crash leaves the old file, never half of the new one."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


def run_rows(rows, errors, work, out, batch_size, rank=0, world=1, desc="rows"):
    """Resumable, sharded driver of a stage: returns the output rows (rank 0; None elsewhere) in
    input order.

    Ids already in `out` (or in a rank's part file left by a crash) are skipped; rank r takes the
    rest's rows[r::world], calls work(batch) -> [output dict | error message] (one per row) and
    appends each output line as it comes (to `out` itself with one process, else to
    `<out>.rank<r>`). Rank 0 then merges the parts into `out` by id, in input order, so the result
    does not depend on the number of processes, and writes this run's bad lines to
    `<out>.errors.jsonl`. Exits non-zero when no line of the input gave an output."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = sorted(out.parent.glob(f"{out.name}.rank*"))
    done = {str(r["id"]) for p in [out, *parts] for r in continue_jsonl(p)}
    if world > 1:
        dist.barrier()  # every rank has read what is done before any rank appends to its part
    n_read = len(errors)  # the input's bad lines: every rank found the same ones
    todo = [r for r in rows if str(r["id"]) not in done]
    mine = todo[rank::world]
    part = out if world == 1 else out.with_name(f"{out.name}.rank{rank}")
    bar = tqdm(total=len(mine), desc=desc, disable=rank != 0)
    with open(part, "a", encoding="utf-8") as f, bar:
        for i in range(0, len(mine), batch_size):
            batch = mine[i:i + batch_size]
            results = work(batch)
            assert len(results) == len(batch), f"work returned {len(results)} results for {len(batch)} rows"
            for row, result in zip(batch, results):
                if isinstance(result, str):
                    where = f"{row['_file']}:{row['_line']}"
                    errors.append({"file": row["_file"], "line": row["_line"], "id": row["id"],
                                   "error": f"{where}: {result}"})
                else:
                    append_jsonl(f, {k: v for k, v in result.items() if not k.startswith("_")})
            bar.update(len(batch))
    if world > 1:  # every rank's errors and finished part file reach rank 0
        gathered = [None] * world
        dist.all_gather_object(gathered, errors if rank == 0 else errors[n_read:])
        errors = [e for es in gathered for e in es]
    if rank != 0:
        return None
    order = {str(r["id"]): i for i, r in enumerate(rows)}
    merged = {}
    for p in [out, *sorted(out.parent.glob(f"{out.name}.rank*"))]:
        for r in continue_jsonl(p):
            merged.setdefault(str(r["id"]), r)
    result = sorted(merged.values(), key=lambda r: order.get(str(r["id"]), len(order)))
    write_jsonl(out, result)  # a crash here leaves the old file and the parts; a rerun merges again
    for p in out.parent.glob(f"{out.name}.rank*"):
        p.unlink()
    err_path = out.with_suffix(".errors.jsonl")
    write_jsonl(err_path, sorted(errors, key=lambda e: e["line"]))
    for e in errors[:10]:
        print(e["error"])
    n_out = sum(str(r["id"]) in order for r in result)
    skipped = f"{len(errors)} skipped"
    if errors:
        skipped += f" (see {err_path})"
    print(f"{out}: {n_out} of {len(rows) + n_read} input lines written; {skipped}")
    if n_out == 0 and errors:
        fail(f"every line failed: all {len(rows) + n_read} input lines are bad (see {err_path}), "
             f"nothing written to {out}")
    return [r for r in result if str(r["id"]) in order]
# ---- end shared ----


# ---- shared: identity ----
def file_identity(path):
    """What a rerun compares to tell an input file from another: where it is, its size and a hash
    of its bytes (a file edited, replaced or moved reads as another one; the images it names are
    not hashed)."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"{path.resolve()}: {path.stat().st_size} bytes, sha256 {digest.hexdigest()[:16]}"
# ---- end shared ----


# ---- shared: lock ----
LOCKS = {}  # lock file -> its open file, held until this process ends


def claim_out(out, inputs, folder=False):
    """One run per output, checked before any model loads. `out` must be none of the `inputs`
    ({flag: path}), a folder (folder=True) or a file as the stage writes, and writable. Then this
    process takes `<out>.lock` until it ends: an flock, with the holder's pid and host written
    inside. A second run refuses, naming the holder; the lock of a run that was killed is free
    again (the kernel drops a dead process's flock) and is taken over, saying so."""
    out = Path(out)
    for flag, path in inputs.items():
        if path is not None and Path(path).resolve() == out.resolve():
            fail(f"--out {out} is also the input {flag} {path}: writing it would destroy the "
                 f"input; pass another --out")
    if out.exists() and out.is_dir() != folder:
        kind = "a folder" if folder else "a file"
        fail(f"--out {out} exists and is not {kind}: this stage writes {kind} there")
    if out.exists() and not os.access(out, os.W_OK):
        fail(f"--out {out}: not writable (permissions)")
    lock = out.with_name(out.name + ".lock")
    me = f"pid {os.getpid()} on host {socket.gethostname()}"
    left = ""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        while True:
            f = open(lock, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another run"
                f.close()
                if holder.startswith(me + ","):  # main() run again in this process (a notebook)
                    return
                fail(f"{out} is in use by {holder} (lock {lock}): two runs into one --out would "
                     f"mix or lose lines; wait for that run to end, or pass another --out")
            except OSError as e:  # a filesystem without locks (some network mounts)
                print(f"warning: cannot lock {lock} ({e.strerror}): nothing stops a second run "
                      f"into {out}")
                break
            if lock.exists() and lock.stat().st_ino == os.fstat(f.fileno()).st_ino:
                break
            f.close()  # its holder ended and removed it between our open and our flock: again
        atexit.unregister(release_locks)  # (registered once, however often main() runs)
        atexit.register(release_locks)
        LOCKS[lock] = f
        f.seek(0)
        left = f.read().strip()
        f.seek(0)
        f.truncate()
        f.write(f"{me}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
    except OSError as e:
        fail(f"--out {out}: cannot write there ({e.strerror or e})")
    if left:
        print(f"{lock}: taking over the lock of {left}, which ended without removing it")


def release_locks():
    """At the end of main() or of the process: each lock file is removed while still held (a run
    waiting for it then finds it gone and makes a new one), then let go."""
    for lock, f in LOCKS.items():
        with contextlib.suppress(OSError):
            lock.unlink()
        f.close()
    LOCKS.clear()
# ---- end shared ----


# ---- shared: errors ----
def fail(message):
    """End the run with one sentence for the user: the file, line or flag at fault and what to do.
    A traceback is for bugs: that of the exception being handled, if any, prints only with --debug
    (read from the command line, so that helpers need not pass it around). The lock on --out is
    let go first, so that a run refused inside a process that lives on (a notebook, a test)
    leaves it free."""
    if "--debug" in sys.argv[1:] and sys.exc_info()[0] is not None:
        traceback.print_exc()
    release_locks()
    raise SystemExit(message)


def at_least(minimum, kind=int, most=math.inf):
    """An argparse type: a finite number of `kind` in [minimum, most], else argparse's one-line
    error naming the flag (a batch size of 0, a NaN learning rate, a negative --limit)."""
    def number(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of type {kind.__name__}")
        if not (math.isfinite(value) and minimum <= value <= most):
            bounds = f">= {minimum}" if most == math.inf else f"in [{minimum}, {most}]"
            raise argparse.ArgumentTypeError(f"{text} is not a finite number {bounds}")
        return value
    return number


def device_name(text):
    """An argparse type: a torch device this machine has (cpu, cuda, cuda:N)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device (--device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} "
                                         f"CUDA devices")
    return text
# ---- end shared ----


if __name__ == "__main__":
    main()

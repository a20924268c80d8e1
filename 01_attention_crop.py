"""Stage 01: where the model looks when it answers: attention map A = A_tok (x) A_img and an adaptive crop -> bbox.

Paper: P2-DPO (ICLR 2026), perception-focused pairs; SPEC.md "Stage 01". y = the model's own greedy
answer to (I, P); one forward over (I, P, y) on the chosen layers L, heads averaged
A_bar = (1/H) sum_h A_h:
  A_tok = A_bar[answer, prompt text]   (T_y x T_p)
  A_img = A_bar[prompt text, image]    (T_p x N)
  A_dir = A_bar[answer, image]         (T_y x N)
  A     = mean over answer rows of (A_tok @ A_img + A_dir)   (N,)
  averaged over L, reshaped to the model's patch grid (h, w), normalised to sum 1.
  --method grad_att (authors' code, ViCrop-style), on (I, P) alone:
  A = mean_h A_h[last prompt position, image]
      * ReLU(d log p(top-1 next token) / d A_h[last prompt position, image]).
Grid -> pixels: each patch's mass is spread evenly over the original pixels it saw, replaying the
  processor's geometry (pad to square, resize, centre crop: a side cut away by the crop gets no
  attention; Qwen2.5-VL's smart resize stretches the whole image onto the grid).
Adaptive crop (authors' algorithm): for r in (1, 1.2, ..., 2) a square window of side r * crop_base
  px (clamped to the image); S(x, y) = attention mass in the window;
  score_r = (max S - mean of S at the 4 windows one patch away) / window area;
  the best (r, position) is the bbox. If the r = 1 window covers the whole image: bbox = the image,
  "crop": "full" (no focus pair can be made from it).

Input   {"id", "image", "prompt"} JSONL (image paths relative to the file).
Output  crops.jsonl: input fields ("image" rewritten relative to the output file) + "answer",
        "bbox": [x1, y1, x2, y2] (int px, x2/y2 exclusive), "grid": [h, w],
        "attn": [[...]] (h x w, sums to 1, 4 decimals), "method", "crop": "full" | "window";
        <out>.args.json; <out>.errors.jsonl (file:line: why, per skipped line). A rerun into the
        same --out resumes, with the same --data file, model and RESULT_ARGS only (else refused);
        one run per --out at a time (<out>.lock). A bad line (an unreadable image or one over
        --max-image-pixels, a prompt the model cannot take: prompt_problems) is that line's error.
Shapes: B rows in a batch, T tokens, H heads, N image tokens, (h, w) patch grid, (Y, X) image pixels.

  # toy world on CPU: world/model on world/instances.jsonl
  python 01_attention_crop.py
  python 01_attention_crop.py --model llava-hf/llava-1.5-7b-hf --data my/instances.jsonl \
      --out runs/crops.jsonl
  torchrun --nproc_per_node=8 01_attention_crop.py --model Qwen/Qwen2.5-VL-7B-Instruct \
      --data my/instances.jsonl

Memory: the model runs with eager attention, which makes each layer's (B, H, T, T) weights and drops
  them after the layer. A forward hook on each chosen layer's self-attention reduces them at once
  (heads averaged, then the (B, T) relevance of every key position; grad_att: the last prompt row
  and a hook on its gradient), so one layer's weights live at a time. output_attentions=True would
  keep every layer (a 7B model's stack does not fit).
Choices where SPEC is silent: answer positions are y's tokens without the EOS that closes them; an
  empty answer uses that EOS position (the model's decision to stop). Prompt text = every
  non-padding prompt token that is not an image token (chat template included). Layers are averaged
  before normalising. A grad_att map that ReLU zeroes everywhere becomes uniform. Ties of S
  (plateaus, common where the map is 0) go to the tied position nearest their mean, so a lone blob
  sits mid-window. crop_base default: world.json's "crop_base" beside --data (toy world), else the
  processor's fixed input size (336 for LLaVA-1.5), else 336 (Qwen2.5-VL: dynamic size; 336 = 12
  merged 28-px patches, the window LLaVA-1.5 uses, so both families crop alike).
Toy world default layer 0 (measured on its 400 instances, CPU): the queried object lies inside the
  bbox for 43% of "what shape is the <colour> object ?" (layer 1: 39%, layer 2: 1%; a random window
  of the same size: 9%) and for 55% of right answers vs 33% of wrong ones (layer 1: 39% vs 41%: its
  map does not follow the answer).
"""
import argparse
import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import re
import socket
import sys
import traceback
import warnings
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
RESULT_ARGS = ("data_identity", "model_identity", "method", "layers", "crop_base", "ratios",
               "max_new_tokens")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="world/model",
                   help="model folder or a name in your own HF cache")
    p.add_argument("--data", default="world/instances.jsonl",
                   help="instances JSONL: id, image, prompt")
    p.add_argument("--out", default="runs/crops.jsonl",
                   help="output JSONL (a rerun into it resumes)")
    p.add_argument("--method", choices=("attention", "grad_att"), default="attention",
                   help="attention: the paper's A_tok (x) A_img; "
                        "grad_att: the authors' code (ViCrop-style)")
    p.add_argument("--layers", type=at_least(0), nargs="+", default=None,
                   help="decoder layers, averaged (default: the middle one, "
                        "num_hidden_layers // 2 (SPEC); authors' code: 14 of LLaVA-1.5-7B's 32); "
                        "toy world (world.json beside --data): 0, measured best there "
                        "(module docstring)")
    p.add_argument("--crop-base", type=at_least(1), default=None,
                   help="window side at r = 1, px (default: world.json's crop_base beside --data, "
                        "else the processor's input size: 336 for LLaVA-1.5; "
                        "336 for Qwen2.5-VL's dynamic size)")
    p.add_argument("--ratios", type=at_least(0.01, float), nargs="+",
                   default=[1.0, 1.2, 1.4, 1.6, 1.8, 2.0],
                   help="window sides as multiples of crop_base (authors: 1 1.2 1.4 1.6 1.8 2)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=32,
                   help="answer length cap, greedy (SPEC: 32)")
    p.add_argument("--viz", default=None,
                   help="folder for one PNG per instance: image, heat map, bbox")
    p.add_argument("--seed", type=at_least(0), default=0,
                   help="global seed (decoding is greedy: nothing here is random)")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="instances per forward")
    p.add_argument("--device", type=device_name,
                   default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--limit", type=at_least(1), default=None,
                   help="use only the first N lines of --data")
    p.add_argument("--max-image-pixels", type=at_least(0), default=Image.MAX_IMAGE_PIXELS,
                   help="an image with more pixels is a bad line (PIL's guard against "
                        "decompression bombs); 0: no limit")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback behind an error message (spelled out in full)")
    return p.parse_args(argv)


def relevance(A_bar, ans, txt, img):
    """A = mean over answer rows i of (sum_{k in txt} A_bar[i, k] A_bar[k, j] + A_bar[i, j]) for image
    columns j: A_tok @ A_img + A_dir, averaged over answer tokens (the mean commutes with the
    product, so it is taken first).
    A_bar: (B, T, T) head-averaged attention (rows: queries); ans, txt, img: (B, T) bool masks.
    Returns (B, T): the relevance of each key position, 0 outside img."""
    mean_over_ans = ans.float() / ans.sum(1, keepdim=True).clamp(min=1)  # (B, T): 1/T_y on answers
    a = torch.einsum("bi,bij->bj", mean_over_ans, A_bar)  # (B, T): the mean answer row
    through_text = torch.einsum("bk,bkj->bj", a * txt, A_bar)  # (B, T): answer -> prompt text -> key
    return (through_text + a) * img  # (B, T): through the prompt text, plus direct


def grad_att(att, grad):
    """ViCrop's map: mean over heads of A_h * ReLU(dlog p(top-1) / dA_h). att, grad: (B, H, T) rows
    of the last prompt position. Returns (B, T)."""
    return (att * F.relu(grad)).mean(1)


def decoder_layers(model):
    """The language model's decoder layers (LLaVA and Qwen2.5-VL in transformers 5:
    model.model.language_model)."""
    return model.model.language_model.layers


@contextlib.contextmanager
def tap_attention(model, layers, keep):
    """Forward hooks on the chosen layers' self-attention: each call's (B, H, T, T) weights (eager
    attention returns them) go through keep(weights) at once and only its result is kept. Yields
    that list, in layer order."""
    kept = []
    handles = []

    def hook(module, args, out):
        assert out[1] is not None, "no attention weights: load the model with attn_implementation='eager'"
        kept.append(keep(out[1]))
    for i in layers:
        handles.append(decoder_layers(model)[i].self_attn.register_forward_hook(hook))
    try:
        yield kept
    finally:
        for h in handles:
            h.remove()


def relevance_map(model, inputs, ans, txt, img, layers):
    """Paper's A for a batch: (B, T) relevance of each position, averaged over layers. Only the head
    mean's (B, T) reduction of each chosen layer is kept (see the docstring's Memory)."""
    def keep(w):  # (B, H, T, T) -> (B, T)
        return relevance(w.mean(1, dtype=torch.float32), ans, txt, img)

    with torch.no_grad(), tap_attention(model, layers, keep) as kept:
        model(**inputs, use_cache=False, logits_to_keep=1)
    return torch.stack(kept).mean(0)  # (B, T)


def grad_att_map(model, inputs, layers):
    """Authors' A for a batch of (I, P): (B, T), averaged over layers. Autograd starts at the first
    chosen layer's input (a leaf made by a pre-hook; the weights are frozen), so only the chosen
    layers and those above are differentiated; each chosen layer keeps its last-row weights and,
    from a tensor hook, their gradient."""
    leaf = []
    grads = []

    def make_leaf(module, args, kwargs):
        if args:
            h = args[0].detach().requires_grad_(True)
            leaf.append(h)
            return (h, *args[1:]), kwargs
        h = kwargs["hidden_states"].detach().requires_grad_(True)
        leaf.append(h)
        return args, {**kwargs, "hidden_states": h}

    def keep(w):  # (B, H, T, T) -> (B, H, T): the last prompt position's row
        w.register_hook(lambda g: grads.append(g[:, :, -1].float()))
        return w[:, :, -1].detach().float()
    first = decoder_layers(model)[min(layers)].register_forward_pre_hook(make_leaf, with_kwargs=True)
    try:
        with torch.enable_grad(), tap_attention(model, layers, keep) as att:
            out = model(**inputs, use_cache=False, logits_to_keep=1)
            logits = out.logits[:, -1].float()  # (B, V)
            # (B,): log p(top-1 next token); rows are independent, so one backward serves them all
            logp = torch.log_softmax(logits, -1).max(-1).values
            torch.autograd.grad(logp.sum(), leaf)
    finally:
        first.remove()
    # backward runs the top layer first: the gradients arrive in reverse layer order
    maps = [grad_att(a, g) for a, g in zip(att, grads[::-1])]  # one (B, T) per layer
    return torch.stack(maps).mean(0)  # (B, T)


def attention_maps(model, processor, prompts, answers, images, layers, method):
    """Normalised patch-grid maps, one (h, w) float array per row, and whether each grid stretches
    over its whole image (Qwen2.5-VL) rather than following a CLIP-style resize / crop.
    prompts, answers: B strings; images: B."""
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
        rel = relevance_map(model, inputs, ans, txt, img, layers)  # (B, T)
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
        if v.sum() > 0:
            v = v / v.sum()
        else:  # a grad_att map that ReLU zeroed everywhere
            v = np.full(v.size, 1.0 / v.size)
        maps.append(v.reshape(h, w))
    return maps, "image_grid_thw" in inputs


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
        # LLaVA's pad_to_square: image centred
        if getattr(ip, "do_pad", False) and hasattr(ip, "pad_to_square"):
            padded = (max(X, Y),) * 2
            pad = ((padded[0] - X) // 2, (padded[1] - Y) // 2)
        X1, Y1 = padded
        short = get(ip.size, "shortest_edge")
        if not getattr(ip, "do_resize", True):
            resized = padded
        elif short:  # transformers' get_resize_output_image_size: the long side truncated to int
            if X1 <= Y1:
                resized = (short, int(short * Y1 / X1))
            else:
                resized = (int(short * X1 / Y1), short)
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
        n1 = padded[axis]
        r = resized[axis]
        f = frame[axis]
        g = grid[1 - axis]
        u = (np.arange(n) + 0.5 + pad[axis]) * r / n1 - offset[axis]  # (n,): centres on the frame
        cells.append(np.where((u >= 0) & (u < f), np.floor(u * g / f), -1).astype(np.int64))
        size.append(f / g * n1 / r)  # one cell in original px
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


def adaptive_crop(attn, image_size, crop_base, ratios, step=1.0):
    """Authors' multi-ratio window search. For each r: side = round(r * crop_base) px, clamped to the
    image (a ratio whose window covers the whole image is skipped; at the smallest r, 1, the answer
    is the image, "full"); S = the attention mass of every window position (integral image,
    stride 1 px);
    score_r = (max S - mean of S at the windows shifted by `step` px left / right / up / down,
               where they fit) / window area.
    attn: (Y, X) mass per original pixel (pixel_heat); image_size: (X, Y); step: one grid cell in
    original px (the authors slide on the grid, so their neighbours are one cell away).
    Returns ([x1, y1, x2, y2] ints, x2/y2 exclusive, "full" | "window", r)."""
    X, Y = image_size
    assert attn.shape == (Y, X), f"attention map {attn.shape} for an image of {X}x{Y} (X, Y)"
    if round(min(ratios) * crop_base) >= max(X, Y):  # SPEC: even the r = 1 window covers the image
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


def main(argv=None):
    exits_in_one_sentence("rerun the same command: it continues where this run stopped")
    args = parse_args(argv)
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
    n_layers = len(decoder_layers(model))
    toy = toy_world(args.data)
    taken = []  # the settings taken from the toy world, said first
    if args.layers:
        args.layers = sorted(set(args.layers))
    elif toy:
        args.layers = [0]  # measured best there (module docstring)
        taken.append("--layers 0")
    else:
        args.layers = [n_layers // 2]  # SPEC: the middle layer
    if toy and not args.crop_base and toy.get("crop_base"):
        taken.append(f"--crop-base {toy['crop_base']}")
    if rank == 0 and taken:
        print(f"settings from {Path(args.data).parent / 'world.json'}: {', '.join(taken)} "
              f"(a flag overrides them)", flush=True)
    if not all(0 <= i < n_layers for i in args.layers):
        fail(f"--layers {args.layers}: the model has layers 0 to {n_layers - 1}")
    args.crop_base = args.crop_base or int(toy.get("crop_base", 0)) or input_side(processor)
    if args.viz:
        os.makedirs(args.viz, exist_ok=True)
    on_rank0(lambda: save_args(args, args.out, RESULT_ARGS), rank, world)
    # per batch (crop_batch, in the appendix): the greedy answer y, attention_maps, pixel_cells,
    # pixel_heat, adaptive_crop
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
# ---- plumbing: one batch, defaults from the data and the processor, the viz PNG ----
def crop_batch(model, processor, args, batch):
    """run_rows' work: B input rows -> B output rows (or an error message for a row whose image is
    unreadable, or whose prompt the model cannot take: prompt_problems). SPEC's steps in order:
    the answer y, the map A, grid -> pixels, the crop."""
    images = {}  # row index -> its image, for the rows whose image could be read
    results = [None] * len(batch)
    for i, row in enumerate(batch):
        try:
            images[i] = load_image(row["_image"])
        except (OSError, ValueError) as e:
            results[i] = f"unreadable image {row['_image']}: {e}"
    texts = {i: chat_prompt(processor, batch[i]["prompt"]) for i in images}
    fits = prompt_problems(model, processor, list(texts.values()),
                           [[im] for im in images.values()], [args.max_new_tokens] * len(images),
                           "answer tokens (--max-new-tokens)")
    for i, problem in zip(list(images), fits):
        if problem:
            results[i] = problem
            del images[i]
    idx = list(images)
    if not idx:
        return results
    prompts = [batch[i]["prompt"] for i in idx]
    imgs = [images[i] for i in idx]
    texts = [texts[i] for i in idx]
    answers = generate_greedy(model, processor, texts, imgs, args.max_new_tokens)
    maps, stretch = attention_maps(model, processor, prompts, answers, imgs, args.layers, args.method)
    for i, answer, grid_map in zip(idx, answers, maps):
        row = batch[i]
        image = images[i]
        cols, rows, cell = pixel_cells(processor.image_processor, image.size, grid_map.shape, stretch)
        heat = pixel_heat(grid_map, cols, rows)  # (Y, X)
        bbox, crop, _ = adaptive_crop(heat, image.size, args.crop_base, args.ratios, step=cell)
        results[i] = {**row, "image": relpath_for(args.out, row["_image"]), "answer": answer,
                      "bbox": bbox, "grid": list(grid_map.shape),
                      "attn": np.round(grid_map, 4).tolist(), "method": args.method, "crop": crop}
        if args.viz:
            name = re.sub(r"[^A-Za-z0-9._-]", "_", str(row["id"]))
            caption = f"{row['prompt']} -> {answer}"
            save_viz(Path(args.viz) / f"{name}.png", image, heat, bbox, caption)
    return results


def toy_world(data):
    """The toy world's settings (world.json beside --data), or {} for any other data."""
    path = Path(data).parent / "world.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def input_side(processor):
    """The processor's fixed input side (LLaVA-1.5: the 336 crop), else 336 (dynamic resolution:
    Qwen2.5-VL)."""
    ip = processor.image_processor
    size = ip.crop_size if getattr(ip, "do_center_crop", False) else getattr(ip, "size", None)
    side = size.get("height") if isinstance(size, dict) else getattr(size, "height", None)
    return int(side) if side else 336


def save_viz(path, image, heat, bbox, caption):
    """PNG: the image with the bbox | the heat map over the image with the bbox; the caption below."""
    k = max(1, 256 // max(image.size))  # small images are scaled up, pixels kept sharp
    a = ((heat - heat.min()) / max(heat.max() - heat.min(), 1e-12))[..., None]  # (Y, X, 1) in [0, 1]
    red = np.array([255, 40, 0], np.float32)
    over = np.asarray(image, np.float32) * (1 - 0.7 * a) + red * 0.7 * a  # (Y, X, 3)
    panels = [im.resize((image.width * k, image.height * k), Image.NEAREST)
              for im in (image, Image.fromarray(over.round().astype(np.uint8)))]
    canvas = Image.new("RGB", (2 * panels[0].width + 8, panels[0].height + 28), "white")
    draw = ImageDraw.Draw(canvas)
    for i, panel in enumerate(panels):
        x0 = i * (panel.width + 8)
        canvas.paste(panel, (x0, 0))
        box = [x0 + bbox[0] * k, bbox[1] * k, x0 + bbox[2] * k - 1, bbox[3] * k - 1]
        draw.rectangle(box, outline=(0, 220, 0), width=2)
    draw.text((4, panels[0].height + 6), caption[:120], fill="black")
    canvas.save(path)
# ---- end plumbing ----


# ---- shared: jsonl ----
def read_jsonl(path, on_error=None):
    """[(line number, row)] of a JSONL file's non-blank lines. A line that is not a JSON object
    raises ValueError naming file and line, or goes to on_error(line number, message)."""
    rows = []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is that line's error
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:  # a BOM, CRLF: fine; not UTF-8, nested past the recursion limit: that line's error
                row = json.loads(raw.decode("utf-8-sig" if n == 1 else "utf-8"))
                assert isinstance(row, dict), f"expected a JSON object, got {type(row).__name__}"
                rows.append((n, row))
            except (ValueError, RecursionError, AssertionError) as e:
                if on_error is None:
                    raise ValueError(f"{path}:{n}: bad JSON line ({e})") from None
                on_error(n, f"{path}:{n}: bad JSON line ({e})")
    return rows


def append_jsonl(f, row):
    """Write one row and flush: a crash or Ctrl-C loses at most the line being written."""
    f.write(json.dumps(row) + "\n")
    f.flush()
# ---- end shared ----


# ---- shared: resume ----
def continue_jsonl(path):
    """The rows already in an output JSONL, after cutting a last line a crash left unfinished.
    Any other bad line ends the run, naming it."""
    path = Path(path)
    data = path.read_bytes() if path.exists() else b""
    if not data.endswith(b"\n"):
        with open(path, "ab") as f:
            f.truncate(data.rfind(b"\n") + 1)
    try:
        return [row for _, row in read_jsonl(path)]
    except ValueError as e:  # not a crash's trace: an edit, or two writers
        raise SystemExit(f"{e}: a line inside the output is damaged; mend or delete that line, or "
                         f"delete {path} to start over") from None
# ---- end shared ----


# ---- shared: images ----
def open_image(path):
    """The image file, opened lazily (header only), behind PIL's decompression-bomb guard
    (Image.MAX_IMAGE_PIXELS, its warning made an error). OSError / ValueError naming the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise ValueError(f"{path}: {e} (a guard against decompression bombs; "
                             f"--max-image-pixels raises it)") from None


def load_image(path):
    """8-bit RGB, upright by its EXIF orientation (what a viewer shows): grayscale, palette and
    16-bit images converted, transparency composited on white."""
    with open_image(path) as img:
        img = ImageOps.exif_transpose(img)
    if img.mode == "F":  # 32-bit float: no range says what is white
        raise ValueError(f"{path}: a 32-bit float image; convert it to 8 or 16 bits")
    if img.mode.startswith("I"):  # 16-bit grayscale: scaled to 8 bits, not clipped
        img = Image.fromarray(np.round(np.asarray(img, np.float64) * 255 / 65535).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")
# ---- end shared ----


# ---- shared: model ----
def find_model(path):
    """--model's folder: a local folder, or a name in the user's own Hugging Face cache."""
    folder = Path(path)
    if not folder.is_dir():
        try:
            folder = Path(cached_file(path, "config.json", local_files_only=True)).parent
        except OSError:
            local = os.path.isabs(path) or path.startswith(".") or path.count("/") > 1
            fail(f"--model {path}: no such folder" + ("" if local else
                 ", and no model of that name in your Hugging Face cache (nothing is downloaded "
                 f"here: fetch it first, e.g. `hf download {path}`)"))
    if not (folder / "config.json").is_file():
        fail(f"--model {path}: {folder} holds no config.json, so it is not a saved model")
    return folder


def model_identity(path):
    """Folder, count, size and newest mtime of a model's files: one replaced in place differs."""
    folder = find_model(path).resolve()
    stats = [p.stat() for p in folder.iterdir() if p.is_file()]
    newest = max(s.st_mtime_ns for s in stats)
    return f"{folder}: {len(stats)} files, {sum(s.st_size for s in stats)} bytes, mtime {newest}"


def load_model(path, device, attn_implementation=None):
    """(model, processor), eval mode, bf16 on CUDA, left padding (decoding appends on the right)."""
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
    """The model's chat template around one user turn: n_images images, then the text."""
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
def prompt_problems(model, processor, texts, images, extra, what):
    """For each row None, or why the model cannot take it: its text holds an image placeholder
    (the processor would count one image too many and fail the whole batch), or its tokens, image
    tokens included, + extra[r] more (`what`) run past max_position_embeddings, where a model
    gives garbage without an error. texts: R chat prompts; images: R lists of images."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    marks = [getattr(processor, k, None) for k in ("image_token", "video_token")]
    problems = []
    for text, imgs, more in zip(texts, images, extra):
        problem = None
        for mark, n in zip(marks, (len(imgs), 0)):
            if isinstance(mark, str) and text.count(mark) != n:
                problem = f"the text holds the model's image placeholder {mark!r}"
        if problem is None and limit:  # image tokens depend on the sizes alone: blank images
            blanks = [Image.new("RGB", im.size) for im in imgs] or None
            n = len(processor(text=[text], images=blanks)["input_ids"][0])
            if n + more > limit:
                problem = (f"the prompt is {n} tokens (images included), + {more} {what} is over "
                           f"the model's context of {limit} positions")
        problems.append(problem)
    return problems
# ---- end shared ----


# ---- shared: dist ----
def dist_setup(device):
    """(rank, world, device): torchrun from WORLD_SIZE, gloo on CPU, nccl on CUDA (a GPU per rank)."""
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
    """step() on rank 0 alone; its refusal ends every rank, not only rank 0 (no hung collective)."""
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
    """(rows, errors) of an input JSONL's first `limit` lines: a unique "id" and every field in
    `fields` (an "image" relative to the file) or the line is an error {"file", "line", "id",
    "error"}; good rows get "_file", "_line", "_image"."""
    path = Path(path)
    if not path.is_file():
        fail(f"{path}: input file not found")
    bad = []
    lines = sorted(read_jsonl(path, on_error=lambda n, e: bad.append((n, e))) + bad,
                   key=lambda x: x[0])[:limit]
    if not lines:
        fail(f"{path}: no input lines (the file is empty)")
    rows, errors, seen = [], [], {}  # seen: id -> its line
    for n, row in lines:
        key = row.get("id") if isinstance(row, dict) else None
        if isinstance(row, str):  # read_jsonl's message
            problem = row.split(": ", 1)[1]
        elif field_problem("id", key):
            problem = field_problem("id", key)
        elif str(key) in seen:
            problem = f"id {key!r} repeats line {seen[str(key)]}"
        else:
            problem = next(filter(None, (field_problem(k, row.get(k)) for k in fields)), None)
        if problem is None and "image" in fields:
            row["_image"] = path.parent / row["image"]
            if not row["_image"].is_file():
                problem = f"image not found: {row['_image']}"
        if problem:
            errors.append({"file": str(path), "line": n, "id": key, "error": f"{path}:{n}: {problem}"})
            continue
        seen[str(key)] = n
        rows.append({**row, "_file": str(path), "_line": n})
    return rows, errors


def field_problem(name, value):
    """Why an input field is unusable (missing, empty, a wrong type), or None."""
    if value is None:
        return f"missing field '{name}'"
    if isinstance(value, str) and not value.strip():
        return f"empty field '{name}'"
    if name == "id" and type(value) not in (str, int):
        return f"field 'id' must be text or an integer, not {type(value).__name__}"
    if name in ("image", "prompt") and not isinstance(value, str):
        return f"field '{name}' must be text, not {type(value).__name__}"
    return None


def relpath_for(out, path):
    """A path as written inside the JSONL `out`: relative to its folder."""
    return os.path.relpath(Path(path).resolve(), Path(out).resolve().parent)


def save_args(args, out, result_args):
    """<out>.args.json; if `out` holds lines, `result_args` must equal what their run recorded."""
    out = Path(out)
    holds = [p for p in [out, *out.parent.glob(f"{out.name}.rank*")] if p.is_file() and p.stat().st_size]
    old = read_args(args_path(out)) if holds else {}
    if holds and not old:
        fail(f"{out} holds lines but no {args_path(out)} says how they were made: use another "
             f"--out, or delete {out} to start over")
    same_settings(old, vars(args), result_args, f"{out} holds lines made with")
    write_args(args_path(out), vars(args))


def write_jsonl(path, rows):
    """A whole JSONL file, atomically (a crash leaves the old file, never half a new one)."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


def run_rows(rows, errors, work, out, batch_size, rank=0, world=1, desc="rows"):
    """A stage's resumable, sharded loop. Ids already in `out` or a rank's part are skipped; rank r
    takes rows[r::world] of the rest, calls work(batch) -> [output dict | error message] and
    appends each output (to `out`, or `<out>.rank<r>` under torchrun); rank 0 merges the parts by
    id in input order (so the number of processes changes nothing), writes the bad lines to
    `<out>.errors.jsonl` and returns the rows. Exits non-zero when no line gave an output."""
    out = Path(out)
    parts = lambda: sorted(out.parent.glob(f"{out.name}.rank*"))  # noqa: E731
    done = {str(r["id"]) for p in [out, *parts()] for r in continue_jsonl(p)}
    if world > 1:
        dist.barrier()  # every rank has read what is done before any rank appends
    n_read = len(errors)  # the input's bad lines: every rank found the same ones
    mine = [r for r in rows if str(r["id"]) not in done][rank::world]
    part = out if world == 1 else out.with_name(f"{out.name}.rank{rank}")
    with open(part, "a", encoding="utf-8") as f, tqdm(total=len(mine), desc=desc, disable=rank != 0) as bar:
        for i in range(0, len(mine), batch_size):
            batch = mine[i:i + batch_size]
            results = work(batch)
            assert len(results) == len(batch), f"work returned {len(results)} results for {len(batch)} rows"
            for row, result in zip(batch, results):
                if isinstance(result, str):
                    errors.append({"file": row["_file"], "line": row["_line"], "id": row["id"],
                                   "error": f"{row['_file']}:{row['_line']}: {result}"})
                else:
                    append_jsonl(f, {k: v for k, v in result.items() if not k.startswith("_")})
            bar.update(len(batch))
    if world > 1:  # every rank's errors and finished part reach rank 0
        gathered = [None] * world
        dist.all_gather_object(gathered, errors if rank == 0 else errors[n_read:])
        errors = [e for es in gathered for e in es]
    if rank != 0:
        return None
    order = {str(r["id"]): i for i, r in enumerate(rows)}
    merged = {}
    for p in [out, *parts()]:
        for r in continue_jsonl(p):
            merged.setdefault(str(r["id"]), r)
    result = sorted(merged.values(), key=lambda r: order.get(str(r["id"]), len(order)))
    if result:
        write_jsonl(out, result)  # a crash here leaves the old file and the parts: a rerun merges
    else:
        out.unlink(missing_ok=True)  # an empty output must not block the corrected rerun
    for p in parts():
        p.unlink()
    write_jsonl(out.with_suffix(".errors.jsonl"), sorted(errors, key=lambda e: e["line"]))
    for e in errors[:10]:
        print(e["error"])
    n_out = sum(str(r["id"]) in order for r in result)
    see = f" (see {out.with_suffix('.errors.jsonl')})" if errors else ""
    print(f"{out}: {n_out} of {len(rows) + n_read} input lines written; {len(errors)} skipped{see}")
    if n_out == 0 and errors:
        fail(f"every line failed: all {len(rows) + n_read} input lines are bad"
             f"{see}, nothing written to {out}")
    return [r for r in result if str(r["id"]) in order]
# ---- end shared ----


# ---- shared: identity ----
def file_identity(path):
    """Where a file is, its size and a hash of its bytes: one edited or moved reads as another."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    return f"{Path(path).resolve()}: {os.path.getsize(path)} bytes, sha256 {digest}"
# ---- end shared ----


# ---- shared: lock ----
STAGE = Path(__file__).name  # recorded in each args.json: which stage wrote an output
LOCKS = {}  # lock file -> its open file: the kernel frees an flock when its process ends


def args_path(out, folder=False):
    """Where a stage records how it made `out`."""
    return Path(out) / "args.json" if folder else Path(out).with_suffix(".args.json")


def read_args(path):
    """The settings a run recorded ({} if none)."""
    try:
        return json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    except ValueError:
        fail(f"{path} is not JSON: delete it, and what it describes, to start over")


def write_args(path, settings):
    """Record a run's settings and which stage wrote them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"stage": STAGE, **{k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def same_settings(old, new, keys, what):
    """Refuse a rerun whose `keys` differ from what the earlier run recorded."""
    for k in keys:
        if k in old and old[k] != new.get(k):
            fail(f"{what} {k}={old[k]!r}, not {new.get(k)!r}: use another --out, or delete it to "
                 f"start over")


def claim_out(out, inputs, folder=False):
    """Before any model loads: `out` is no input ({flag: path}), of this stage's kind, written by this
    stage or not at all, and writable; then this process holds `<out>.lock` (an flock, freed when
    the process ends; the file stays) and a second run into `out` refuses, naming the holder."""
    out = Path(out)
    for flag, path in inputs.items():
        if path is not None and Path(path).resolve() == out.resolve():
            fail(f"--out {out} is also the input {flag} {path}: writing it would destroy the "
                 f"input; pass another --out")
    if out.exists() and out.is_dir() != folder:
        fail(f"--out {out} exists and is not a {'folder' if folder else 'file'}: this stage "
             f"writes a {'folder' if folder else 'file'} there")
    recorded = read_args(args_path(out, folder))
    if recorded and recorded.get("stage") != STAGE:
        writer = recorded.get("stage") or "an older version or another program (no stage named)"
        fail(f"--out {out} was written by {writer}, not {STAGE}: pass another --out")
    if folder and out.is_dir() and not args_path(out, folder).is_file() and any(
            p.is_file() and p.stat().st_size for p in out.rglob("*")):  # (empty files: a failed run's)
        fail(f"--out {out} is a folder this stage did not write (no args.json in it): pass a new "
             f"or empty folder")
    lock = out.with_name(out.name + ".lock")
    if lock in LOCKS:  # main() run again in this process (a notebook, a test)
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock, "a+")
    except OSError as e:
        fail(f"--out {out}: cannot write there ({e.strerror or e})")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        fail(f"{out} is in use by {f.read().strip() or 'another run'} (lock {lock}): wait for "
             f"that run to end, or pass another --out")
    except OSError as e:  # a filesystem without locks (some network mounts)
        print(f"warning: cannot lock {lock} ({e.strerror}): nothing stops a second run into {out}")
    LOCKS[lock] = f
    f.truncate(0)
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
    f.flush()
# ---- end shared ----


# ---- shared: errors ----
def fail(message):
    """End the run with one sentence: what is at fault, what to do (--debug: the traceback too)."""
    if "--debug" in sys.argv[1:] and sys.exc_info()[0] is not None:
        traceback.print_exc()
    raise SystemExit(message)


def exits_in_one_sentence(rerun):
    """From here on, Ctrl-C, a full disk or an unreadable file end the process in one sentence
    saying what is kept and what to do (`rerun`), not a traceback (--debug: the traceback)."""
    def hook(kind, e, tb):
        if "--debug" in sys.argv[1:] or not issubclass(kind, (KeyboardInterrupt, OSError)):
            return sys.__excepthook__(kind, e, tb)
        if kind is KeyboardInterrupt:
            what, then = "interrupted", rerun
        elif e.errno in (errno.ENOSPC, errno.EDQUOT):
            what, then = f"the disk is full ({e.filename or e})", f"free some space, then {rerun}"
        elif e.filename:
            what, then = f"cannot read or write {e.filename} ({e.strerror})", f"mend that, then {rerun}"
        else:
            return sys.__excepthook__(kind, e, tb)
        print(f"\n{what}: what was written so far is kept; {then}", file=sys.stderr)
    sys.excepthook = hook
# ---- end shared ----


# ---- shared: flags ----
def at_least(minimum, kind=int, most=math.inf):
    """An argparse type: a finite `kind` in [minimum, most], else an error naming the flag."""
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
        device = None
    if not device or (device.type != "cpu" and (device.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text!r} is no device of this machine (cpu, or cuda:N "
                                         f"for N < {torch.cuda.device_count()})")
    return text
# ---- end shared ----


if __name__ == "__main__":
    main()

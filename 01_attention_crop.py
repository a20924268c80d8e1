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
  world (seed 0, default build) A_dir is 80% of the map's image mass; dropping it changes 43.5% of
  the crops of its 400 instances (mean IoU 0.77 with ours, 0.48 over the changed ones), while the
  queried object lies in the crop about as often (its 244 open questions: 84.8% with A_dir, 83.2%
  without; the 500 held-out open questions of analysis/perception_diagnostic.py: 83.4% and 82.4%).
The paper's "specific prompt guiding the model to focus on key visual areas" is --focus-prompt
  TEXT: y and A come from (I, TEXT P); the output keeps the user's P (later stages ask P). Off by
  default: the paper gives no text, the authors' code (Data_gen/focus_pair) runs this pass on the
  question itself, and the toy world's word-level tokenizer reads unseen words as <unk>. There,
  "Focus on the key visual region of the image that answers the question." (6 of 14 tokens <unk>)
  changes 29.5% of the answers and 34% of the crops; the object in the crop: 84.8% -> 85.7%.

Input   {"id", "image", "prompt"} JSONL (image paths relative to the file).
Output  crops.jsonl: input fields ("image" rewritten relative to the output file) + "answer",
        "bbox": [x1, y1, x2, y2] (int px, x2/y2 exclusive), "grid": [h, w], "method": "attention",
        "attn": [[...]] (h x w, sums to 1, 4 decimals), "crop": "full" | "window";
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
  template included); ties of S go to the tied position nearest their mean (a lone blob sits
  mid-window). crop_base: world.json's beside --data (toy world), else the processor's fixed
  input side (336 for LLaVA-1.5), else 336 (Qwen2.5-VL's dynamic size: 12 merged 28-px patches).
  Toy world layer 0, measured on its 400 instances: the queried object lies in the bbox for 87% of
  "what shape is the <colour> object ?" (layer 1: 57%, layer 2: 69%, a random window as large,
  numpy seed 0: 36%).
"""
import argparse
import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import signal
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
from PIL import Image, ImageOps
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import cached_file

# resuming into an existing --out needs these equal
RESULT_ARGS = ("data_identity", "model_identity", "map", "focus_prompt", "layers",
               "crop_base", "ratios", "max_new_tokens")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="world/model", help="model folder or a name in your cache")
    p.add_argument("--data", default="world/instances.jsonl", help="JSONL: id, image, prompt")
    p.add_argument("--out", default="runs/crops.jsonl", help="output JSONL (a rerun resumes)")
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
    if args.focus_prompt is not None and not args.focus_prompt.strip():
        p.error("--focus-prompt is blank: leave the flag out to run without a focusing prompt")
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


def decoder_layers(model):
    """The language model's decoder layers (LLaVA and Qwen2.5-VL in transformers 5)."""
    return model.model.language_model.layers


@torch.no_grad()
def relevance_map(model, inputs, ans, txt, img, layers, direct=True):
    """The paper's A for a batch: (B, T), averaged over layers. One forward (no KV cache, last
    logits only); a hook reduces each chosen layer's (B, H, T, T) weights (eager attention) at once."""
    kept = []

    def hook(module, args, out):
        assert out[1] is not None, "no attention weights: load the model with attn_implementation='eager'"
        kept.append(relevance(out[1].mean(1, dtype=torch.float32), ans, txt, img, direct))  # (B, T)
    handles = [decoder_layers(model)[i].self_attn.register_forward_hook(hook) for i in layers]
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(kept).mean(0)  # (B, T)


def attention_maps(model, processor, prompts, answers, images, layers, direct=True):
    """Normalised patch-grid maps, one (h, w) float array per row, and whether each grid stretches
    over its whole image (Qwen2.5-VL) rather than following a CLIP-style resize / crop.
    prompts, answers: B strings; images: B; direct: A_dir in the map (--map ours)."""
    # (I, P, y): y appended after the prompt as ids, + EOS, left padded
    inputs, resp = build_batch(processor, prompts, answers, [[im] for im in images])
    p = next(model.parameters())
    inputs = {k: v.to(p.device, p.dtype) if v.is_floating_point() else v.to(p.device)
              for k, v in inputs.items()}  # pixel values in the model's dtype
    resp = resp.to(p.device)
    img = inputs["input_ids"] == model.config.image_token_id  # (B, T)
    txt = inputs["attention_mask"].bool() & ~img & ~resp  # (B, T): prompt text, chat template too
    ans = resp.clone()
    ans[:, -1] &= resp.sum(1) == 1  # no closing EOS, unless the answer is empty (then only EOS)
    rel = relevance_map(model, inputs, ans, txt, img, layers, direct)  # (B, T)
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
        v = v / v.sum() if v.sum() > 0 else np.full(v.size, 1.0 / v.size)  # (underflow: uniform)
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
    to the image; a window covering the whole image is skipped (the smallest r's: bbox = the image,
    "full"). S = the attention mass of every window position (integral image, stride 1 px);
    score_r = (max S - mean of S at the windows `step` px left / right / up / down, where they fit)
              / window area.
    attn: (Y, X) mass per original pixel (pixel_heat); image_size: (X, Y); step: one grid cell in
    original px (the authors slide on the grid, so their neighbours are one cell away).
    Returns ([x1, y1, x2, y2] ints, x2/y2 exclusive, "full" | "window", r)."""
    X, Y = image_size
    assert attn.shape == (Y, X), f"attention map {attn.shape} for an image of {X}x{Y} (X, Y)"
    if round(min(ratios) * crop_base) >= max(X, Y):  # even the r = 1 window covers the image
        return [0, 0, X, Y], "full", min(ratios)
    I = np.zeros((Y + 1, X + 1))  # (Y + 1, X + 1): I[y, x] = mass of attn[:y, :x]
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
    # P as the model sees it: the paper's focusing prompt first, if any
    focus = f"{args.focus_prompt.strip()} " if args.focus_prompt else ""
    asked = [focus + row["prompt"] for row in batch]
    images, results = usable_rows(model, processor, args, batch, asked)  # {row index: image}
    idx = list(images)
    if not idx:
        return results
    imgs = [images[i] for i in idx]
    texts = [chat_prompt(processor, asked[i]) for i in idx]
    # y: the model's own greedy answer to (I, P)
    answers = generate_greedy(model, processor, texts, imgs, args.max_new_tokens)
    # A: one forward over (I, P, y), on the patch grid
    maps, stretch = attention_maps(model, processor, [asked[i] for i in idx], answers, imgs,
                                   args.layers, direct=args.map == "ours")
    for i, answer, grid_map in zip(idx, answers, maps):
        row = batch[i]
        image = images[i]
        cols, rows, cell = pixel_cells(processor.image_processor, image.size, grid_map.shape, stretch)
        heat = pixel_heat(grid_map, cols, rows)  # (Y, X): A on the original pixels
        bbox, crop, _ = adaptive_crop(heat, image.size, args.crop_base, args.ratios, step=cell)
        results[i] = {**row, "image": relpath_for(args.out, row["_image"]), "answer": answer,
                      "bbox": bbox, "grid": list(grid_map.shape),
                      "attn": np.round(grid_map, 4).tolist(), "method": "attention", "crop": crop}
    return results


def main(argv=None):
    exits_in_one_sentence("rerun the same command: it continues where this run stopped")
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
# ---- plumbing: usable rows, defaults from the data and the processor ----
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
    """The rows already in an output JSONL, once a last line a crash left unfinished is cut."""
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
    """The image, opened lazily (header only) behind PIL's decompression-bomb guard, its warning an error."""
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
        fail(f"--model {path}: no image-text model and processor load from it ({type(e).__name__}: {reason})")
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
    """(inputs, response_mask (R, T) bool) for R rows: chat prompt with images, then response.
    prompts, responses: R strings; images: R lists of PIL images in prompt order (a repeated image listed
    again). A response is tokenized alone + EOS and appended at the id level, as generation made it; rows
    are left padded, so a response is its row's last tokens."""
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
    for k in per_token:  # input_ids, attention_mask, mm_token_type_ids: attention 1 on the response, mm type 0 (text)
        tails = resp if k == "input_ids" else [[int(k == "attention_mask")] * len(r) for r in resp]
        rows = [torch.cat([v[m], torch.tensor(t, dtype=v.dtype)]) for v, m, t in zip(enc[k], real, tails)]
        pad = tok.pad_token_id if k == "input_ids" else 0
        inputs[k] = torch.stack([F.pad(row, (T - len(row), 0), value=pad) for row in rows])  # (R, T)
    lengths = torch.tensor([len(r) for r in resp])  # (R,)
    response_mask = torch.arange(T) >= T - lengths[:, None]  # (R, T)
    return inputs, response_mask
# ---- end shared ----


# ---- shared: context ----
def prompt_problems(model, processor, texts, images, extra, what):
    """For each row None, or why the model cannot take it: its text holds an image placeholder (the processor
    would fail the whole batch), or its tokens, images included, + extra[r] `what` run past
    max_position_embeddings (garbage, no error). texts: R chat prompts; images: R lists of images."""
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
    """(rows, errors) of an input JSONL's first `limit` lines: a line without a unique "id" or a usable field of
    `fields` is an error {"file", "line", "id", "error"}; a row gets "_file", "_line", "_image" (its image path)."""
    path = Path(path)
    if not path.is_file():
        fail(f"{path}: input file not found")
    bad = []  # read_jsonl's (line, message): bad JSON
    lines = sorted(read_jsonl(path, on_error=lambda n, e: bad.append((n, e.split(": ", 1)[1]))) + bad)[:limit]
    if not lines:
        fail(f"{path}: no input lines (the file is empty)")
    rows, errors, seen = [], [], {}  # seen: id as text -> its line
    for n, row in lines:
        key = row.get("id") if isinstance(row, dict) else None
        problem = row if isinstance(row, str) else next(
            filter(None, (field_problem(k, row.get(k)) for k in ("id", *fields))), None)
        if problem is None and str(key) in seen:
            problem = f"id {key!r} repeats line {seen[str(key)]}"
        if problem is None and "image" in fields and not (path.parent / row["image"]).is_file():
            problem = f"image not found: {path.parent / row['image']}"
        if problem:
            errors.append({"file": str(path), "line": n, "id": key, "error": f"{path}:{n}: {problem}"})
            continue
        seen[str(key)] = n
        rows.append({**row, "_file": str(path), "_line": n})
        if "image" in fields:
            rows[-1]["_image"] = path.parent / row["image"]
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
    """A stage's resumable, sharded loop: rank r takes rows[r::world] of those whose id is in neither `out`
    nor a part `<out>.rank<r>`, and appends work(batch) -> [output dict | error message] to its part (world 1:
    to `out`); rank 0 merges the parts in input order (so the number of processes changes nothing), writes
    the bad lines to `<out>.errors.jsonl` and returns the rows. Exits non-zero when no line gave an output."""
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
    merged = {str(r["id"]): r for p in [out, *parts()] for r in continue_jsonl(p)}
    result = [merged.pop(str(r["id"])) for r in rows if str(r["id"]) in merged]  # in input order
    if result or merged:  # merged: now an earlier run's lines for ids not in this input, kept
        write_jsonl(out, result + list(merged.values()))  # a crash here leaves the parts: a rerun merges
    else:
        out.unlink(missing_ok=True)  # an empty output must not block the corrected rerun
    for p in parts():
        p.unlink()
    write_jsonl(out.with_suffix(".errors.jsonl"), sorted(errors, key=lambda e: e["line"]))
    for e in errors[:10]:
        print(e["error"])
    see = f" (see {out.with_suffix('.errors.jsonl')})" if errors else ""
    print(f"{out}: {len(result)} of {len(rows) + n_read} input lines written; {len(errors)} skipped{see}")
    if not result and errors:
        fail(f"every line failed: all {len(rows) + n_read} input lines are bad{see}, nothing written to {out}")
    return result
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
    """Record a run's settings and which stage wrote them, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"stage": STAGE, **{k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def same_settings(old, new, keys, what):
    """Refuse a rerun whose `keys` differ from what the earlier run recorded."""
    for k in keys:
        if k in old and old[k] != new.get(k):
            fail(f"{what} {k}={old[k]!r}, not {new.get(k)!r}: use another --out, or delete it to start over")


def claim_out(out, inputs, folder=False):
    """Before any model loads: refuse an `out` that is an input ({flag: path}), of the wrong kind (`folder`),
    written by another stage, or a folder of the user's; then hold `<out>.lock` (an flock the kernel frees
    when the process ends; the file stays), so that a second run into `out` refuses, naming this one."""
    out = Path(out)
    kind = "folder" if folder else "file"
    for flag, path in inputs.items():
        if path is not None and Path(path).resolve() == out.resolve():
            fail(f"--out {out} is also the input {flag} {path}: writing it would destroy the input; pass another --out")
    if out.exists() and out.is_dir() != folder:
        fail(f"--out {out} exists and is not a {kind}: this stage writes a {kind} there")
    recorded = read_args(args_path(out, folder))
    if recorded and recorded.get("stage") != STAGE:
        writer = recorded.get("stage") or "an older version or another program (no stage named)"
        fail(f"--out {out} was written by {writer}, not {STAGE}: pass another --out")
    if folder and not recorded and out.is_dir() and any(p.is_file() and p.stat().st_size for p in out.rglob("*")):
        fail(f"--out {out} is a folder this stage did not write (no args.json in it): pass a new or empty folder")
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
        fail(f"{out} is in use by {f.read().strip() or 'another run'} (lock {lock}): wait for that run to end, "
             f"or pass another --out")
    except OSError as e:  # a filesystem without locks (some network mounts)
        print(f"warning: cannot lock {lock} ({e.strerror}): nothing stops a second run into {out}")
    LOCKS[lock] = f
    f.truncate(0)
    print(f"pid {os.getpid()} on host {socket.gethostname()}", file=f, flush=True)
# ---- end shared ----


# ---- shared: errors ----
LOCKS = {}  # lock file -> its open file (claim_out): the kernel frees an flock when its process ends


def fail(message):
    """End the run with one sentence: what is at fault, what to do (--debug: the traceback too).
    --out's lock is let go first, for a process that lives on (a notebook, a test)."""
    if "--debug" in sys.argv[1:] and sys.exc_info()[0] is not None:
        traceback.print_exc()
    for f in LOCKS.values():
        f.close()
    LOCKS.clear()
    raise SystemExit(message)


def exits_in_one_sentence(rerun):
    """From here on, Ctrl-C, SIGTERM (`kill`, `timeout`, a job scheduler), a full disk or an unreadable file
    end the process in one sentence saying what is kept and what to do (`rerun`); --debug: the traceback."""
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
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt, as Ctrl-C does
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
    n = torch.cuda.device_count()
    if not device or (device.type != "cpu" and (device.index or 0) >= n):
        has = f"cpu, or cuda:N for N < {n}" if n else "it has no GPU: cpu"
        raise argparse.ArgumentTypeError(f"{text!r} is no device of this machine ({has})")
    return text
# ---- end shared ----


if __name__ == "__main__":
    main()

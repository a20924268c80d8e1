"""Stage 02: on-policy preference pairs, focus (zoomed vs degraded view) and robustness
(contrastive amplification).

Paper: P2-DPO (ICLR 2026), method: the focus-enhanced and the visual-robustness preference pairs.
M is the reference (base) model, P the instance's prompt, bbox stage 01's crop.
  I_crop  = I.crop(bbox);   I_deg = I with the bbox rectangle filled by I's mean RGB colour
  I_noise = clip(I + sigma * eps, 0, 1) in [0, 1] pixel space, eps ~ N(0, 1) seeded by (seed, id);
            sigma 0.2
  I_aug   = (I, I_crop) as two images, with P_enh = ENH_TEMPLATE around P (authors' code)
  focus   : y_w = M(I_aug, P_enh),  y_l = M(I_deg, P)
  robust  : y_l = M(I_noise, P_rob),  y_init = M(I, P_rob),  y_w by contrastive amplification of
            the expert EP = (I, P_rob) over the amateur AT = (I_noise, P_rob), both fed the tokens
            chosen so far:
              logits_CA = (1 + lambda_ca) * logits_EP - lambda_ca * logits_AT  on V_head, -inf elsewhere,
              V_head = {v : p_EP(v) >= beta_head * max_u p_EP(u)};  lambda_ca 0.1, beta_head 0.1
            (authors'; VCD's 1.0, 0.1 is the documented alternative)
  null    : a pair whose two responses are equal is dropped (the line stays); a "full" crop has no
            focus pair
Decoding per branch as the authors' scripts (the flags' defaults): focus greedy, robustness sampled
after their instruction, P_rob = ROBUST_INSTRUCTION + " " + P (P alone with --robust-instruction '',
as the toy world's world.json sets: its words are outside the toy vocabulary).
y_init: the paper has amplification "refine" y_init into y_w, with no rule for how. Ours: y_w
samples on its own generator, as VCD samples, and y_init is only stored; --refine-init: y_w draws
y_init's per-step uniforms, so y_w = y_init at lambda_ca = beta_head = 0. Toy world (01's crops of
its first 100 instances, seed 0): y_w differs from y_init in 25 of 81 robustness pairs by default,
13 of 75 with --refine-init; off so the README's results stay.

Input   crops.jsonl (stage 01): "id", "image" (relative to the file), "prompt", "bbox" [x1, y1, x2,
        y2] (int pixels inside the image, x2, y2 exclusive), optional "crop": "full" | "window".
        A bad line: <out>.errors.jsonl.
Output  pairs.jsonl: input fields ("image" relative to it) + "images": {"crop", "deg", "noise"}
        (PNGs in <out stem>_images/), "prompt_enh", "prompt_robust" (P_rob), "focus": {"chosen",
        "rejected"} | null, "robust": {"chosen", "rejected", "init"} | null, "gen"; <out>.args.json.
        A rerun into --out resumes.
Shapes: B instances, R rows of a forward (2B in contrastive amplification: experts, then amateurs),
        T tokens, V vocab.

  python 02_make_pairs.py                      # toy world on CPU (world/model, runs/crops.jsonl)
  python 02_make_pairs.py --model llava-hf/llava-1.5-7b-hf --data runs/crops.jsonl       # one GPU
  torchrun --nproc_per_node=8 02_make_pairs.py --model Qwen/Qwen2.5-VL-7B-Instruct \
      --data runs/crops.jsonl
Ours, where the paper is silent: temperature and top-p act on logits_CA; the amateur reads the tokens
amplification chose (as VCD); responses are equal when their stripped texts are; I_deg's colour is
the rounded mean of the whole image; image placeholder tokens are never generated (such a response
could not be scored with its image); a response's sampler is seeded by (seed, id, role): no
dependence on batch or order.
"""
import argparse
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import signal
import socket
import sys
import traceback
import warnings
import zlib
from pathlib import Path
from typing import NamedTuple

# a model is a local folder or the user's own cache: never download
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor, DynamicCache
from transformers.utils import cached_file

ENH_TEMPLATE = ("Answer the question mainly based on the first image, refer to the cropping details of the second "
                "image if necessary, answer this question: {question}")  # P_enh, the authors' code
ROBUST_INSTRUCTION = ("Strictly answer the following question according to the facts of the image, and control "
                      "the length of the output.")  # put before P by the authors' robust-pair script
FOCUS = ("focus_w", "focus_l")  # the roles decoded with the focus settings
GEN_ARGS = ("temperature", "top_p", "max_new_tokens", "focus_temperature", "focus_max_new_tokens",
            "robust_instruction", "lambda_ca", "beta_head", "sigma", "seed", "refine_init")
RESULT_ARGS = GEN_ARGS + ("model", "enh_template", "data_identity", "model_identity")  # a resume must match


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="world/model",
                   help="reference (base) model: folder or HF cache name")
    p.add_argument("--data", default="runs/crops.jsonl", help="crops.jsonl from stage 01")
    p.add_argument("--out", default="runs/pairs.jsonl", help="output JSONL; images: <out stem>_images/")
    p.add_argument("--sigma", type=at_least(1e-6, float, most=1.0), default=0.2,
                   help="I_noise std in (0, 1], pixel units (paper: 0.2); 0 would leave nothing to resist")
    p.add_argument("--lambda-ca", type=at_least(0.0, float), default=0.1,
                   help="contrastive amplification strength (authors: 0.1; VCD: 1.0)")
    p.add_argument("--beta-head", type=at_least(0.0, float, most=1.0), default=0.1,
                   help="V_head cut-off, share of max p_EP (authors, VCD: 0.1)")
    p.add_argument("--temperature", type=at_least(0.0, float), default=0.2,
                   help="robustness responses: sampling temperature (authors: 0.2); 0 = greedy")
    p.add_argument("--top-p", type=at_least(1e-6, float, most=1.0), default=0.9,
                   help="robustness responses: nucleus sampling mass (authors: 0.9)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=256,
                   help="robustness length cap (authors: 256)")
    p.add_argument("--robust-instruction", help="robustness responses: text put before P ('' = none; default: "
                   "the authors', or '' from the toy world's world.json beside --model)")
    p.add_argument("--refine-init", action="store_true",
                   help="y_w draws y_init's random numbers (ours; header)")
    p.add_argument("--focus-temperature", type=at_least(0.0, float), default=0.0,
                   help="focus responses: sampling temperature (authors: greedy, 0); top-p as above")
    p.add_argument("--focus-max-new-tokens", type=at_least(1), default=150,
                   help="focus length cap (authors: 150)")
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of the noise and of every sampler")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="instances per step")
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu")
    p.add_argument("--limit", type=at_least(1), default=None,
                   help="use only the first N lines of --data")
    p.add_argument("--max-image-pixels", type=at_least(0), default=Image.MAX_IMAGE_PIXELS,
                   help="an image with more pixels is a bad line (a decompression bomb); 0: no limit")
    p.add_argument("--debug", action="store_true", help="show the traceback behind an error message")
    return p.parse_args(argv)


def degraded_image(image, bbox):
    """I_deg = I with the bbox rectangle filled by I's mean RGB colour: what the model attended to is gone."""
    pixels = np.asarray(image, dtype=np.float64).reshape(-1, 3)  # (H * W, 3)
    colour = tuple(int(c) for c in pixels.mean(0).round())
    out = image.copy()
    out.paste(colour, tuple(bbox))  # fills [x1, x2) x [y1, y2), the pixels I.crop(bbox) cuts
    return out


def derived_images(image, bbox, sigma, seed, key):
    """{"crop": I_crop, "deg": I_deg, "noise": I_noise}, the views the pairs are built from (deterministic)."""
    crop = image.crop(tuple(bbox))
    return {"crop": crop, "deg": degraded_image(image, bbox), "noise": add_noise(image, sigma, seed, key)}


class Job(NamedTuple):
    """One response to decode: the context M answers for instance `key` in one role of a pair."""
    key: str  # the instance id
    role: str  # focus_w, focus_l, robust_w, robust_l, init
    prompt: str
    images: list  # PIL images, in the order the prompt shows them
    amateur_images: list = None  # contrastive amplification's amateur (I_noise); None: plain
    draws: str = None  # the role whose sampler (seeded by (seed, id, role)) it draws from; None: its own


def focus_pair_contexts(key, prompt, prompt_enh, image, views, full_crop):
    """Focus pair: [y_w = M(I_aug, P_enh), y_l = M(I_deg, P)], or [] for a full-image crop (no detail added)."""
    if full_crop:
        return []
    return [Job(key, "focus_w", prompt_enh, [image, views["crop"]]),  # I_aug = (I, I_crop)
            Job(key, "focus_l", prompt, [views["deg"]])]


def robust_pair_contexts(key, prompt, image, views, refine_init=False):
    """Robustness pair, prompt P_rob: [y_w by contrastive amplification of the expert (I, P_rob) over the amateur
    (I_noise, P_rob), with y_init's uniforms if refine_init; y_l = M(I_noise, P_rob); y_init = M(I, P_rob)]."""
    draws = "init" if refine_init else None
    return [Job(key, "robust_w", prompt, [image], amateur_images=[views["noise"]], draws=draws),
            Job(key, "robust_l", prompt, [views["noise"]]),
            Job(key, "init", prompt, [image])]


def contrastive_logits(logits_ep, logits_at, lambda_ca, beta_head):
    """logits_CA = (1 + lambda_ca) * logits_EP - lambda_ca * logits_AT on V_head, -inf elsewhere,
    V_head = {v : p_EP(v) >= beta_head * max_u p_EP(u)}: the head keeps amplification from promoting tokens
    the expert itself finds implausible. logits_ep, logits_at: (B, V) next-token logits of the expert (I, P)
    and the amateur (I_noise, P) on the same prefix. Returns (B, V) fp32; lambda_ca = 0: logits_EP on V_head."""
    logits_ep = logits_ep.float()
    logits_at = logits_at.float()
    p_ep = torch.softmax(logits_ep, -1)  # (B, V)
    head = p_ep >= beta_head * p_ep.max(-1, keepdim=True).values  # (B, V) V_head
    logits_ca = (1 + lambda_ca) * logits_ep - lambda_ca * logits_at  # (B, V)
    return logits_ca.masked_fill(~head, float("-inf"))


def next_token(logits, uniforms, temperature, top_p):
    """y_t ~ softmax(logits / temperature) on the top-p nucleus (the most likely tokens until their mass
    reaches top_p), by inverse CDF of one uniform per row; temperature 0 = argmax. logits: (B, V); uniforms:
    (B,) in [0, 1). Returns (B,) token ids; a row depends on its own logits and uniform, not on the batch."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)  # (B, V)
    p, order = probs.sort(dim=-1, descending=True, stable=True)  # (B, V)
    p = torch.where(p.cumsum(-1) - p < top_p, p, 0.0)  # keep a token while the mass before it is below top_p
    cdf = p.cumsum(-1)  # (B, V), unnormalised
    target = uniforms.to(cdf) * cdf[:, -1]  # (B,) u scaled to the nucleus' mass
    j = torch.searchsorted(cdf, target[:, None], right=True)  # (B, 1)
    last = (p > 0).sum(-1, keepdim=True) - 1  # (B, 1) the nucleus' last place
    j = torch.minimum(j, last)  # rounding at u -> 1 stays inside the nucleus
    return order.gather(-1, j).squeeze(-1)


def response_generator(seed, key, role):
    """The sampler of one response: a CPU generator seeded by (seed, id, role), whatever its batch or device."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{key}/{role}".encode("utf-8")))


@torch.no_grad()
def decode(model, inputs, generators, eos_ids, max_new_tokens, temperature=0.2, top_p=0.9,
           lambda_ca=None, beta_head=0.1, use_cache=True, stop_at_eos=True, suppress_ids=()):
    """y_t = next_token(logits_t, u_t) token by token for a left-padded batch, each row up to its first EOS.
    lambda_ca None: plain decoding of the R = B rows. Else contrastive amplification: rows [0, B) are the
    experts (I, P), rows [B, 2B) their amateurs (I_noise, P), one forward of 2B rows a step, logits_t =
    logits_CA, and both halves read the chosen token. inputs: processor output, (R, T) ids and mask;
    generators: B (u_t); suppress_ids: never chosen (image placeholders). Returns B lists of ids, EOS cut."""
    inputs = {k: v.to(model.device, model.dtype) if v.is_floating_point() else v.to(model.device)
              for k, v in inputs.items()}
    ids = inputs.pop("input_ids")  # (R, T)
    mask = inputs.pop("attention_mask")  # (R, T)
    R = ids.shape[0]
    B = R // 2 if lambda_ca is not None else R
    assert len(generators) == B, f"{len(generators)} generators for {B} rows"
    assert lambda_ca is None or torch.equal(ids[:B], ids[B:]), "experts and amateurs must share prompts and sizes"
    next_logits = forward_step(model, inputs, use_cache)  # plumbing: KV cache, positions
    eos = torch.tensor(sorted(eos_ids), device=ids.device)
    new = ids.new_zeros(B, 0)  # (B, t) the tokens chosen so far
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)  # (B,)
    for _ in range(max_new_tokens):
        logits = next_logits(ids, mask)  # (R, V) fp32
        logits[:B, list(suppress_ids)] = float("-inf")  # on the experts: p_EP = 0, out of V_head
        if lambda_ca is not None:
            logits = contrastive_logits(logits[:B], logits[B:], lambda_ca, beta_head)  # (B, V)
        uniforms = torch.cat([torch.rand(1, generator=g) for g in generators])  # (B,) u_t
        token = next_token(logits, uniforms, temperature, top_p)  # (B,)
        token = torch.where(done, eos[0], token)  # a finished row only repeats EOS (cut below)
        new = torch.cat([new, token[:, None]], 1)  # (B, t + 1)
        done = done | torch.isin(token, eos)
        ids = torch.cat([ids, token.repeat(R // B)[:, None]], 1)  # (R, T + t + 1): amateurs too
        mask = torch.cat([mask, mask.new_ones(R, 1)], 1)
        if stop_at_eos and bool(done.all()):
            break
    ends = [next((i for i, t in enumerate(row) if t in eos_ids), len(row)) for row in new.tolist()]
    return [row[:n] for row, n in zip(new.tolist(), ends)]  # up to the first EOS


def respond(model, processor, jobs, args):
    """The texts M answers to Jobs of one branch, one batch with the branch's decoding (focus or robustness
    flags); Jobs with amateur images (y_w) by contrastive amplification: experts, then their amateurs."""
    if not jobs:
        return []
    focus = jobs[0].role in FOCUS
    contrastive = jobs[0].amateur_images is not None
    texts = [chat_prompt(processor, job.prompt, len(job.images)) for job in jobs]
    images = [im for job in jobs for im in job.images]
    if contrastive:
        texts = texts + texts
        images += [im for job in jobs for im in job.amateur_images]
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    generators = [response_generator(args.seed, job.key, job.draws or job.role) for job in jobs]
    ids = decode(model, dict(inputs), generators, eos_token_ids(model, processor),
                 args.focus_max_new_tokens if focus else args.max_new_tokens,
                 args.focus_temperature if focus else args.temperature, args.top_p,
                 args.lambda_ca if contrastive else None, args.beta_head, suppress_ids=placeholder_ids(processor))
    return [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]


def preference_pairs(said):
    """(focus, robust) pairs from an instance's {role: response}; None if not decoded (a full-image crop) or null
    (its two responses are equal, nothing to prefer)."""
    focus = None
    if "focus_w" in said and said["focus_w"] != said["focus_l"]:
        focus = {"chosen": said["focus_w"], "rejected": said["focus_l"]}
    robust = None
    if said["robust_w"] != said["robust_l"]:
        robust = {"chosen": said["robust_w"], "rejected": said["robust_l"], "init": said["init"]}
    return focus, robust


def make_pairs(model, processor, args, batch):
    """Input rows -> each one's output line or why it is bad, by the paper's steps: derived images; the focus and
    robustness pairs' contexts; their responses, one batch per branch; null pairs dropped."""
    lines = []
    jobs = []
    for row in batch:
        image, problem = read_line(row)  # plumbing: the image; "bbox" and "crop" checked
        if problem:
            lines.append(problem)
            continue
        key = str(row["id"])
        views = derived_images(image, row["bbox"], args.sigma, args.seed, key)
        prompt = row["prompt"]
        prompt_enh = ENH_TEMPLATE.format(question=prompt)
        prompt_robust = f"{args.robust_instruction} {prompt}" if args.robust_instruction else prompt
        mine = focus_pair_contexts(key, prompt, prompt_enh, image, views, row.get("crop") == "full")
        mine += robust_pair_contexts(key, prompt_robust, image, views, args.refine_init)
        problem = context_problem(model, processor, mine, args)  # plumbing: past the positions?
        if problem:
            lines.append(problem)
            continue
        jobs += mine
        lines.append(output_line(row, views, prompt_enh, prompt_robust, args))  # PNGs written
    said = {}  # id -> {role: response}; ids are unique (read_instances)
    for branch in (FOCUS, ("robust_l", "init"), ("robust_w",)):  # focus; plain; contrastive
        group = [job for job in jobs if job.role in branch]
        for job, text in zip(group, respond(model, processor, group, args)):
            said.setdefault(job.key, {})[job.role] = text
    for line in lines:
        if isinstance(line, dict):
            line["focus"], line["robust"] = preference_pairs(said[str(line["id"])])
    return lines


def main(argv=None):
    exits_in_one_sentence("rerun the same command: it continues where this run stopped")
    args = parse_args(argv)
    # ---- plumbing: processes, the lock on --out, the input lines, the settings, the model ----
    Image.MAX_IMAGE_PIXELS = args.max_image_pixels or None
    torch.manual_seed(args.seed)
    rank, world, device = dist_setup(args.device)
    if Path(args.model).exists():  # a local folder: a resume compares where it is, not its spelling
        args.model = str(Path(args.model).resolve())
    on_rank0(lambda: claim_out(args.out, {"--data": args.data}), rank, world)
    rows, errors = read_instances(args.data, ("image", "prompt", "bbox"), args.limit)
    settings = world_settings(args, "02", {"robust_instruction": ROBUST_INSTRUCTION})
    if rank == 0:
        print(settings, flush=True)
    if not rows:  # every line bad: run_rows lists them and exits non-zero, before a model loads
        return run_rows(rows, errors, None, args.out, args.batch_size, rank, world)
    args.data_identity = file_identity(args.data)  # a rerun into --out compares these
    args.model_identity = model_identity(args.model)
    model, processor = load_model(args.model, device)
    check_two_images(processor)
    args.enh_template = ENH_TEMPLATE  # recorded: a resume made with another P_enh is refused
    on_rank0(lambda: save_args(args, args.out, RESULT_ARGS), rank, world)
    # ---- the method, a batch at a time: derived images, focus and robustness pairs, null pairs dropped ----
    result = run_rows(rows, errors, lambda batch: make_pairs(model, processor, args, batch),
                      args.out, args.batch_size, rank, world, desc="pairs")
    if rank == 0:
        n = {b: sum(r[b] is not None for r in result) for b in ("focus", "robust")}
        print(f"{len(result)} lines: {n['focus']} focus pairs, {n['robust']} robustness pairs (the rest null)")
    if world > 1:
        dist.destroy_process_group()


# ==================================================================================================
# Appendix: plumbing. A first reading may skip everything below: the stage's own input/output, then
# helpers several stages need, copied verbatim between "# ---- shared: NAME ----" rulers so each
# script stands alone (tests/test_shared_blocks.py keeps every copy identical).
# ==================================================================================================
# ---- plumbing: the model's forward while decoding, input checks, images on disk ----
def forward_step(model, inputs, use_cache=True):
    """step(ids, mask (R, T + t)) -> (R, V) fp32 next-token logits: the first call reads the prompt and its
    images (`inputs`) into a KV cache, later calls only the newest token (use_cache=False: the whole sequence).
    Positions count the mask (left padding); Qwen-VL's M-RoPE adds the deltas its prefill leaves."""
    mrope = hasattr(model.model, "rope_deltas")
    mm = inputs.pop("mm_token_type_ids", None)  # (R, T) 0 text, 1 image
    cache = DynamicCache(config=model.config) if use_cache else None
    deltas = []  # M-RoPE: the prefill's (R, 1) deltas

    def step(ids, mask):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (R, T + t)
        if cache is not None and cache.get_seq_length() > 0:  # the cache holds all but the newest
            pos = positions[:, -1:]  # (R, 1)
            if mrope:
                pos = pos[None].expand(3, -1, -1) + deltas[0]  # (3, R, 1)
            out = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=pos, cache=cache,
                        use_cache=True, logits_to_keep=1)
            return out.logits[:, -1].float()
        extra = dict(inputs)
        if mm is not None:  # the tokens generated so far are text
            extra["mm_token_type_ids"] = F.pad(mm, (0, ids.shape[1] - mm.shape[1]))
        if mrope:
            model.model.rope_deltas = None  # else the previous batch's deltas are reused
        out = model(input_ids=ids, attention_mask=mask, position_ids=None if mrope else positions,
                    cache=cache, use_cache=use_cache, logits_to_keep=1, **extra)
        # a forward that does not know `cache=` swallows it in **kwargs: decoding would run blind
        assert cache is None or cache.get_seq_length() == ids.shape[1], \
            f"the KV cache holds {cache.get_seq_length()} of {ids.shape[1]} tokens: cache= was ignored"
        deltas[:] = [model.model.rope_deltas] if mrope else []
        return out.logits[:, -1].float()
    return step


def read_line(row):
    """(image, None) for a usable input row, else (None, why not): "crop" (optional) is "full" or "window",
    the image reads, "bbox" is 4 ints (not bools) with 0 <= x1 < x2 <= W, 0 <= y1 < y2 <= H."""
    bbox = row["bbox"]
    if row.get("crop", "window") not in ("full", "window"):
        return None, f"field 'crop' must be \"full\" or \"window\", not {row['crop']!r}"
    try:
        image = load_image(row["_image"])
    except (OSError, ValueError) as e:
        return None, f"unreadable image {row['_image']}: {e}"
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(type(v) is int for v in bbox)):
        return None, f"bbox must be 4 integers [x1, y1, x2, y2], got {bbox!r}"
    x1, y1, x2, y2 = bbox
    W, H = image.size
    if not (0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H):
        return None, f"bbox {bbox} is not a box inside the {W}x{H} image (0 <= x1 < x2 <= W, 0 <= y1 < y2 <= H)"
    return image, None


def context_problem(model, processor, jobs, args):
    """None, or why one of an instance's contexts cannot be decoded (prompt_problems, with its length cap)."""
    texts = [chat_prompt(processor, job.prompt, len(job.images)) for job in jobs]
    caps = [args.focus_max_new_tokens if job.role in FOCUS else args.max_new_tokens for job in jobs]
    return next(filter(None, prompt_problems(model, processor, texts, [job.images for job in jobs], caps,
                                             "new tokens (--max-new-tokens, --focus-max-new-tokens)")), None)


def file_stem(key):
    """A file name for an id: unsafe characters become "_", and a changed or capitalised id gets its
    crc32 (no two ids share a file, even on a case-insensitive disk)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(key))[:100].lstrip(".") or "_"
    return safe if safe == str(key) == safe.lower() else f"{safe}-{zlib.crc32(str(key).encode()):08x}"


def output_line(row, views, prompt_enh, prompt_robust, args):
    """An instance's output line, its pairs still to fill; its views saved as PNGs in <out stem>_images/."""
    out = Path(args.out)
    folder = out.parent / f"{out.stem}_images"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{file_stem(row['id'])}.{name}.png" for name in views}
    for name, view in views.items():
        view.save(paths[name], format="PNG")
    return {**row, "image": relpath_for(out, row["_image"]),
            "images": {name: relpath_for(out, path) for name, path in paths.items()},
            "prompt_enh": prompt_enh, "prompt_robust": prompt_robust, "focus": None, "robust": None,
            "gen": {k: vars(args)[k] for k in GEN_ARGS}}


def eos_token_ids(model, processor):
    """Every id that ends a response: the generation config's (an int or a list), the tokenizer's."""
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, (list, tuple)) else [eos]
    return {e for e in [*eos, processor.tokenizer.eos_token_id] if e is not None}


def placeholder_ids(processor):
    """Ids of the image and video placeholder tokens, which a response must never contain."""
    tokens = [getattr(processor, name, None) for name in ("image_token", "video_token")]
    return sorted({processor.tokenizer.convert_tokens_to_ids(t) for t in tokens if isinstance(t, str)})


def check_two_images(processor):
    """I_aug is two images: a processor that refuses a two-image prompt ends the run here, not mid-batch."""
    img = Image.new("RGB", (32, 32))
    try:
        processor(text=[chat_prompt(processor, "x", 2)], images=[img, img], return_tensors="pt")
    except Exception as e:  # noqa: BLE001 (whatever the refusal)
        fail(f"--model: its processor refuses two images ({type(e).__name__}), and I_aug = (I, I_crop) is two")
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


# ---- shared: noise ----
def add_noise(image, sigma, seed, key):
    """I_noise = clip(I + sigma * eps, 0, 1) in [0, 1] pixel space, eps ~ N(0, 1) from a generator
    seeded by (seed, key): the same image gets the same noise in every stage and process."""
    if sigma == 0:
        return image.copy()
    rng = np.random.default_rng([seed, zlib.crc32(str(key).encode("utf-8"))])
    x = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    eps = rng.standard_normal(x.shape, dtype=np.float32)
    x = np.clip(x + sigma * eps, 0.0, 1.0)
    return Image.fromarray(np.round(x * 255.0).astype(np.uint8))
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


# ---- shared: world ----
def world_settings(args, stage, defaults):
    """Set the flags in `defaults` (name -> the paper's value) left unset (None): to the toy world's value when
    --model is a folder beside a world.json (00 writes its "stages"), else the paper's. Returns a line to print."""
    path = os.path.join(os.path.dirname(os.path.abspath(args.model)), "world.json")
    tuned = {}
    if os.path.isdir(args.model) and os.path.isfile(path):
        tuned = json.loads(Path(path).read_text()).get("stages", {}).get(stage, {})
    taken = []
    for name, paper in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tuned.get(name, paper))
            if name in tuned:
                taken.append(f"--{name.replace('_', '-')} {tuned[name]!r}")
    if taken:
        return f"settings from {path}: {', '.join(taken)} (a flag overrides them)"
    if tuned:
        return f"settings from {path}: none taken (the flags given override them)"
    return f"settings: the paper's defaults (no toy-world setting for stage {stage})"
# ---- end shared ----


if __name__ == "__main__":
    main()

"""Stage 03: reference log-probs for every loss term, the DDW CLIP gain ratio, the PPL + margin filter, the IPS report.

Paper: P2-DPO (ICLR 2026), data filtering, dynamic deficiency weighting (DDW), implicit preference
strength (IPS). pi_ref: the base model, frozen; log pi_ref(y | c) sums the response tokens and EOS
(prompt and image tokens masked), log-softmax in fp32, so stage 04 never holds a reference model.
P': the user text 02 decoded the robust pair from ("prompt_robust": the authors' instruction + " " + P;
P when it is empty, as on the toy world). 04 trains in the contexts of 1a; the filter reads 1b.
  1a. ref.focus_w, ref.focus_l         = log pi_ref(y | I, P)               04's DPO_focus
      ref.calib_aug_w, ref.calib_deg_w = log pi_ref(y_w | I_aug, P_enh), log pi_ref(y_w | I_deg, P)
                                         04's L_calib (calib_aug_l, calib_deg_l: the same for y_l)
      ref.robust_w, ref.robust_l       = log pi_ref(y | I_noise, P)         04's DPO_rob
  1b. ref.robust_expert_w              = log pi_ref(y_w | I, P')            the expert's context
      ref.robust_own_l                 = log pi_ref(y_l | I_noise, P')      only where P' != P
  2.  CLIPScore(t, i) = 2.5 * max(cos(E_t(t), E_i(i)), 0)  (Hessel et al. 2021)
      r = CLIPScore(P, I_crop) / CLIPScore(P, I)
  3.  PPL(y) = exp(-log pi_ref(y | c(y)) / n(y)),  n(y): response tokens + EOS ("ntok")
      M      = log pi_ref(y_w | c(y_w)) / n(y_w) - log pi_ref(y_l | c(y_l)) / n(y_l)
      c(y): where y was decoded (authors' code): focus y_w (I_aug, P_enh), y_l (I_deg, P); robust
      y_w (I, P') (contrastive amplification's expert), y_l (I_noise, P'); --filter-context dpo:
      the branch's DPO context for both, (I, P) or (I_noise, P)
  4.  a branch is kept iff PPL(y_w) < max_ppl, PPL(y_l) < max_ppl, margin_low <= M <= margin_high
      (authors': 2.5, [-0.174, 0.208]); a line that keeps no branch goes to <out>.dropped.jsonl
  5.  IPS = log pi_ref(y_w | c) - log pi_ref(y_l | c), c the DPO context: per branch, mean, std,
      share < 0, over all and over kept pairs

Input   pairs.jsonl (stage 02; paths relative to it): "id", "image", "prompt", "prompt_enh",
        "prompt_robust" (older files: built from "gen": {"robust_instruction"}), "images": {"crop",
        "deg", "noise", ["aug": a stitched I_aug; else (I, I_crop)]}, "focus" / "robust": {"chosen",
        "rejected"} | null, "bbox". A bad field or image, or a context + response past the model's
        positions, is that line's error. --score-only: {"id", "image", "prompt" | "question",
        "chosen", "rejected"}, scored under (I, P) as the branch "pair"; the report only.
Output  <out> (train.jsonl): the lines that keep a branch, their input fields (paths relative to <out>)
        + "ref" and "ntok" {the terms of 1; null where the pair is}, "clip": {"crop", "image",
        "ratio"} | null, "ppl", "margin", "filter_context", "keep": {"focus", "robust"}, "why":
        {branch: [reasons dropped]}; <out>.dropped.jsonl: the other lines; <out>.report.json: per
        branch the pairs kept and dropped by reason, IPS, M and PPL, then r; <out>.errors.jsonl;
        <out>.args.json; <out>.scores: the lines scored before the filter, the resume checkpoint (a
        rerun scores new ids only, and re-filters without a model).
Shapes: R scoring rows in a forward (up to 10 a line), B lines, D CLIP embedding width.

Launch: the toy world on CPU; one GPU; 8 GPUs:
  python 03_filter.py --model world/model --clip world/clip --data runs/pairs.jsonl --out runs/train.jsonl
  python 03_filter.py --model llava-hf/llava-1.5-7b-hf --clip ViT-L-14 --data runs/pairs.jsonl --batch-size 32
  torchrun --nproc_per_node=8 03_filter.py --model Qwen/Qwen2.5-VL-7B-Instruct --clip ViT-L-14 --data runs/pairs.jsonl

Choices the paper leaves open (ours): token means divide by n(y), EOS included (what the loss
sums); the PPL bound is strict, the margin band inclusive; CLIPScore's text is P as written, cut
to the CLIP context; r is null when CLIPScore(P, I) = 0; the report counts every check a pair
fails. Measured on the toy world (seed 0): the own contexts keep 253 of 315 focus and 229 of 305
robust pairs; --filter-context dpo keeps 70 and 67 (out of the margin band: 223 focus and 237
robust pairs; PPL >= 2.5: 120 robust y_w under I_noise, 172 focus y_l under (I, P), contexts they
were not decoded in).
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

# models and CLIP weights come from local folders or your cache
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import cached_file



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="world/model", help="the reference (04's base) model")
    p.add_argument("--clip", default="world/clip", help="open_clip model for DDW: a local-dir folder "
                   "(the toy world's), a name such as ViT-L-14 (the paper's CLIP), or none")
    p.add_argument("--clip-pretrained", default="openai",
                   help="a named --clip's weights: a cached tag or a file (ours: CLIP's original)")
    p.add_argument("--data", default="runs/pairs.jsonl", help="02's pairs (--score-only: any pairs)")
    p.add_argument("--out", default="runs/train.jsonl", help="04's train.jsonl; other files named after it")
    p.add_argument("--max-ppl", type=at_least(0.0, float), default=2.5,
                   help="keep a pair when PPL(y_w), PPL(y_l) < this (authors'); above 1")
    p.add_argument("--margin-low", type=at_least(-math.inf, float), default=-0.174,
                   help="keep a pair when M >= this (authors')")
    p.add_argument("--margin-high", type=at_least(-math.inf, float), default=0.208,
                   help="keep a pair when M <= this (authors'); at least --margin-low")
    p.add_argument("--filter-context", choices=("own", "dpo"), default="own", help="PPL and M score "
                   "a response where it was decoded (own, authors' code) or in its DPO context")
    p.add_argument("--score-only", action="store_true",
                   help="score preference pairs, write the IPS report only (paper: on- vs off-policy)")
    p.add_argument("--seed", type=at_least(0), default=0, help="global seed (kept for the chain)")
    p.add_argument("--batch-size", type=at_least(1), default=16,
                   help="scoring rows per forward, lines per step of the resumable loop")
    p.add_argument("--device", type=device_name,
                   default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--limit", type=at_least(1), default=None, help="score the first N lines only")
    p.add_argument("--max-image-pixels", type=at_least(0), default=Image.MAX_IMAGE_PIXELS,
                   help="an image with more pixels is a bad line (decompression bombs); 0: no limit")
    p.add_argument("--debug", action="store_true", help="show the traceback behind an error")
    args = p.parse_args(argv)
    # the flags together, before any model loads: a filter that cannot keep a pair is refused
    if args.max_ppl <= 1:
        p.error(f"--max-ppl {args.max_ppl:g} keeps no pair: PPL is at least 1, the bound strict")
    if args.margin_low > args.margin_high:
        p.error(f"--margin-low {args.margin_low:g} is above --margin-high {args.margin_high:g}: "
                f"no margin is in the band, so no pair would be kept")
    return args


# the arguments that change the scores: a rerun into <out> must match them
SCORE_ARGS = ("model", "clip", "clip_pretrained", "score_only", "data_identity", "model_identity")


# ---- 1. The reference log-probs of every loss term ----
# ref key -> (branch, response, prompt field, context images): 1a, what 04's loss reads, then 1b
TERMS = {
    "focus_w": ("focus", "chosen", "prompt", "image"),
    "focus_l": ("focus", "rejected", "prompt", "image"),
    "calib_aug_w": ("focus", "chosen", "prompt_enh", "aug"),
    "calib_deg_w": ("focus", "chosen", "prompt", "deg"),
    "calib_aug_l": ("focus", "rejected", "prompt_enh", "aug"),
    "calib_deg_l": ("focus", "rejected", "prompt", "deg"),
    "robust_w": ("robust", "chosen", "prompt", "noise"),
    "robust_l": ("robust", "rejected", "prompt", "noise"),
    "robust_expert_w": ("robust", "chosen", "prompt_robust", "image"),
    "robust_own_l": ("robust", "rejected", "prompt_robust", "noise"),
}
# --score-only: one pair a line, under (I, P)
PAIR_TERMS = {"pair_w": ("pair", "chosen", "prompt", "image"),
              "pair_l": ("pair", "rejected", "prompt", "image")}
# branch -> its DPO terms (y_w, y_l): the context c of IPS (and of --filter-context dpo)
DPO_TERMS = {"focus": ("focus_w", "focus_l"), "robust": ("robust_w", "robust_l"),
             "pair": ("pair_w", "pair_l")}
# --filter-context -> branch -> the terms (y_w, y_l) PPL and M read; own: c(y) of the docstring's 3.
FILTER_TERMS = {"own": {"focus": ("calib_aug_w", "calib_deg_l"),
                        "robust": ("robust_expert_w", "robust_own_l"), "pair": ("pair_w", "pair_l")},
                "dpo": DPO_TERMS}


def robust_prompt(row):
    """P': "prompt_robust", the user text 02 decoded the robust pair from; in an older pairs file built
    as 02 builds it, the authors' instruction + " " + P (P when it is empty) from "gen"."""
    if row.get("prompt_robust") is not None:
        if not is_text(row["prompt_robust"]):
            raise ValueError(f"'prompt_robust' must be text, not {row['prompt_robust']!r:.60}")
        return row["prompt_robust"]
    gen = row["gen"] if row.get("gen") is not None else {}
    instruction = gen.get("robust_instruction", "") if isinstance(gen, dict) else None
    if not isinstance(instruction, str):
        raise ValueError(f"'gen' must hold a text 'robust_instruction', not {gen!r:.60}")
    return f"{instruction} {row['prompt']}".strip()


def scoring_rows(line, terms):
    """[(term, prompt, response, context images, context)]: a row per term whose branch has a pair
    in read_line's line; robust_own_l only where P' != P (else its row is robust_l's)."""
    rows = []
    for term, (branch, side, prompt, context) in terms.items():
        if branch in line["pairs"] and (term != "robust_own_l" or line[prompt] != line["prompt"]):
            response = line["pairs"][branch][side]
            rows.append((term, line[prompt], response, line["contexts"][context], context))
    return rows


@torch.inference_mode()
def score_rows(model, processor, rows, batch_size):
    """[(summed log pi_ref(y | c), n(y))] of (prompt, response, images, context) rows, in row order,
    by the shared block 04 also uses. A forward holds rows of one context (same image count)."""
    scores = [None] * len(rows)
    for context in dict.fromkeys(r[3] for r in rows):
        group = [i for i, r in enumerate(rows) if r[3] == context]  # in input order
        for k in range(0, len(group), batch_size):
            chunk = group[k:k + batch_size]
            prompts, responses, images, _ = zip(*[rows[i] for i in chunk])
            inputs, mask = build_batch(processor, prompts, responses, images)  # mask: (R, T)
            logp, ntok = response_logprobs(model, inputs, mask)  # (R,), (R,)
            for i, a, n in zip(chunk, logp.tolist(), ntok.tolist()):
                scores[i] = (a, int(n))
    return scores


def reference_logprobs(lines, results, reference, terms, batch_size):
    """{i: {term: (summed log pi_ref(y | c), n(y))}} for lines {i: line}. A line whose context +
    response passes the model's positions (garbage, not an error, in the model) leaves `lines`,
    its reason in results[i]. reference(): (model, processor)."""
    rows = [(i, r) for i, line in lines.items() for r in scoring_rows(line, terms)]
    if not rows:
        return {i: {} for i in lines}
    model, processor = reference()
    # the response as text after its prompt: its tokens count, a placeholder in it is found
    texts = [chat_prompt(processor, r[1], len(r[3])) + r[2] for _, r in rows]
    fits = prompt_problems(model, processor, texts, [r[3] for _, r in rows], [1] * len(rows),
                           "EOS token")
    for (i, r), problem in zip(rows, fits):
        if problem and i in lines:
            results[i] = f"{r[0]}: {problem}"
            del lines[i]
    rows = [(i, r) for i, r in rows if i in lines]
    scores = {i: {} for i in lines}
    for (i, r), s in zip(rows, score_rows(model, processor, [r[1:] for _, r in rows], batch_size)):
        scores[i][r[0]] = s
    return scores


# ---- 2. The CLIP gain ratio of dynamic deficiency weighting ----
def clip_score(text_features, image_features):
    """CLIPScore(t, i) = 2.5 * max(cos(E_t(t), E_i(i)), 0) (Hessel et al. 2021).
    (B, D), (B, D) -> (B,) fp32."""
    cos = F.cosine_similarity(text_features.float(), image_features.float(), dim=-1)  # (B,)
    return 2.5 * cos.clamp(min=0.0)


def gain_ratio(clip_crop, clip_image):
    """r = CLIPScore(P, I_crop) / CLIPScore(P, I): above 1 when the crop fits the prompt better
    than the whole image (DDW then leans to the focus branch); None when CLIPScore(P, I) = 0."""
    return clip_crop / clip_image if clip_image > 0 else None


@torch.inference_mode()
def clip_scores(clip, prompts, images, crops):
    """[{"crop", "image", "ratio"}] for B (P, I, I_crop): CLIPScore(P, I_crop), CLIPScore(P, I), r."""
    model, preprocess, tokenizer = clip
    device = next(model.parameters()).device
    text = model.encode_text(tokenizer(prompts).to(device))  # (B, D); P cut to the CLIP context
    pixels = torch.stack([preprocess(im) for im in images + crops]).to(device)  # (2B, C, H, W)
    vision = model.encode_image(pixels)  # (2B, D): the images, then the crops
    full = clip_score(text, vision[:len(images)]).tolist()
    crop = clip_score(text, vision[len(images):]).tolist()
    return [{"crop": c, "image": i, "ratio": gain_ratio(c, i)} for c, i in zip(crop, full)]


def score_batch(batch, args, reference, clip, out):
    """Steps 1 and 2 for a batch of input rows (run_rows' work): each row -> its scored line (the
    input fields, paths relative to `out`, + "ref", "ntok", "clip") or why it cannot be scored.
    reference(), clip(): the models, loaded on first use (re-filtering alone needs neither)."""
    terms = PAIR_TERMS if args.score_only else TERMS
    results = [None] * len(batch)
    lines = {}  # index in the batch -> the line read_line made of its row
    for i, row in enumerate(batch):
        try:
            lines[i] = read_line(row, args.score_only)
        except ValueError as e:
            results[i] = str(e)
    # 1. every reference log-prob of the batch (rows of several lines share forwards)
    scores = reference_logprobs(lines, results, reference, terms, args.batch_size)
    # 2. r of the lines with a focus pair
    focus = [i for i, line in lines.items() if "focus" in line["pairs"] and args.clip != "none"]
    ddw = {}
    if focus:
        pil = [lines[i]["pil"] for i in focus]
        ddw = dict(zip(focus, clip_scores(clip(), [lines[i]["prompt"] for i in focus],
                                          [x["image"] for x in pil], [x["crop"] for x in pil])))
    for i in lines:
        s = scores[i]
        keys = [t for t in terms if t in s or t != "robust_own_l"]  # robust_own_l: where scored
        results[i] = {**relative_paths(batch[i], out),
                      "ref": {t: s[t][0] if t in s else None for t in keys},
                      "ntok": {t: s[t][1] if t in s else None for t in keys},
                      "clip": ddw.get(i)}
    return results


# ---- 3. Perplexity and margin ----
def perplexity(logp, ntok):
    """PPL(y) = exp(-log pi_ref(y | c) / n(y)). logp: the summed log-prob; ntok: n(y), EOS included."""
    try:
        return math.exp(-logp / ntok)
    except OverflowError:  # a mean log-prob below -709: out of any PPL bound
        return math.inf


def mean_margin(logp_w, ntok_w, logp_l, ntok_l):
    """M = log pi_ref(y_w | c) / n(y_w) - log pi_ref(y_l | c) / n(y_l): per-token means, hence the
    narrow band."""
    return logp_w / ntok_w - logp_l / ntok_l


def with_ppl_and_margin(line, branches, context):
    """A scored line + "ppl": {"<branch>_w", "<branch>_l"}, "margin": {branch} (None without a pair)
    and "filter_context": y_w and y_l each scored by its term in FILTER_TERMS[context]."""
    scores = {t: (v, line["ntok"][t]) for t, v in line["ref"].items() if v is not None}
    if "robust_own_l" not in line["ref"] and "robust_l" in scores:  # P' = P: the same context
        scores["robust_own_l"] = scores["robust_l"]
    ppl = {}
    margin = {}
    for b in branches:
        w, l = FILTER_TERMS[context][b]
        have = w in scores
        ppl[f"{b}_w"] = perplexity(*scores[w]) if have else None
        ppl[f"{b}_l"] = perplexity(*scores[l]) if have else None
        margin[b] = mean_margin(*scores[w], *scores[l]) if have else None
    return {**line, "ppl": ppl, "margin": margin, "filter_context": context}


# ---- 4. The filter ----
REASONS = ("no pair", "ppl chosen", "ppl rejected", "margin low", "margin high")


def filter_reasons(ppl_w, ppl_l, margin, max_ppl, margin_low, margin_high):
    """Why a pair is dropped ([] = kept): it needs PPL(y_w) < max_ppl, PPL(y_l) < max_ppl and
    margin_low <= M <= margin_high. Every failed check is listed; a NaN fails its checks."""
    checks = (
        ("ppl chosen", ppl_w < max_ppl),
        ("ppl rejected", ppl_l < max_ppl),
        ("margin low", margin >= margin_low),
        ("margin high", margin <= margin_high),
    )
    return [reason for reason, ok in checks if not ok]


def apply_filter(line, branches, max_ppl, margin_low, margin_high):
    """A line with "ppl" and "margin" + "keep": {branch: bool} and "why": {branch: [reasons]}."""
    why = {}
    for b in branches:
        if line["margin"].get(b) is None:
            why[b] = ["no pair"]
        else:
            why[b] = filter_reasons(line["ppl"][f"{b}_w"], line["ppl"][f"{b}_l"],
                                    line["margin"][b], max_ppl, margin_low, margin_high)
    return {**line, "keep": {b: not r for b, r in why.items()}, "why": why}


# ---- 5. The implicit-preference-strength report ----
def implicit_preference_strength(ref_w, ref_l):
    """IPS = log pi_ref(y_w | c) - log pi_ref(y_l | c), summed log-probs under the DPO context.
    (n,), (n,) -> (n,)."""
    return np.asarray(ref_w, dtype=np.float64) - np.asarray(ref_l, dtype=np.float64)


def summary(values):
    """n, mean, std (population), min, median, max and share < 0; None fields when it is empty."""
    x = np.asarray(values, dtype=np.float64)  # (n,)
    if not len(x):
        return {"n": 0, **dict.fromkeys(("mean", "std", "min", "median", "max", "negative"))}
    return {"n": len(x), "mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
            "median": float(np.median(x)), "max": float(x.max()), "negative": float((x < 0).mean())}


def filter_report(lines, branches, args):
    """Per branch: pairs kept, dropped and why, IPS over all and over kept pairs, M and PPL; then r
    over all lines and over the lines that keep both branches."""
    thresholds = {k: vars(args)[k] for k in ("max_ppl", "margin_low", "margin_high", "filter_context")}
    report = {"lines": len(lines), "written": sum(any(x["keep"].values()) for x in lines),
              "thresholds": thresholds, "branches": {}}
    for b in branches:
        w, l = DPO_TERMS[b]
        pairs = [x for x in lines if x["margin"].get(b) is not None]
        kept = [x for x in pairs if x["keep"][b]]
        ips = {k: summary(implicit_preference_strength([x["ref"][w] for x in xs],
                                                       [x["ref"][l] for x in xs]))
               for k, xs in (("ips_all", pairs), ("ips_kept", kept))}
        report["branches"][b] = {
            "pairs": len(pairs), "kept": len(kept), "dropped": len(lines) - len(kept),
            # a pair can fail several checks: the reasons can add up to more than the dropped
            "reasons": {r: sum(r in x["why"][b] for x in lines) for r in REASONS},
            **ips,
            "margin": summary([x["margin"][b] for x in pairs]),
            "ppl_chosen": summary([x["ppl"][f"{b}_w"] for x in pairs]),
            "ppl_rejected": summary([x["ppl"][f"{b}_l"] for x in pairs]),
        }
    ratios = [x["clip"]["ratio"] for x in lines if x.get("clip") and x["clip"]["ratio"] is not None]
    above_1 = float(np.mean(np.array(ratios) > 1)) if ratios else None
    report["clip_ratio"] = {**summary(ratios), "above_1": above_1}
    # DDW weighs the branches of a line only where it keeps both (else 1.0 on the one it keeps)
    both = [x for x in lines if len(branches) > 1 and all(x["keep"].values())]
    report["kept_both"] = len(both)
    ratios = [x["clip"]["ratio"] for x in both if x.get("clip") and x["clip"]["ratio"] is not None]
    # p05, p95: where DDW's alpha = 0.2 tanh((r - 1) / 0.1) lands
    spread = np.percentile(ratios, [5, 95]).tolist() if ratios else [None, None]
    report["clip_ratio_kept_both"] = {**summary(ratios), "p05": spread[0], "p95": spread[1]}
    return report


def main(argv=None):
    exits_in_one_sentence("rerun the same command: it continues where this run stopped")
    args = parse_args(argv)  # the flags are checked together here, before any model loads
    # ---- plumbing: devices, the lock on --out, the input lines, what a rerun must match ----
    for k in ("model", "clip"):  # a local folder: a resume compares where it is, not its spelling
        if os.path.isdir(vars(args)[k]):
            setattr(args, k, str(Path(vars(args)[k]).resolve()))
    Image.MAX_IMAGE_PIXELS = args.max_image_pixels or None
    rank, world, device = dist_setup(args.device)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    scores = out.with_suffix(".scores")  # every scored line: the resume checkpoint
    on_rank0(lambda: claim_out(out, {"--data": args.data}), rank, world)
    fields = ("image",) if args.score_only else ("image", "prompt")
    rows, errors = read_instances(args.data, fields, args.limit)
    if not rows:  # every line bad: run_rows lists them and exits non-zero, before a model loads
        return run_rows(rows, errors, None, scores, args.batch_size, rank, world)
    args.data_identity = file_identity(args.data)
    args.model_identity = model_identity(args.model)
    on_rank0(lambda: save_args(args, scores, SCORE_ARGS), rank, world)
    reference = functools.lru_cache(maxsize=1)(lambda: load_model(args.model, device))
    clip = functools.lru_cache(maxsize=1)(lambda: load_clip(args.clip, args.clip_pretrained, device))
    # ---- end plumbing ----

    # 1. + 2. the reference log-probs of every term, then the CLIP gain ratio, a batch at a time
    scored = run_rows(rows, errors, lambda batch: score_batch(batch, args, reference, clip, scores),
                      scores, args.batch_size, rank, world, desc="03 scoring")
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:  # rank 0 alone filters, reports and writes
        return
    # 3. + 4. PPL and M in the --filter-context, then the filter under this run's thresholds
    branches = ("pair",) if args.score_only else ("focus", "robust")
    lines = [apply_filter(with_ppl_and_margin(x, branches, args.filter_context), branches,
                          args.max_ppl, args.margin_low, args.margin_high) for x in scored]
    # 5. the report: kept and dropped per branch and reason, IPS, PPL, M and r
    report = filter_report(lines, branches, args)
    write_outputs(lines, report, args, out)
    if not report["written"] and not args.score_only:
        fail(f"no line keeps a branch: {out} is empty (see the report; "
             f"the thresholds are --max-ppl, --margin-low, --margin-high)")


# ==================================================================================================
# Appendix: plumbing. A first reading may skip everything below: the stage's own input/output
# and printing, then helpers that several stages need, copied verbatim between
# "# ---- shared: NAME ----" rulers so each script stands alone (tests/test_shared_blocks.py
# keeps every copy identical).
# ==================================================================================================
# ---- plumbing: an input line, the CLIP model, the outputs ----
def read_line(row, score_only):
    """The prompts, pairs and context images (each decoded once) of a read_instances row, which
    checked "id", "image" and, but with --score-only, "prompt". ValueError: why it cannot be scored."""
    pairs = {"pair": row} if score_only else {b: row[b] for b in ("focus", "robust")
                                              if row.get(b) is not None}
    for b, pair in pairs.items():  # an empty response is a response (EOS alone), not an error
        if not (isinstance(pair, dict) and all(isinstance(pair.get(k), str)
                                               for k in ("chosen", "rejected"))):
            where = "the line" if score_only else f"'{b}'"
            raise ValueError(f"{where} needs text fields 'chosen' and 'rejected' (or is null)")
    prompt = row.get("prompt") or row.get("question")
    if not is_text(prompt):
        raise ValueError("missing or empty 'prompt' (or 'question')")
    if "focus" in pairs and not is_text(row.get("prompt_enh")):
        raise ValueError("a focus pair needs 'prompt_enh' (non-empty text)")
    images = {} if score_only else row.get("images", {})
    if not isinstance(images, dict):
        raise ValueError(f"'images' must be an object of image paths, not {images!r:.60}")
    bbox = None if score_only else row.get("bbox")
    if bbox is not None and not (isinstance(bbox, list) and len(bbox) == 4
                                 and all(type(v) is int for v in bbox)):  # a bool is no pixel
        raise ValueError(f"'bbox' must be 4 integers [x1, y1, x2, y2], not {bbox!r:.60}")
    roles = {"image": row["image"]}  # role -> image path, relative to the row's JSONL unless absolute
    if "focus" in pairs:
        roles.update(crop=images.get("crop"), deg=images.get("deg"))
        if images.get("aug"):  # a stitched I_aug (else I_aug is (I, I_crop))
            roles["aug"] = images["aug"]
    if "robust" in pairs:
        roles["noise"] = images.get("noise")
    pil = {}
    for role, path in roles.items():
        if not is_text(path):
            raise ValueError(f"images.{role} must be an image path, not {path!r:.60}")
        path = Path(row["_file"]).parent / path
        if not path.is_file():
            raise ValueError(f"image not found: {path}")
        try:
            pil[role] = load_image(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"unreadable image {path}: {e}")
    aug = [pil["aug"]] if "aug" in pil else [pil["image"], pil.get("crop")]
    contexts = {"image": [pil["image"]], "deg": [pil.get("deg")], "noise": [pil.get("noise")],
                "aug": aug}
    return {"prompt": prompt, "prompt_enh": row.get("prompt_enh"),
            "prompt_robust": robust_prompt(row) if "robust" in pairs else prompt,
            "pairs": pairs, "contexts": contexts, "pil": pil}


def is_text(value):
    return isinstance(value, str) and bool(value.strip())


def relative_paths(row, out):
    """The row with "image" and "images" relative to `out` (paths in a JSONL are relative to it)."""
    root = Path(row["_file"]).parent
    if isinstance(row.get("images"), dict):
        images = {k: relpath_for(out, root / v) if isinstance(v, str) and v else v
                  for k, v in row["images"].items()}
        row = {**row, "images": images}
    return {**row, "image": relpath_for(out, row["_image"])}


def load_clip(name, pretrained, device):
    """(model, preprocess, tokenizer) of an open_clip model, or None for "none". name: a folder in
    open_clip's local-dir format (00's world/clip) or a model name whose `pretrained` weights (a tag
    or a file) are on this machine: nothing is downloaded."""
    if name == "none":
        return None
    import open_clip  # here: it imports torchvision, which --clip none does without
    kw = {}
    if os.path.isdir(name):
        name = f"local-dir:{name}"
    else:
        cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if cfg.get("url") and not cfg.get("hf_hub"):  # open_clip would fetch it: take the cache's
            pretrained = os.path.join(os.path.expanduser("~/.cache/clip"),
                                      os.path.basename(cfg["url"]))
        kw = dict(pretrained=pretrained, force_quick_gelu=bool(cfg.get("quick_gelu")))
    try:
        model, preprocess = open_clip.create_model_from_pretrained(name, device=device, **kw)
    except (OSError, RuntimeError, ValueError) as e:
        fail(f"cannot load CLIP {name} ({kw.get('pretrained', 'folder')}) from local files: {e}\n"
             f"nothing is downloaded: pass a folder, a cached tag or a weights file, or --clip none")
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def write_outputs(lines, report, args, out):
    """<out> (the lines that keep a branch), <out>.dropped.jsonl, <out>.report.json; the report printed."""
    dropped = out.with_suffix(".dropped.jsonl")
    report_path = out.with_suffix(".report.json")
    if not args.score_only:
        write_jsonl(out, [x for x in lines if any(x["keep"].values())])
        write_jsonl(dropped, [x for x in lines if not any(x["keep"].values())])
    report_path.write_text(json.dumps(report, indent=1))
    num = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    stats = lambda s, *keys: "  ".join(f"{k} {num(s[k])}" for k in keys)  # noqa: E731
    t = report["thresholds"]
    where = "its own generation" if t["filter_context"] == "own" else "the DPO"
    print(f"filter: PPL < {t['max_ppl']:g} (chosen and rejected), {t['margin_low']:g} <= M <= "
          f"{t['margin_high']:g}, each response in {where} context")
    for b, r in report["branches"].items():
        reasons = ", ".join(f"{k} {v}" for k, v in r["reasons"].items())
        print(f"{b}: {r['pairs']} pairs, {r['kept']} kept, {r['dropped']} dropped "
              f"of {report['lines']} lines ({reasons}; a pair can fail several checks)")
        for name, key in (("IPS all ", "ips_all"), ("IPS kept", "ips_kept"), ("margin  ", "margin")):
            print(f"  {name} n {r[key]['n']:4d}  "
                  + stats(r[key], "mean", "std", "min", "median", "max", "negative"))
    s = report["clip_ratio"]
    print(f"CLIP ratio r: n {s['n']}  " + stats(s, "mean", "std", "min", "max", "above_1"))
    print(f"{report['kept_both']} lines keep both branches (DDW weighs only these); their r: "
          + stats(report["clip_ratio_kept_both"], "mean", "median", "min", "max"))
    if not args.score_only:
        print(f"{out}: {report['written']} lines keep a branch; {len(lines) - report['written']} "
              f"in {dropped}; report in {report_path}")
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


# ---- shared: logprobs ----
def response_logprobs(model, inputs, response_mask):
    """(logp (R,) fp32, ntok (R,)): summed log pi(y | prompt, images) over each row's response tokens (EOS
    included), log-softmax in fp32. inputs, response_mask: from build_batch (moved to the model here)."""
    p = next(model.parameters())
    inputs = {k: v.to(p.device, p.dtype) if v.is_floating_point() else v.to(p.device)
              for k, v in inputs.items()}
    n = int(response_mask.sum(1).max())
    # (R, n + 1, V): only the positions that are scored
    logits = model(**inputs, use_cache=False, logits_to_keep=n + 1).logits
    assert logits.shape[1] == n + 1, (f"{logits.shape[1]} positions of logits for n + 1 = {n + 1}: logits_to_keep= "
                                      "was ignored (renamed?), so log-probs would be read at the wrong positions")
    logp = torch.log_softmax(logits[:, :-1].float(), -1)  # (R, n, V): position t predicts token t + 1
    logp = logp.gather(-1, inputs["input_ids"][:, -n:, None]).squeeze(-1)  # (R, n)
    mask = response_mask[:, -n:].to(p.device)
    return torch.where(mask, logp, 0.0).sum(1), mask.sum(1)
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


if __name__ == "__main__":
    main()

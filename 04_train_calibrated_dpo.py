"""Stage 04: train P2-DPO, calibrated DPO with dynamic deficiency weighting, in a plain PyTorch loop.

Paper: P2-DPO (ICLR 2026), method: the calibrated DPO loss and dynamic deficiency weighting (DDW).
Summed response log-probs (EOS included), fp32 loss arithmetic, beta = 0.1; log pi_ref of every term
comes from stage 03 (no reference model in memory):
  DPO(w, l | c) = -log sigmoid(beta * [(log pi(y_w|c) - log pi_ref(y_w|c))
                                       - (log pi(y_l|c) - log pi_ref(y_l|c))])
  Delta pi(y)   = log pi(y | I_aug, P_enh) - log pi(y | I_deg, P)
  L_calib       = -log sigmoid(beta * [Delta pi_theta(y_w) - Delta pi_ref(y_w)])
                  (--calib-ref lose: Delta pi_ref(y_l), as the authors' code)
  L_focus       = DPO_focus(c = I, P) + lambda_calib * L_calib,    L_rob = DPO_rob(c = I_noise, P)
  alpha         = alpha_max * tanh((r - 1) / tau),  r = CLIPScore(P, I_crop) / CLIPScore(P, I)
  w_focus       = w_base + alpha, w_rob = w_base - alpha
                  (no CLIP score, --no-ddw: w_base each; a line with one branch: 1.0 on it)
  L_total       = mean over lines of (w_focus * L_focus + w_rob * L_rob)

Input   train.jsonl (stage 03; paths relative to its folder): "id", "image", "prompt", "prompt_enh",
        "images": {"crop", "deg", "noise", ["aug": stitched I_aug, else I_aug = (image, crop)]},
        "focus" / "robust": {"chosen", "rejected"} | null, "keep": {"focus", "robust"}, "ref":
        {"focus_w", "focus_l", "calib_{aug,deg}_{w,l}", "robust_w", "robust_l"}, "clip": {"crop",
        "image"} | null. A branch trains if its pair is non-null and kept. A line with a field of
        the wrong type or range, or with an earlier line's id, goes to <out>/errors.jsonl instead.
Output  <out>/: the LoRA-merged model + processor, metrics.jsonl (a row per step), args.json,
        errors.jsonl, checkpoint.pt (for --resume; by default every 3% of the run or 10 minutes).
Shapes: B lines in a micro-batch, R rows of a forward, T tokens, n response tokens, V vocab.

Toy world on a CPU; one GPU; eight GPUs:
  python 04_train_calibrated_dpo.py --model world/model --data runs/train.jsonl --out runs/p2dpo
  python 04_train_calibrated_dpo.py --model llava-hf/llava-1.5-7b-hf --batch-size 4 --grad-checkpointing
  torchrun --nproc_per_node=8 04_train_calibrated_dpo.py --model Qwen/Qwen2.5-VL-7B-Instruct --batch-size 2
Ours, where the paper is silent: a global batch's loss is divided by its line count, so the number
of processes does not matter (DDP); dropout is seeded by (seed, step, rank); warm-up starts at
lr > 0; a pair's y_w and y_l share one row (pair_logprobs).
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
import pickle
import signal
import socket
import sys
import time
import traceback
import warnings
from pathlib import Path

# a model is a local folder or the user's own cache: never download
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import cached_file

# The summed log-probs a line needs. aug, deg: y_w under (I_aug, P_enh) and under (I_deg, P).
TERMS = ("focus_w", "focus_l", "aug", "deg", "robust_w", "robust_l")
# L_total is a sum of a part per group of terms: a group's gradient needs no other group's forward.
GROUPS = (("focus_w", "focus_l"), ("robust_w", "robust_l"), ("aug", "deg"))
# What a --resume may change; every other argument and what the arguments resolve to must be the
# first run's (data and model: by identity, not by spelling).
RESUME_MAY_CHANGE = ("resume", "overwrite", "stop_after", "save_every", "save_minutes", "device",
                     "batch_size", "grad_accum", "grad_checkpointing", "world_size",
                     "max_image_pixels", "debug", "data", "model", "out")
# Logged each step: each statistic -> the lines it is a mean over (those that have its term).
STATS = {"loss": "all", "dpo_focus": "focus", "calib": "calib", "acc_focus": "focus",
         "margin_focus": "focus", "delta_pi_w": "calib", "w_focus": "focus",
         "dpo_robust": "robust", "acc_robust": "robust", "margin_robust": "robust"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    real = at_least(0.0, float)  # a finite number >= 0
    p.add_argument("--model", default="world/model", help="a model folder or HF cache name")
    p.add_argument("--data", default="runs/train.jsonl", help="train.jsonl from stage 03")
    p.add_argument("--out", default="runs/p2dpo", help="output folder: model, metrics, checkpoint")
    g = p.add_argument_group("the paper's loss")
    g.add_argument("--beta", type=real, default=0.1, help="DPO temperature (paper, as DPO's)")
    g.add_argument("--lambda-calib", type=real, default=0.3, help="L_calib's weight (paper)")
    g.add_argument("--calib-ref", choices=("win", "lose"), default="win",
                   help="Delta pi_ref on y_w or y_l (lose: the authors' code)")
    g.add_argument("--w-base", type=real, default=0.5, help="DDW base weight (paper)")
    g.add_argument("--alpha-max", type=real, default=0.2, help="DDW largest shift (paper)")
    g.add_argument("--tau", type=at_least(1e-6, float), default=0.1, help="DDW temperature (paper)")
    ablation = "ablation (paper's table): without"
    g.add_argument("--no-focus", action="store_true", help=f"{ablation} DPO_focus and L_calib")
    g.add_argument("--no-robust", action="store_true", help=f"{ablation} the robustness branch")
    g.add_argument("--no-calib", action="store_true", help=f"{ablation} L_calib (and its forwards)")
    g.add_argument("--no-ddw", action="store_true", help=f"{ablation} DDW: static w_base / w_base")
    g = p.add_argument_group("LoRA and optimisation (the authors' settings)")
    g.add_argument("--lora-rank", type=at_least(0), default=32, help="rank r; 0: full fine-tuning")
    g.add_argument("--lora-alpha", type=real, default=32, help="the LoRA scale is alpha / r")
    g.add_argument("--lora-dropout", type=at_least(0.0, float, most=0.99), default=0.05,
                   help="dropout on the LoRA input")
    g.add_argument("--lr", type=real, default=None,
                   help="AdamW peak lr (default: 1e-5; the toy world's world.json: 1e-4)")
    g.add_argument("--weight-decay", type=real, default=0.05, help="AdamW weight decay")
    g.add_argument("--warmup-ratio", type=at_least(0.0, float, most=1.0), default=0.03,
                   help="linear warm-up share, then cosine")
    g.add_argument("--epochs", type=at_least(1), default=4, help="passes over the data")
    g.add_argument("--effective-batch", type=at_least(1), default=16, help="lines per step, in all")
    g.add_argument("--batch-size", type=at_least(1), default=4, help="lines per micro-step per GPU")
    g.add_argument("--grad-accum", type=at_least(0), default=0, help="micro-steps a step (0: derived)")
    g.add_argument("--max-grad-norm", type=real, default=1.0, help="gradient norm clip (HF/TRL's)")
    g.add_argument("--grad-checkpointing", action="store_true", help="less memory, more compute")
    g = p.add_argument_group("run")
    g.add_argument("--save-every", type=at_least(0), default=0,
                   help="write checkpoint.pt every N steps (0: every 3%% of the run)")
    g.add_argument("--save-minutes", type=real, default=10.0, help="and every N minutes (0: never)")
    g.add_argument("--stop-after", type=at_least(0), default=0,
                   help="end after N steps, the schedule unchanged (then --resume)")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    g.add_argument("--overwrite", action="store_true", help="start over in a trained --out")
    g.add_argument("--seed", type=int, default=0, help="seed of LoRA init, data order and dropout")
    g.add_argument("--device", type=device_name, help="cuda or cpu",
                   default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--limit", type=at_least(1), default=None, help="the first N lines of --data")
    g.add_argument("--max-image-pixels", type=at_least(0), default=Image.MAX_IMAGE_PIXELS,
                   help="a larger image makes its line unusable (decompression bombs); 0: no limit")
    g.add_argument("--debug", action="store_true", help="show the traceback behind an error")
    args = p.parse_args(argv)
    refused = [  # flags that contradict each other, or values that would train nothing
        (args.resume and args.overwrite,
         "--resume continues the run in --out and --overwrite starts it over: pass one of them"),
        (args.no_focus and args.no_robust, "--no-focus with --no-robust leaves nothing to train"),
        (args.beta == 0, "--beta 0 makes every DPO term ln 2, with no gradient"),
        (args.lr == 0, "--lr 0 trains nothing"),
        (args.lora_rank > 0 and args.lora_alpha == 0, "--lora-alpha 0 scales LoRA to nothing"),
        (args.max_grad_norm == 0, "--max-grad-norm 0 clips every gradient to 0"),
        (args.w_base == 0, "--w-base 0 gives a line with both branches no weight"),
        (args.alpha_max > args.w_base and not args.no_ddw,
         "--alpha-max above --w-base gives a branch a negative weight: it would ascend its loss")]
    for bad, why in refused:
        if bad:
            p.error(why)
    return args


# ---- the loss ----
def fp32(x):
    """x as an fp32 tensor: loss arithmetic in fp32, even under bf16 autocast (as DPO's code)."""
    return torch.as_tensor(x, dtype=torch.float32)


def dpo_loss(pi_w, pi_l, ref_w, ref_l, beta):
    """DPO(w, l | c) = -log sigmoid(beta * [(pi_w - ref_w) - (pi_l - ref_l)]), summed log-probs.
    pi_w, pi_l, ref_w, ref_l: (B,). Returns losses, chosen_rewards, rejected_rewards, each (B,)."""
    pi_w, pi_l, ref_w, ref_l = map(fp32, (pi_w, pi_l, ref_w, ref_l))
    pi_logratios = pi_w - pi_l
    ref_logratios = ref_w - ref_l
    losses = -F.logsigmoid(beta * (pi_logratios - ref_logratios))  # a finite gradient at any gap
    chosen_rewards = beta * (pi_w - ref_w).detach()
    rejected_rewards = beta * (pi_l - ref_l).detach()
    return losses, chosen_rewards, rejected_rewards


def calibration_loss(pi_aug_w, pi_deg_w, ref_aug, ref_deg, beta):
    """L_calib = -log sigmoid(beta * [Delta pi_theta(y_w) - Delta pi_ref]),
    Delta pi(y) = log pi(y | I_aug, P_enh) - log pi(y | I_deg, P).
    pi_aug_w, pi_deg_w: (B,) policy on y_w; ref_aug, ref_deg: (B,) reference on y_w or y_l
    (--calib-ref). Returns (B,)."""
    delta_pi = fp32(pi_aug_w) - fp32(pi_deg_w)
    delta_ref = fp32(ref_aug) - fp32(ref_deg)
    return -F.logsigmoid(beta * (delta_pi - delta_ref))


def ddw_weights(clip_crop, clip_image, w_base, alpha_max, tau):
    """alpha = alpha_max * tanh((r - 1) / tau), r = CLIPScore(P, I_crop) / CLIPScore(P, I);
    w_focus = w_base + alpha, w_rob = w_base - alpha. clip_crop, clip_image: (B,), NaN: no score
    (NaN out). Returns (w_focus, w_rob), each (B,)."""
    clip_crop = fp32(clip_crop)
    clip_image = fp32(clip_image)
    r = (clip_crop + 1e-6) / (clip_image + 1e-6)  # the 1e-6 keeps r finite (1 when both are 0)
    alpha = alpha_max * torch.tanh((r - 1) / tau)
    return w_base + alpha, w_base - alpha


def p2dpo_loss(pi, ref, has_focus, has_robust, clip_crop, clip_image, beta=0.1, lambda_calib=0.3,
               w_base=0.5, alpha_max=0.2, tau=0.1, ddw=True):
    """Per line: w_focus * (DPO_focus + lambda_calib * L_calib) + w_rob * DPO_rob (the caller takes
    the mean). pi, ref: dicts over TERMS of (B,) summed log-probs, 0 where a line lacks the branch.
    has_focus, has_robust: (B,) bool. clip_crop, clip_image: (B,), NaN without a score. Weights:
    DDW for a line with both branches and a score; w_base each without a score or with ddw=False;
    1.0 on a one-branch line's branch. Returns (losses (B,), diagnostics: a dict of (B,))."""
    dpo_f, chosen_f, rejected_f = dpo_loss(pi["focus_w"], pi["focus_l"],
                                           ref["focus_w"], ref["focus_l"], beta)
    calib = calibration_loss(pi["aug"], pi["deg"], ref["aug"], ref["deg"], beta)
    dpo_r, chosen_r, rejected_r = dpo_loss(pi["robust_w"], pi["robust_l"],
                                           ref["robust_w"], ref["robust_l"], beta)
    w_focus, w_robust = ddw_weights(clip_crop, clip_image, w_base, alpha_max, tau)
    scored = torch.isfinite(w_focus) & ddw  # a CLIP score, and DDW on
    w_focus = torch.where(scored, w_focus, w_base)
    w_robust = torch.where(scored, w_robust, w_base)
    both = has_focus & has_robust
    w_focus = torch.where(both, w_focus, 1.0) * has_focus  # one branch: 1.0 on it, 0 on the other
    w_robust = torch.where(both, w_robust, 1.0) * has_robust
    # where, not *: a lacking branch adds 0
    l_focus = torch.where(has_focus, dpo_f + lambda_calib * calib, 0.0)
    l_robust = torch.where(has_robust, dpo_r, 0.0)
    losses = w_focus * l_focus + w_robust * l_robust
    delta_pi_w = fp32(pi["aug"]) - fp32(pi["deg"])
    diagnostics = dict(dpo_focus=dpo_f, calib=calib, dpo_robust=dpo_r, w_focus=w_focus,
                       margin_focus=chosen_f - rejected_f, margin_robust=chosen_r - rejected_r,
                       acc_focus=(chosen_f > rejected_f).float(),
                       acc_robust=(chosen_r > rejected_r).float(), delta_pi_w=delta_pi_w.detach())
    return losses, diagnostics


# ---- the policy: LoRA on the language model ----
class LoRALinear(nn.Module):
    """h = W x + (alpha / r) * B A dropout(x) (Hu et al. 2021). B starts at 0: training starts at
    the reference. A and B are fp32 even under a bf16 base: autocast computes in bf16, AdamW
    updates fp32 weights."""
    def __init__(self, base, r, alpha, dropout):
        super().__init__()
        self.base = base
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's, as in LoRA's code

    def forward(self, x):
        h = self.base(x)  # first: the order sets how x's gradients are summed, to the last bit
        lora = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., out)
        return h + lora * self.scale


def add_lora(model, r, alpha, dropout):
    """LoRALinear around each nn.Linear of the language model (not lm_head, vision, projector)."""
    lm = model.model.language_model
    for name, module in list(lm.named_modules()):
        if isinstance(module, nn.Linear):
            lm.set_submodule(name, LoRALinear(module, r, alpha, dropout))


@torch.no_grad()
def merge_lora(model):
    """W <- W + (alpha / r) B A, summed in fp32, in W's dtype; the nn.Linear back in its place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            w = module.base.weight
            w.copy_(w.float() + module.scale * (module.lora_B.float() @ module.lora_A.float()))
            model.set_submodule(name, module.base)


# ---- the policy's log-probs: a pair's two responses on one shared prefix ----
def build_pair_batch(processor, prompts, pairs, images):
    """(inputs, branch (R, T) long): R rows [prompt, y_w + EOS, y_l + EOS], left padded, of R (chat
    prompt with images, (y_w, y_l)); branch: 0 on the prompt and padding, 1 on y_w + EOS, 2 on
    y_l + EOS. prompts, images: as build_batch's, which tokenizes y_w as y_l is tokenized here."""
    inputs, w_mask = build_batch(processor, prompts, [w for w, _ in pairs], images)  # [prompt, y_w]
    tok = processor.tokenizer
    tails = [tok(l, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, l in pairs]
    real = inputs["attention_mask"].bool()  # (R, T0)
    T = max(int(m.sum()) + len(t) for m, t in zip(real, tails))
    for k in [k for k, v in inputs.items() if torch.is_tensor(v) and v.shape == real.shape]:
        # input_ids, attention_mask, mm_token_type_ids: y_l's ids, attention 1, type 0 (text)
        ends = tails if k == "input_ids" else [[int(k == "attention_mask")] * len(t) for t in tails]
        rows = [torch.cat([row[m], torch.tensor(e, dtype=row.dtype)])
                for row, m, e in zip(inputs[k], real, ends)]
        pad = tok.pad_token_id if k == "input_ids" else 0
        inputs[k] = torch.stack([F.pad(r, (T - len(r), 0), value=pad) for r in rows])  # (R, T)
    n_l = torch.tensor([len(t) for t in tails])[:, None]  # (R, 1)
    n_w = w_mask.sum(1, keepdim=True)  # (R, 1)
    t = torch.arange(T)
    return inputs, (t >= T - n_l - n_w).long() + (t >= T - n_l).long()  # (R, T)


def pair_logprobs(model, inputs, branch):
    """Summed log pi(y_w | prompt, images) and log pi(y_l | prompt, images), from one forward of
    build_pair_batch's rows [prompt, y_w + EOS, y_l + EOS], log-softmax in fp32.

    The 4D attention mask (R, 1, T, T) lets one row score two responses as two rows would: a query
    sees a key that is earlier, not padding, and in the prompt or in the query's own response, so
    y_l cannot see y_w; y_l's positions restart where y_w's start, so y_l reads the prompt at the
    distances it would in a row of its own; and the prompt, its image tokens and the vision tower
    run once per pair instead of twice. Same log-probs and gradients as a row per response
    (response_logprobs) to rounding: tests/test_04_shared_prefix.py. Under LoRA dropout the two
    responses share the prompt's dropout mask. Returns (logp (2R,) fp32, ntok (2R,)): every row's
    y_w, then every row's y_l."""
    core = getattr(model, "module", model)  # (DDP wraps the model)
    p = next(model.parameters())
    inputs = {k: v.to(p.device, p.dtype) if v.is_floating_point() else v.to(p.device)
              for k, v in inputs.items()}
    branch = branch.to(p.device)
    real = inputs["attention_mask"].bool()  # (R, T)
    R, T = real.shape
    causal = torch.ones(T, T, dtype=torch.bool, device=p.device).tril()  # (T, T) [query, key]
    own = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])  # (R, T, T)
    # a padding query sees itself alone (an empty softmax would be NaN)
    seen = (causal & own & real[:, None, :]) | torch.eye(T, dtype=torch.bool, device=p.device)
    mask = seen[:, None]  # (R, 1, T, T): a 4D mask goes to the attention as it is
    attention = core.model.language_model.config._attn_implementation
    if attention == "eager":  # an additive mask
        mask = torch.where(mask, 0.0, torch.finfo(p.dtype).min).to(p.dtype)
    elif attention != "sdpa":
        fail(f"pair_logprobs needs sdpa or eager attention (a 4D mask), not {attention}")
    n_w = (branch == 1).sum(1)  # (R,)
    if hasattr(core.model, "get_rope_index"):  # Qwen-VL's M-RoPE: (3, R, T) from the image grids
        extra = {k: inputs[k] for k in ("mm_token_type_ids", "image_grid_thw") if k in inputs}
        positions, _ = core.model.get_rope_index(inputs["input_ids"], attention_mask=real.long(),
                                                 **extra)
    else:
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # (R, T)
    positions = positions - torch.where(branch == 2, n_w[:, None], 0)  # y_l starts where y_w does
    n = int((branch > 0).sum(1).max())
    # (R, n + 1, V): only the positions that are scored
    logits = model(**{**inputs, "attention_mask": mask}, position_ids=positions, use_cache=False,
                   logits_to_keep=n + 1).logits
    assert logits.shape[1] == n + 1, (
        f"{logits.shape[1]} positions of logits for n + 1 = {n + 1}: logits_to_keep= was ignored")
    logp = torch.log_softmax(logits.float(), -1)  # (R, n + 1, V)
    tail = branch[:, -n:]  # (R, n): the window's tokens, each predicted at its index in logp ...
    first_l = (tail == 2) & (F.pad(tail, (1, 0))[:, :-1] != 2)
    # ... but y_l's first token, predicted where y_w's first is: at the prompt's last token
    source = torch.arange(n, device=p.device) - torch.where(first_l, n_w[:, None], 0)  # (R, n)
    rows = torch.arange(R, device=p.device)[:, None]
    logp = logp[rows, source, inputs["input_ids"][:, -n:]]  # (R, n)
    sums = [torch.where(tail == b, logp, 0.0).sum(1) for b in (1, 2)]  # y_w, y_l: each (R,)
    ntok = [(tail == b).sum(1) for b in (1, 2)]
    return torch.cat(sums), torch.cat(ntok)


def term_batches(processor, exs, terms=TERMS, shared_prefix=True):
    """The CPU half of scoring the examples `exs` (a live reference can share it): per context some
    line has, its terms in `terms`, (keys, idx, score, batch); score(model, *batch) gives keys[0]'s
    log-probs of the lines idx, then keys[1]'s. shared_prefix=False (benchmarks): a row each."""
    focus = [i for i, ex in enumerate(exs) if ex["focus"]]
    robust = [i for i, ex in enumerate(exs) if ex["robust"]]
    contexts = [("focus", focus, ("focus_w", "focus_l"), "prompt", "image"),  # (I, P)
                ("robust", robust, ("robust_w", "robust_l"), "prompt", "noise"),  # (I_noise, P)
                ("focus", focus, ("aug",), "prompt_enh", "aug"),  # (I_aug, P_enh), y_w only
                ("focus", focus, ("deg",), "prompt", "deg")]  # (I_deg, P), y_w only
    image = functools.lru_cache(maxsize=None)(training_image)  # decoded once per micro-batch
    out = []
    for branch, idx, keys, prompt_key, image_key in contexts:
        if not idx or not set(keys) <= set(terms):
            continue
        packed = shared_prefix and len(keys) == 2  # one row [prompt, y_w, y_l] per line
        rows = [(i, j) for j in range(1 if packed else len(keys)) for i in idx]  # chosen, rejected
        prompts = [exs[i][prompt_key] for i, _ in rows]
        images = [[image(p) for p in exs[i]["images"][image_key]] for i, _ in rows]
        if packed:
            batch = build_pair_batch(processor, prompts, [exs[i][branch] for i in idx], images)
        else:
            responses = [exs[i][branch][j] for i, j in rows]
            batch = build_batch(processor, prompts, responses, images)  # (len(keys) * |idx|, T)
        out.append((keys, idx, pair_logprobs if packed else response_logprobs, batch))
    return out


def policy_logps(model, batches, B, ctx):
    """Summed log pi_theta of each term in term_batches' `batches` of B examples, a forward per
    context: a dict over TERMS of (B,) fp32, 0 where a line lacks the term or `batches` omit it."""
    out = {}
    for keys, idx, score, batch in batches:
        with ctx:
            logp, _ = score(model, *batch)  # (len(keys) * |idx|,)
        full = logp.new_zeros(len(keys), B)  # (len(keys), B)
        full[:, idx] = logp.view(len(keys), len(idx))
        out.update(zip(keys, full))
    zero = torch.zeros(B, device=next(model.parameters()).device)
    return {k: out.get(k, zero) for k in TERMS}


# ---- one optimizer step ----
def micro_step(model, processor, mb, args, ctx, scale, batches=None):
    """Forward and backward of a micro-batch of (example, weight), a group of terms at a time (one
    group's activations alive at once): .grad += scale * d sum(weight * loss) / d theta. Returns
    (losses (B,), (2 * len(STATS),): each STATS entry's sum, then count; weight 0: nowhere)."""
    exs = [ex for ex, _ in mb]
    groups = GROUPS[:2] if args.no_calib else GROUPS
    lambda_calib = 0.0 if args.no_calib else args.lambda_calib
    if batches is None:
        batches = term_batches(processor, exs, [k for g in groups for k in g])
    tensor = functools.partial(torch.tensor, device=next(model.parameters()).device)
    ref = {k: tensor([ex["ref"][k] for ex in exs]) for k in TERMS}
    weight = tensor([w for _, w in mb])  # (B,)
    clip = tensor([ex["clip"] for ex in exs])  # (B, 2): CLIPScore of the crop, of the image
    has_f = tensor([ex["focus"] is not None for ex in exs])
    has_r = tensor([ex["robust"] is not None for ex in exs])

    def loss(pi):  # (losses (B,), diagnostics)
        return p2dpo_loss(pi, ref, has_f, has_r, clip[:, 0], clip[:, 1], args.beta, lambda_calib,
                          args.w_base, args.alpha_max, args.tau, not args.no_ddw)

    # L_total's parts each read one group's log-probs (DDW weights are constants): a backward per
    # group, the others held constant, adds up to one over all terms (test_backward_per_group_...).
    pi = {k: tensor([0.0] * len(exs)) for k in TERMS}  # each group's values, once it has run
    for group in groups:
        mine = [b for b in batches if set(b[0]) <= set(group)]
        live = {k: v for k, v in policy_logps(model, mine, len(exs), ctx).items() if k in group}
        if any(v.requires_grad for v in live.values()):  # (else no line has the group's branch)
            losses, _ = loss({**pi, **live})
            ((losses * weight).sum() * scale).backward()
        pi.update({k: v.detach() for k, v in live.items()})
    losses, diagnostics = loss(pi)
    values = {"loss": losses, **diagnostics}
    over = {"all": weight, "focus": weight * has_f,  # the lines of each name in STATS
            "calib": weight * has_f * (not args.no_calib), "robust": weight * has_r}
    masks = [over[lines] for lines in STATS.values()]
    sums = [torch.where(m > 0, values[k].detach(), 0.0).sum() for k, m in zip(STATS, masks)]
    return losses, torch.stack(sums + [m.sum() for m in masks])


def train_step(model, processor, lines, batch, lr, args, ctx, optimizer, accum, rank, world):
    """One AdamW step at lr on the global batch (`batch`: indices into `lines`, all ranks'): the
    clipped gradient of L_total, a mean over its lines whatever the number of processes and
    micro-steps. Returns the step's log; FloatingPointError before the update if not finite."""
    t0 = time.time()
    optimizer.param_groups[0]["lr"] = lr  # (one group)
    mbs = micro_batches(lines, batch, rank, world, args.batch_size, accum)  # this rank's
    sums = 0
    # DDP: .grad accumulates locally until the last micro-step, whose backwards average over ranks
    for j, mb in enumerate(mbs):
        last = j == len(mbs) - 1 or world == 1
        with contextlib.nullcontext() if last else model.no_sync():
            _, s = micro_step(model, processor, mb, args, ctx, world / len(batch))
        sums = sums + s
    if world > 1:
        dist.all_reduce(sums)
    totals, counts = sums.split(len(STATS))  # each STATS entry's mean; None where no line had it
    log = {k: float(v / c) if c > 0 else None for k, v, c in zip(STATS, totals, counts)}
    params = optimizer.param_groups[0]["params"]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    log["grad_norm"] = float(grad_norm)
    if not (math.isfinite(log["loss"]) and math.isfinite(log["grad_norm"])):
        raise FloatingPointError(f"non-finite loss ({log['loss']}) or grad norm "
                                 f"({log['grad_norm']})")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**log, "lr": lr, "examples_per_s": len(batch) / (time.time() - t0)}


def lr_at(step, peak, warmup, total):
    """The lr at a step (from 0): a linear warm-up from lr > 0, then a cosine to 0 at `total`."""
    if step < warmup:
        return peak * ((step + 1) / (warmup + 1))
    return peak * (0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def main(argv=None):
    exits_in_one_sentence("rerun with --resume: it continues from the last checkpoint")
    args = parse_args(argv)
    # ---- plumbing: processes, --out, precision ----
    Image.MAX_IMAGE_PIXELS = args.max_image_pixels or None
    rank, world, device = dist_setup(args.device)  # torchrun: a process group, and a GPU each
    device = torch.device(device)
    say = tqdm.write if rank == 0 else (lambda *a, **k: None)
    say(world_settings(args, "04", {"lr": 1e-5}))  # the toy world's lr, else the paper's
    inputs = {"--data": args.data, "--model": args.model}
    on_rank0(lambda: claim_out(args.out, inputs, folder=True), rank, world)
    ctx = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")  # CPU: fp32
    # ---- the data: stage 03's pairs and the reference's log-probs; the schedule ----
    lines, errors = read_lines(args, rank, say)
    accum = args.grad_accum or max(1, round(args.effective_batch / (args.batch_size * world)))
    per_step = args.batch_size * accum * world  # lines per optimizer step: the global batch
    if per_step != args.effective_batch and not args.grad_accum:
        say(f"note: --effective-batch {args.effective_batch} is not --batch-size {args.batch_size} x {world} "
            f"processes x a whole number of micro-steps: each step takes {per_step} lines")
    steps_per_epoch = math.ceil(len(lines) / per_step)
    total = args.epochs * steps_per_epoch
    resolved = dict(data_identity=file_identity(args.data),
                    model_identity=model_identity(args.model), grad_accum=accum, world_size=world,
                    global_batch=per_step, total_steps=total, lines=len(lines), skipped=len(errors))
    on_rank0(lambda: check_out(args, resolved), rank, world)
    # ---- the policy: the base model with LoRA, and AdamW ----
    torch.manual_seed(args.seed)  # the same LoRA init on every rank
    raw, processor = load_model(args.model, device)  # raw: the unwrapped module, to save
    model = prepare(raw, args, world)  # (raw gets LoRA in place)
    params = [p for p in raw.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    saver = Checkpoints(args, total, raw, optimizer, rank, world)  # --resume: loaded here
    metrics = open_outputs(args, saver.saved, resolved, errors) if rank == 0 else None
    say(f"{len(lines)} lines, {total} steps of {per_step} ({args.batch_size} x {accum} accumulation"
        f" x {world} ranks); checkpoint every {saver.every} steps or {args.save_minutes:g} minutes")
    stopping = saver.saved < args.stop_after <= total  # --stop-after: a checkpoint, no model
    end = args.stop_after if stopping else total
    for step in tqdm(range(saver.saved, end), initial=saver.saved, total=total, disable=rank != 0):
        epoch, k = divmod(step, steps_per_epoch)
        shuffle = torch.Generator().manual_seed(args.seed + epoch)
        order = torch.randperm(len(lines), generator=shuffle).tolist()
        batch = order[k * per_step:(k + 1) * per_step]  # this step's lines, all ranks
        torch.manual_seed(args.seed * 1_000_003 + step * world + rank)  # dropout, as after --resume
        lr = lr_at(step, args.lr, math.ceil(args.warmup_ratio * total), total)
        try:
            log = train_step(model, processor, lines, batch, lr, args, ctx, optimizer, accum, rank,
                             world)
        except FloatingPointError as e:
            fail(f"{e} at step {step + 1}: stopped before the update; {saver.holds()} (check the "
                 f"ref log-probs in --data, --lr)")
        log = dict(step=step + 1, epoch=epoch, **log)
        if rank == 0:
            append_jsonl(metrics, log)
            say(" ".join(f"{name} {v:.4g}" if isinstance(v, float) else f"{name} {v}"
                         for name, v in log.items()))
        saver.after(step + 1)  # checkpoint.pt when due, and at --stop-after
    if stopping:
        say(f"stopped after step {end} (--stop-after); continue with --resume")
    elif rank == 0:
        merge_lora(raw)  # (full fine-tuning: nothing to merge)
        save_model(raw, processor, args.out, device)
        say(f"wrote {args.out} (a model folder for AutoModelForImageTextToText, LoRA merged)")
    if world > 1:
        dist.destroy_process_group()


# ==================================================================================================
# Appendix: plumbing. A first reading may skip everything below: the stage's own input/output
# and printing, then helpers that several stages need, copied verbatim between
# "# ---- shared: NAME ----" rulers so each script stands alone (tests/test_shared_blocks.py
# keeps every copy identical).
# ==================================================================================================
# ---- plumbing: what trains, and the data-parallel wrapper ----
def prepare(model, args, world):
    """Freeze all but LoRA (--lora-rank 0: all but the language model and lm_head, in fp32 master
    weights computed under autocast); under torchrun, DDP (inputs go to the model's device)."""
    model.requires_grad_(False)
    if args.lora_rank > 0:
        add_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout)
    else:
        for part in (model.model.language_model, model.lm_head):
            part.float().requires_grad_(True)
    if args.grad_checkpointing:  # (use_reentrant=False, the default)
        model.activation_checkpointing_enable()
    model.train()
    if world > 1:  # (the scoring functions move inputs to the model's device)
        return nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    return model


def micro_batches(lines, batch, rank, world, batch_size, accum):
    """This rank's share of a global batch (line indices): up to `accum` micro-batches of (example,
    weight). Where another rank's micro-batch has a branch this one lacks, one line of it is added
    with weight 0, so every rank makes the same forward and collective calls (DDP)."""
    shares = [batch[r::world] for r in range(world)]
    out = []
    for j in range(accum):
        chunks = [[lines[i] for i in s[j * batch_size:(j + 1) * batch_size]] for s in shares]
        mine = [(ex, 1.0) for ex in chunks[rank]]
        for b in ("focus", "robust"):
            if any(ex[b] for c in chunks for ex in c) and not any(ex[b] for ex, _ in mine):
                mine.append((next(lines[i] for i in batch if lines[i][b]), 0.0))
        if mine:
            out.append(mine)
    return out


# ---- plumbing: the data ----
def read_lines(args, rank, say):
    """(examples, errors) of the first --limit lines of --data: parse_line's example of each good
    line, {"file", "line", "id", "error"} of each other. No good line: the run ends here."""
    if not os.path.isfile(args.data):
        fail(f"--data {args.data}: input file not found")
    root = os.path.dirname(os.path.abspath(args.data))  # image paths are relative to its folder
    bad = []
    rows = read_jsonl(args.data, on_error=lambda n, message: bad.append((n, message)))
    rows = sorted(rows + bad, key=lambda r: r[0])[:args.limit]
    if not rows:
        fail(f"{args.data}: no input lines (the file is empty)")
    examples = []
    errors = []
    seen = {}  # id -> its line
    for n, row in rows:
        key = row.get("id") if isinstance(row, dict) else None
        try:
            if isinstance(row, str):  # read_jsonl's "file:line: bad JSON line (why)"
                raise ValueError(row.removeprefix(f"{args.data}:{n}: "))
            if type(key) not in (str, int) or not str(key).strip():
                raise ValueError(f"'id' must be text or an integer, not {json.dumps(key)[:80]}")
            if str(key) in seen:
                raise ValueError(f"id {key!r} repeats line {seen[str(key)]}")
            examples.append(parse_line(row, root, args))
            seen[str(key)] = n
        except (ValueError, OSError) as e:
            error = f"{args.data}:{n}: {e}"
            errors.append({"file": args.data, "line": n, "id": key, "error": error})
    for e in errors[:10]:
        say(e["error"])
    where = os.path.join(args.out, "errors.jsonl")
    if errors:
        say(f"{len(errors)} of {len(rows)} lines of {args.data} left out (listed in {where})")
    if not examples:
        if rank == 0:  # the folder is 04's from now on (args.json): the corrected rerun goes on
            write_args(args_path(args.out, folder=True), vars(args))
            Path(where).write_text("".join(json.dumps(e) + "\n" for e in errors))
        fail(f"no usable line in {args.data}: all {len(rows)} lines were left out (see {where})")
    return examples, errors


# Each kind of train.jsonl field: (test, what it must be). `type(v) in (int, float)` leaves out
# bools, which Python counts as numbers (True == 1).
FIELDS = {"text": (lambda v: isinstance(v, str) and v.strip() != "", "non-empty text"),
          "response": (lambda v: isinstance(v, str), "text"),
          "path": (lambda v: isinstance(v, str) and v.strip() != "", "an image file's path"),
          "object": (lambda v: v is None or isinstance(v, dict), "an object or null"),
          "flag": (lambda v: isinstance(v, bool), "true or false"),
          "logprob": (lambda v: type(v) in (int, float) and -1e308 <= v <= 0, "a log-prob (<= 0)"),
          "logprob?": (lambda v: v is None or FIELDS["logprob"][0](v), "a log-prob (<= 0) or null"),
          "clip": (lambda v: type(v) in (int, float) and 0 <= v <= 1e308, "a CLIPScore (>= 0)")}


def parse_line(row, root, args):
    """A train.jsonl row -> {"prompt", "prompt_enh", "images": {context: [files]}, "focus",
    "robust": (y_w, y_l) | None, "ref": {term: log pi_ref}, "clip": [crop, image]}; ValueError
    (OSError: an image) names the first field read that is wrong."""
    def get(name, kind):  # the field "a.b" of row, checked
        value = row
        for key in name.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        ok, what = FIELDS[kind]
        if not ok(value):
            raise ValueError(f"'{name}' must be {what}, not {json.dumps(value)[:80]}")
        return value

    get("prompt", "text")
    for name in ("images", "focus", "robust", "keep", "ref", "clip"):
        get(name, "object")
    for key in row.get("ref") or {}:
        get(f"ref.{key}", "logprob?")
    scores = [math.nan, math.nan]  # no CLIP score: DDW keeps w_base
    if row.get("clip") is not None:
        scores = [float(get(f"clip.{k}", "clip")) for k in ("crop", "image")]
    use = {}  # branch -> trained: a pair, kept by stage 03, not switched off
    for b in ("focus", "robust"):
        paired = row.get(b) is not None
        for k in ("chosen", "rejected") if paired else ():
            get(f"{b}.{k}", "response")
        use[b] = paired and get(f"keep.{b}", "flag") and not getattr(args, f"no_{b}")
    if not any(use.values()):
        raise ValueError("no usable branch (pairs null, dropped by stage 03's keep flags, "
                         "or switched off)")
    calib = use["focus"] and not args.no_calib
    side = args.calib_ref[0]  # "w" or "l": whose Delta pi_ref
    need = {}  # term -> its key in "ref"
    contexts = {}  # context -> the fields that name its images
    if use["focus"]:
        need.update(focus_w="focus_w", focus_l="focus_l")
        contexts["image"] = ["image"]
    if calib:
        get("prompt_enh", "text")
        need.update(aug=f"calib_aug_{side}", deg=f"calib_deg_{side}")
        stitched = (row.get("images") or {}).get("aug") is not None  # else I_aug = (I, I_crop)
        contexts.update(aug=["images.aug"] if stitched else ["image", "images.crop"],
                        deg=["images.deg"])
    if use["robust"]:
        need.update(robust_w="robust_w", robust_l="robust_l")
        contexts["noise"] = ["images.noise"]
    ref = {term: float(get(f"ref.{key}", "logprob")) for term, key in need.items()}
    images = {c: [os.path.join(root, get(f, "path")) for f in fields]
              for c, fields in contexts.items()}
    for path in {p for files in images.values() for p in files}:
        open_image(path).close()  # the header: a missing file, no image, a bomb: this line's error
    pairs = {b: (row[b]["chosen"], row[b]["rejected"]) if use[b] else None for b in use}
    return {"prompt": row["prompt"], "prompt_enh": row["prompt_enh"] if calib else None,
            "images": images, **pairs, "ref": {t: ref.get(t, 0.0) for t in TERMS}, "clip": scores}


def training_image(path):
    """load_image mid-run: read_lines checked each header, so a failure is a file damaged since."""
    try:
        return load_image(path)
    except (OSError, ValueError) as e:
        fail(f"{path}: unreadable image mid-run ({e}); repair the file, then --resume")


# ---- plumbing: the output folder ----
def check_out(args, resolved):
    """Refuse, before the model loads, a fresh run into a trained --out without --overwrite, and a
    --resume without a checkpoint or with other data or settings (RESUME_MAY_CHANGE aside)."""
    out = Path(args.out)
    trained = (out / "checkpoint.pt").is_file() or (out / "config.json").is_file()
    if not args.resume:
        if trained and not args.overwrite:
            fail(f"{out} holds a trained model or a checkpoint: --resume continues it, --overwrite "
                 f"starts over, or pass another --out")
        return
    old = read_args(args_path(out, folder=True))
    if not (old and (out / "checkpoint.pt").is_file()):
        fail(f"--resume: {out} holds no checkpoint.pt to continue from (with the args.json of its "
             f"run); run without --resume to start")
    keys = [k for k in old if k not in RESUME_MAY_CHANGE and k != "stage"]
    same_settings(old, {**vars(args), **resolved}, keys, f"--resume: {out} was trained with")


def open_outputs(args, start, resolved, errors):
    """(rank 0) Write args.json (a resumed run keeps its first run's) and errors.jsonl; open
    metrics.jsonl with its rows up to step `start`. A fresh run first removes what it replaces."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:  # the old checkpoint, and the config.json that marks a saved model
        for name in ("checkpoint.pt", "config.json"):
            (out / name).unlink(missing_ok=True)
        write_args(args_path(out, folder=True), {**vars(args), **resolved})
    (out / "errors.jsonl").write_text("".join(json.dumps(e) + "\n" for e in errors))
    kept = [r for _, r in read_jsonl(out / "metrics.jsonl") if r["step"] <= start] if start else []
    metrics = open(out / "metrics.jsonl", "w")
    metrics.writelines(json.dumps(r) + "\n" for r in kept)
    return metrics


# ---- plumbing: checkpoints and the trained model ----
class Checkpoints:
    """<out>/checkpoint.pt: the trainable weights and AdamW's state after a step; --resume loads it
    (saved: its step). after(step) writes it every --save-every steps (0: 3% of the run), when
    --save-minutes passed (rank 0's clock decides) and at --stop-after: rank 0 writes a .tmp and
    renames it, so a crash mid-write leaves the last one whole."""

    def __init__(self, args, total, model, optimizer, rank, world):
        self.args = args
        self.path = os.path.join(args.out, "checkpoint.pt")
        self.every = args.save_every or math.ceil(0.03 * total)
        self.parts = (model, optimizer, rank, world)
        self.saved = self.load(model, optimizer) if args.resume else 0  # the step it holds
        self.saved_at = time.time()

    def load(self, model, optimizer):
        try:
            ck = torch.load(self.path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
            reason = (str(e).strip().splitlines() or ["an empty file"])[0]
            fail(f"--resume: {self.path} is damaged ({type(e).__name__}: {reason}); start over "
                 f"with --overwrite")
        model.load_state_dict(ck["model"], strict=False)  # (the trainable weights only)
        optimizer.load_state_dict(ck["optim"])
        return ck["step"]

    def after(self, step):
        model, optimizer, rank, world = self.parts
        late = 0 < 60 * self.args.save_minutes <= time.time() - self.saved_at
        due = [step - self.saved >= self.every or late or step == self.args.stop_after]
        if world > 1:
            dist.broadcast_object_list(due, src=0)
        if due[0]:
            if rank == 0:
                trained = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
                torch.save({"step": step, "model": trained, "optim": optimizer.state_dict()},
                           self.path + ".tmp")
                os.replace(self.path + ".tmp", self.path)
            self.saved = step
            self.saved_at = time.time()

    def holds(self):
        if self.saved:
            return f"{self.path} holds step {self.saved}"
        return "no checkpoint.pt was written yet"


def save_model(model, processor, out, device):
    """The model and processor as a from_pretrained folder in load_model's dtype (bf16 on CUDA)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.save_pretrained(out, state_dict=state)
    processor.save_pretrained(out)
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

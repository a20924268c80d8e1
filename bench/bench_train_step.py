"""Benchmark: one P2-DPO training step (04): reference log-probs read from stage 03 vs a live reference model, and
a pair scored on one shared prefix vs a row per response.

TRL's DPOTrainer keeps a frozen copy of the model in memory by default and runs it on every batch. Stage 03 scores
every reference term once, before training, so 04 never holds a reference model. This script measures what that
buys, side by side in one run, on the same model, the same micro-batch and the same machine:
  precomputed  policy forwards + backward on the six terms (focus w/l, calibration aug/deg, robust w/l) + AdamW
  live_ref     the same step plus the reference model's no-grad forwards on the same six terms, fed the same
               tensors: images are decoded and the processor run once per step in both variants (a trainer's
               collator does it once for both models), so the difference is the reference's forwards alone
  shared_prefix  precomputed with 04's shared prefix (what 04 trains with): a pair's y_w and y_l in one row on
               one copy of the prompt and image; precomputed and live_ref score a row per response
               (term_batches(..., shared_prefix=False)), so shared_prefix / precomputed is what it buys
Each variant runs in its own subprocess (so peak memory is its own), alternated `--rounds` times; step time is the
median over steps (the first, warm-up, step excluded) and the best round. Peak memory: torch.cuda's peak allocation
on a GPU; on a CPU the peak resident set (VmHWM, reset after a warm-up that imports every lazily loaded module) less
the resident set at that reset.
Targets (issue 6): precomputed / live_ref peak memory <= 0.6 and step time <= 0.75; exits 1 when one is missed.
The shared prefix has no CPU target (issue 15's is lines/s on a GPU, bench/gpu_scale.py): its ratios are printed.

  python bench/bench_train_step.py                        # toy model + a 36M random LLaVA, CPU, about 6 minutes
  python bench/bench_train_step.py --models llava35m --compare shared_prefix    # the shared prefix alone
  python bench/bench_train_step.py --models llava35m --device cuda --batch-size 8
"""
import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from common import MODELS, build_model, load_stage, status_mb  # noqa: E402

TARGETS = {"memory": 0.6, "time": 0.75}  # live_ref's
VARIANTS = ("live_ref", "shared_prefix")  # each compared with precomputed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS,
                   help="toy: world/model (run 00_toy_world.py first); llava35m: a random 36M-parameter LLaVA config")
    p.add_argument("--batch-size", type=int, default=4, help="lines per micro-batch (each line: six scored rows)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the variants (machines are noisy)")
    p.add_argument("--compare", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                   help="the variants compared with precomputed (a row per response, reference read from stage 03)")
    p.add_argument("--lora-rank", type=int, default=32, help="as 04: LoRA r 32 (0: full fine-tuning)")
    p.add_argument("--grad-checkpointing", action="store_true", help="as 04's flag: recompute activations in backward")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (tiny models: 1 is fastest)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", nargs=2, metavar=("MODEL_DIR", "VARIANT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_examples(folder, n, image_size, seed=0):
    """n training examples in the form 04's parse_line returns, on random images; responses of 12-20 words."""
    rng = np.random.default_rng(seed)
    words = "there is a red circle and a blue square in the image yes no green triangle".split()
    paths = {}
    for role in ("image", "crop", "deg", "noise"):
        paths[role] = folder / f"{role}.png"
        Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(paths[role])
    say = lambda: " ".join(rng.choice(words, int(rng.integers(12, 21))))  # noqa: E731
    ex = lambda: {"prompt": "describe the image .", "prompt_enh": "answer the question mainly based on the first "  # noqa: E731
                  "image , answer this question : describe the image .",
                  "images": {"image": [str(paths["image"])], "deg": [str(paths["deg"])],
                             "noise": [str(paths["noise"])], "aug": [str(paths["image"]), str(paths["crop"])]},
                  "focus": (say(), say()), "robust": (say(), say()),
                  "ref": {k: -30.0 for k in ("focus_w", "focus_l", "aug", "deg", "robust_w", "robust_l")},
                  "clip": [1.2, 1.0]}
    return [ex() for _ in range(n)]


def worker(model_dir, variant, args):
    """One variant's steps in this process; prints a JSON line {"step_s", "peak_mb"}."""
    torch.set_num_threads(args.threads)
    s04 = load_stage("04_train_calibrated_dpo.py")
    targs = s04.parse_args(["--lora-rank", str(args.lora_rank), "--lr", "1e-5"]  # the paper's lr
                           + ["--grad-checkpointing"] * args.grad_checkpointing)
    shared_prefix = variant == "shared_prefix"
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        exs = make_examples(Path(tmp), args.batch_size, 64)
        if device.type == "cpu":  # import every lazily loaded module before the baseline, then reset the peak
            warm, processor = s04.load_model(model_dir, device)
            with torch.no_grad():
                batches = s04.term_batches(processor, exs, shared_prefix=shared_prefix)
                s04.policy_logps(warm, batches, len(exs), contextlib.nullcontext())
            del warm
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed pages back, so the baseline is what is live
            rss0 = status_mb("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak resident set (VmHWM) to now
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        model, processor = s04.load_model(model_dir, device)
        model = s04.prepare(model, targs, 1)
        ref = s04.load_model(model_dir, device)[0].requires_grad_(False) if variant == "live_ref" else None
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=targs.lr, weight_decay=targs.weight_decay)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
        times = []
        for _ in range(args.steps + 1):
            t0 = time.perf_counter()
            # images and processor: once, whatever the variant
            batches = s04.term_batches(processor, exs, shared_prefix=shared_prefix)
            if ref is not None:  # what a live reference costs: its forwards on every term of the batch
                with torch.no_grad():
                    logps = s04.policy_logps(ref, batches, len(exs), ctx)
                for i, ex in enumerate(exs):
                    ex["ref"] = {k: float(v[i]) for k, v in logps.items()}
            mb = [(ex, 1.0) for ex in exs]
            s04.micro_step(model, processor, mb, targs, ctx, 1 / len(exs), batches)  # forwards + backward
            torch.nn.utils.clip_grad_norm_(params, targs.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else status_mb("VmHWM") - rss0)
    print(json.dumps({"step_s": statistics.median(times[1:]), "peak_mb": peak,
                      "params_m": sum(p.numel() for p in model.parameters()) / 1e6}))


def main():
    args = parse_args()
    if args.worker:
        return worker(*args.worker, args)
    # each compared variant -> (what is measured, the quotient printed: the new way / the old way)
    quotients = {"live_ref": ("precomputed", "live_ref"), "shared_prefix": ("shared_prefix", "precomputed")}
    results, failed = {}, False
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model_dir = build_model(name, Path(tmp))
            runs = {v: [] for v in ("precomputed", *args.compare)}
            for _ in range(args.rounds):
                for variant in runs:
                    cmd = [sys.executable, __file__, "--worker", str(model_dir), variant,
                           *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                             if k in ("batch_size", "steps", "lora_rank", "device", "threads")],
                           *["--grad-checkpointing"] * args.grad_checkpointing]
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=
                                                                                       str(args.threads)))
                    if proc.returncode != 0:
                        raise SystemExit(f"{name} {variant} failed:\n{proc.stderr[-3000:]}")
                    runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            best = {v: {"step_s": min(r["step_s"] for r in rs), "peak_mb": min(r["peak_mb"] for r in rs)}
                    for v, rs in runs.items()}
            ratio = {}
            for v in args.compare:
                new, old = quotients[v]
                ratio[v] = {"time": best[new]["step_s"] / best[old]["step_s"],
                            "memory": best[new]["peak_mb"] / best[old]["peak_mb"]}
            results[name] = {"params_m": runs["precomputed"][0]["params_m"], **best, "ratio": ratio}
            if "live_ref" in ratio:
                failed |= any(ratio["live_ref"][k] > TARGETS[k] for k in TARGETS)
    print(f"device {args.device}, batch {args.batch_size} lines (6 scored terms each), LoRA r {args.lora_rank}, "
          f"gradient checkpointing {'on' if args.grad_checkpointing else 'off'}, "
          f"{args.threads} thread(s), best of {args.rounds} rounds x median of {args.steps} steps")
    for v in args.compare:
        new, old = quotients[v]
        short = {"precomputed": "pre", "live_ref": "live", "shared_prefix": "shared"}
        pair = f"({short[new]} / {short[old]})"
        print(f"{'model':<10} {'params':>7} {'step s ' + pair:>24} {'ratio':>6} {'peak MB ' + pair:>24} {'ratio':>6}")
        for name, r in results.items():
            print(f"{name:<10} {r['params_m']:6.1f}M {r[new]['step_s']:11.3f} / {r[old]['step_s']:<10.3f}"
                  f" {r['ratio'][v]['time']:6.2f} {r[new]['peak_mb']:11.0f} / {r[old]['peak_mb']:<10.0f}"
                  f" {r['ratio'][v]['memory']:6.2f}")
        if v == "live_ref":
            print(f"targets: time ratio <= {TARGETS['time']}, memory ratio <= {TARGETS['memory']}: "
                  + ("MISSED" if failed else "met"))
        else:
            print("shared: a pair's y_w and y_l on one prompt and image (04's default); pre: a row per response")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    sys.exit(1 if failed else 0)

if __name__ == "__main__":
    main()

"""Benchmark: the wall time of stages 01, 02 and 03 grows linearly with the number of instances.

Each stage runs as its own subprocess, exactly as a user types it (OMP_NUM_THREADS=1, --device cpu by default), on
the toy world's instances at each of --sizes (`--limit N` of <world>/instances.jsonl), chained per size in a
temporary folder: 01 -> crops_N.jsonl -> 02 -> pairs_N.jsonl -> 03 -> train_N.jsonl. Wall time covers the whole
process: imports, model load, the work, the writes. Work that grows faster than linearly (a rescan of the output
per line, a sort per batch, memory that grows with the file) shows as a per-instance time that rises with N; fixed
costs (imports, model load) make it fall, so linear growth reads as a ratio of about 1 or below:
  ratio       = (time / N at the largest size) / (time / N at the smallest size)
  intercept   = the fixed cost estimated by the least-squares line time = a + b N through the sizes (a)
  fixed cost  = the time measured at --limit --fixed-size (default 1): imports, model load and one instance
  marginal    = (time per added instance from the smallest to the largest size) / (the same from --fixed-size to
                the smallest size): a sharper check, free of the fixed cost; about 1 when growth is linear
                (it compares different lines of the file, so a change in the mix of prompts moves it too)
The stages run in rounds (--rounds); in each round every size runs, stage by stage, with the order of the sizes
alternating between rounds so machine noise hits all of them; the fastest round per (stage, size) is kept.
Stage 03 runs with thresholds that keep every line (--max-ppl 1e9, margin band +-1e9), since at a small N the
authors' filter can keep nothing, which 03 reports as an error; the scoring, which is the cost, is the same.
Target (issue 6): ratio <= 1.2 for every stage. Exits 1 when one is missed, or when a stage fails.

  python bench/bench_growth.py                         # toy world, CPU, sizes 50 and 200, about 3 minutes
  python bench/bench_growth.py --sizes 100 400 --rounds 1 --device cuda
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT

TARGET = 1.2
STAGES = ("01", "02", "03")
LOOSE_FILTER = ["--max-ppl=1e9", "--margin-low=-1e9", "--margin-high=1e9"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", default=str(ROOT / "world"), help="toy world folder (00_toy_world.py --out): its "
                   "instances.jsonl, model and clip")
    p.add_argument("--sizes", type=int, nargs="+", default=[50, 200], help="instance counts (--limit N) compared")
    p.add_argument("--fixed-size", type=int, default=1, help="also run at this --limit to measure the fixed cost "
                   "(0: skip)")
    p.add_argument("--rounds", type=int, default=2, help="repetitions of every run, best kept (machines are noisy)")
    p.add_argument("--device", default="cpu", help="--device passed to every stage")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the stage processes")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def stage_command(stage, world, folder, n, device):
    """The command line of one stage at size n; its input is the previous stage's output at the same size."""
    model, common = str(Path(world) / "model"), ["--limit", str(n), "--device", device]
    if stage == "01":
        return ["01_attention_crop.py", "--model", model, "--data", str(Path(world) / "instances.jsonl"),
                "--out", str(folder / f"crops_{n}.jsonl"), *common]
    if stage == "02":
        return ["02_make_pairs.py", "--model", model, "--data", str(folder / f"crops_{n}.jsonl"),
                "--out", str(folder / f"pairs_{n}.jsonl"), *common]
    return ["03_filter.py", "--model", model, "--clip", str(Path(world) / "clip"), "--data",
            str(folder / f"pairs_{n}.jsonl"), "--out", str(folder / f"train_{n}.jsonl"), *LOOSE_FILTER, *common]


def run_stage(stage, world, folder, n, args):
    """Wall seconds of one stage run into a fresh folder, as a user would start it."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, *stage_command(stage, world, folder, n, args.device)]
    cmd[1] = str(ROOT / cmd[1])
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} at --limit {n} failed ({proc.returncode}): {' '.join(cmd)}\n"
                         f"{proc.stderr[-3000:]}")
    return seconds


def line_fit(sizes, seconds):
    """(a, b) of the least-squares line seconds = a + b * size."""
    mx, my = sum(sizes) / len(sizes), sum(seconds) / len(seconds)
    b = sum((x - mx) * (y - my) for x, y in zip(sizes, seconds)) / sum((x - mx) ** 2 for x in sizes)
    return my - b * mx, b


def main():
    args = parse_args()
    sizes = sorted(set(args.sizes))
    if len(sizes) < 2:
        raise SystemExit("--sizes needs two different instance counts")
    data = Path(args.world) / "instances.jsonl"
    if not data.is_file():
        raise SystemExit(f"{data} not found: run `python 00_toy_world.py` first, or pass --world")
    n_instances = sum(1 for line in open(data) if line.strip())
    if sizes[-1] > n_instances:
        raise SystemExit(f"{args.world}/instances.jsonl has {n_instances} lines, fewer than --sizes {sizes[-1]}")
    runs = sizes + ([args.fixed_size] if args.fixed_size and args.fixed_size not in sizes else [])
    best = {(s, n): float("inf") for s in STAGES for n in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = runs if r % 2 == 0 else runs[::-1]
            for stage in STAGES:
                for n in order:  # each (round, size) chain in its own folder, so nothing resumes
                    seconds = run_stage(stage, args.world, Path(tmp) / f"round{r}" / f"n{n}", n, args)
                    best[stage, n] = min(best[stage, n], seconds)
                    print(f"round {r + 1}/{args.rounds} stage {stage} --limit {n}: {seconds:.2f} s", flush=True)
    results, missed = {}, []
    for stage in STAGES:
        secs = [best[stage, n] for n in sizes]
        a, b = line_fit(sizes, secs)
        per = [t / n for t, n in zip(secs, sizes)]
        results[stage] = {"seconds": dict(zip(map(str, sizes), secs)),
                          "per_instance_s": dict(zip(map(str, sizes), per)),
                          "ratio": per[-1] / per[0], "intercept_s": a, "slope_s": b,
                          "fixed_s": best[stage, args.fixed_size] if args.fixed_size else None, "marginal": None}
        if args.fixed_size and args.fixed_size < sizes[0]:
            first = (secs[0] - best[stage, args.fixed_size]) / (sizes[0] - args.fixed_size)
            results[stage]["marginal"] = (secs[-1] - secs[0]) / (sizes[-1] - sizes[0]) / first
        if results[stage]["ratio"] > TARGET:
            missed.append(f"{stage}: {results[stage]['ratio']:.2f}")
    print(f"device {args.device}, OMP_NUM_THREADS={args.threads}, best of {args.rounds} round(s), "
          f"instances from {Path(args.world) / 'instances.jsonl'}")
    fixed = f" {'t(N=' + str(args.fixed_size) + ')':>9} {'marginal':>9}" if args.fixed_size else ""
    print(f"{'stage':<6}" + "".join(f" {'t(N=' + str(n) + ')':>10} {'t/N':>8}" for n in sizes)
          + f" {'ratio':>6} {'intercept':>10} {'s/instance':>11}" + fixed)
    for stage, r in results.items():
        print(f"{stage:<6}" + "".join(f" {r['seconds'][str(n)]:9.2f}s {r['per_instance_s'][str(n)]:7.3f}s"
                                      for n in sizes)
              + f" {r['ratio']:6.2f} {r['intercept_s']:9.2f}s {r['slope_s']:10.4f}s"
              + (f" {r['fixed_s']:8.2f}s " + (f"{r['marginal']:9.2f}" if r["marginal"] is not None else f"{'-':>9}")
                 if args.fixed_size else ""))
    print(f"target: ratio (per-instance time at N={sizes[-1]} / at N={sizes[0]}) <= {TARGET}: "
          + ("MISSED: " + "; ".join(missed) if missed else "met"))
    if args.json:
        Path(args.json).write_text(json.dumps({"sizes": sizes, "fixed_size": args.fixed_size, "stages": results},
                                              indent=1))
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()

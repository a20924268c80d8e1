"""The whole P2-DPO pipeline on the toy world, 00 -> 05, ending with base vs P2-DPO; --ablations for the paper's table.

Runs each stage as its own script, exactly as a user would type it, and hands the JSONL files on:
  00 world/ -> 01 runs/crops.jsonl -> 02 runs/seed<S>/pairs.jsonl -> 03 runs/seed<S>/train.jsonl
     -> 04 runs/seed<S>/<variant>/ -> 05 runs/seed<S>/eval_<variant>_<split>/ (runs/eval_base_<split>/: base)
Every stage resumes, so a second run only redoes what is missing (04 counts as done when its model folder is saved;
02 and 03 refuse to resume into an output made with other settings): after changing a setting, use another --runs.
Stage 01 is greedy, so its crops do not depend on the seed; 02 (sampling), 03 and 04 run once per seed.
The held-out POPE files (world/pope) are only ever evaluated; tuning used world/val (--split val).

Variants (the paper's ablation table): full, no_focus, no_robust, no_calib, no_ddw (04's --no-* switches); and
filter_dpo (03 with --filter-context dpo), offpolicy (the paper's baseline: plain DPO on human-style corrections,
analysis/offpolicy_pairs.py).
Output: <runs>/results.md (main command) or <runs>/ablations.md (--ablations): tables of POPE accuracy / F1 /
yes-ratio per split and mean at each sigma, and CHAIR on descriptions, mean +- std over seeds. --ablations also runs
the perception diagnostic (analysis/perception_diagnostic.py: stage 01 on one open question per test image, for the
base model and every trained model) into <runs>/perception_<split>/ and adds its table: open-question accuracy, AFR,
attention ratio, P-Acc, the error split; and the world's four phenomenon numbers (analysis/world_phenomena.py: the
base model on world/val, before any training) into <runs>/world_phenomena/. Not in the main command: base and
P2-DPO cost 75 s on 2 busy CPU cores, the world's numbers about 100 s.

  python pipeline.py                   # 00 -> 05, seed 0: base vs P2-DPO; 3.5 min on 2 CPU cores (00: 1.6 of them)
  python pipeline.py --ablations       # + the four ablations, filter_dpo, offpolicy, seeds 0 1 2, perception
  python pipeline.py --ablations --variants full offpolicy     # only these trained variants
  python pipeline.py --split val --runs runs/tune      # the same on the validation split, for tuning
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VARIANTS = {"full": [], "no_focus": ["--no-focus"], "no_robust": ["--no-robust"], "no_calib": ["--no-calib"],
            "no_ddw": ["--no-ddw"], "filter_dpo": [], "offpolicy": ["--no-calib"]}
# the variants trained on another train.jsonl than 03's default one (both made per seed with --ablations):
# filter_dpo: 03 with --filter-context dpo (both responses scored in the branch's DPO context);
# offpolicy: the paper's baseline, plain DPO on human-style corrections (analysis/offpolicy_pairs.py), as many
# lines as P2-DPO's (the same steps, the same lr), 03's filter open as for RLHF-V's human pairs
VARIANT_DATA = {"filter_dpo": "train_filter_dpo.jsonl", "offpolicy": "train_offpolicy.jsonl"}
PAPER_F1 = {"base": 85.10, "full": 87.44, "no_focus": 85.84, "no_robust": 85.27, "no_calib": 86.17, "no_ddw": 86.68}
# Extra flags of the stages (empty: each stage's defaults). The toy world's tuned settings (04's lr 1e-4: why,
# and the values tried, in 00_toy_world.py's STAGE_SETTINGS) live in world/world.json, which each stage reads
# when its --model is world/model, so `python 04_train_calibrated_dpo.py` alone trains the same model.
# Everything else is each stage's default, the paper's or the authors' code's (the authors' filter
# thresholds, beta 0.1, lambda_calib 0.3, 4 epochs, batch 16).
PAIR_FLAGS = ""
# Looser filters (PPL < 10, margin in [-2, 2], then scored in the DPO context: 375 lines, most of them robustness
# pairs) gave accuracy 0.874 clean / 0.618 at sigma 0.2 on world/val at lr 1e-4 and drove the sigma-0.2 yes-ratio
# to 0.18 at 5e-4.
FILTER_FLAGS = ""
TRAIN_FLAGS = ""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", default="world", help="toy world folder (built by 00_toy_world.py when missing)")
    p.add_argument("--runs", default="runs", help="folder for every stage's output")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="evaluate on the held-out world/pope (test) or on world/val (val: for tuning)")
    p.add_argument("--ablations", action="store_true", help="also train --no-focus, --no-robust, --no-calib, "
                   "--no-ddw (the paper's ablation table), --filter-context dpo and the off-policy baseline; "
                   "default seeds become 0 1 2")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                   help="trained variants (default: full; with --ablations: all of them)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of stages 02-04 (default: 0; with "
                   "--ablations: 0 1 2)")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.2], help="POPE noise levels (paper: 0, 0.2)")
    p.add_argument("--pair-flags", default=PAIR_FLAGS, help="extra flags for 02_make_pairs.py (one string)")
    p.add_argument("--filter-flags", default=FILTER_FLAGS, help="extra flags for 03_filter.py (one string; a "
                   "negative number needs '=': --margin-low=-0.5)")
    p.add_argument("--train-flags", default=TRAIN_FLAGS, help="extra flags for 04_train_calibrated_dpo.py (one "
                   "string; a flag given here overrides world.json's toy setting, e.g. --lr; a saved model is "
                   "not retrained: after changing these, use another --runs)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="trainings / evaluations run side by side (tiny models use one thread each)")
    return p.parse_args(argv)


# ---- plumbing: running the stages ----
def command(script, *args):
    return [sys.executable, str(ROOT / script), *map(str, args)]


def run(cmd, log, what):
    run_many([(cmd, log, what)], 1)


def run_many(jobs, n):
    """Run (cmd, log, what) jobs, n at a time, each to the end; the first failure stops them all."""
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < n:
            cmd, log, what = pending.pop(0)
            with open(log, "w") as f:  # in the caller's folder: paths in the extra flags mean what they typed
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV)
            running.append((proc, cmd, log, what, time.time()))
        time.sleep(0.2)
        for job in [job for job in running if job[0].poll() is not None]:
            running.remove(job)
            proc, cmd, log, what, t0 = job
            if proc.returncode != 0:
                for other in running:
                    other[0].kill()
                raise SystemExit(f"{what} failed (exit {proc.returncode}): {shlex.join(cmd)}\n--- {log} ---\n"
                                 f"{Path(log).read_text()[-3000:]}")
            print(f"  {what}: {time.time() - t0:.0f}s", flush=True)


ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
# ---- end plumbing ----


def evaluation(model, out, args, questions, describe):
    return (command("05_eval_pope.py", "--model", model, "--questions", questions, "--describe", describe,
                    "--noise-sigma", *args.sigmas, "--out", out), f"{out}.log", f"05 {Path(out).name}")


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values, digits=3):
    m, s = mean_std(values)
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if len(values) > 1 else "")


def results_table(results, sigmas, splits):
    """Markdown: a row per variant and sigma, POPE per split and mean, then CHAIR. results: {variant: [metrics]}."""
    lines = []
    for s in sigmas:
        lines += [f"\n**sigma {s}** (POPE accuracy / F1 / yes-ratio; mean over the {len(splits)} splits)\n",
                  "| model | " + " | ".join(f"{sp} acc | {sp} F1 | {sp} yes" for sp in [*splits, "mean"]) + " |",
                  "|---|" + "---|" * 3 * (len(splits) + 1)]
        for variant, runs in results.items():
            cells = [fmt([m["pope"][s][sp][k] if sp != "mean" else m["mean"][s][k] for m in runs])
                     for sp in [*splits, "mean"] for k in ("accuracy", "f1", "yes_ratio")]
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["\n**CHAIR** on the description prompts (lower CHAIR_i / CHAIR_s is better; recall: true objects named)\n",
              "| model | " + " | ".join(f"sigma {s} {k}" for s in sigmas for k in ("CHAIR_i", "CHAIR_s", "recall"))
              + " |", "|---|" + "---|" * 3 * len(sigmas)]
    for variant, runs in results.items():
        lines.append(f"| {variant} | " + " | ".join(fmt([m["chair"][s][k] for m in runs]) for s in sigmas
                                                    for k in ("chair_i", "chair_s", "recall")) + " |")
    return "\n".join(lines)


def data_table(runs, seeds, variants):
    """Markdown: per training file (03's report beside it), the lines and the pairs each branch keeps, the lines
    that keep both (the only ones DDW weighs) and the CLIP gain ratio r over those, mean ± std over seeds."""
    lines = ["\n**Training data** (stage 03's report; DDW weighs only the lines that keep both branches)\n",
             "| train file (variants) | lines | focus kept / pairs | robust kept / pairs | both branches | "
             "r of those: median | 5-95% |", "|---|---|---|---|---|---|---|"]
    files = {}
    for v in variants:
        files.setdefault(VARIANT_DATA.get(v, "train.jsonl"), []).append(v)
    for name, users in files.items():
        reports = [json.loads((runs / f"seed{s}" / name).with_suffix(".report.json").read_text()) for s in seeds]
        get = lambda key: fmt([key(r) for r in reports], 0)  # noqa: E731
        branch = lambda b: get(lambda r: r["branches"].get(b, {}).get("kept", 0)) + " / " + get(  # noqa: E731
            lambda r: r["branches"].get(b, {}).get("pairs", 0))
        r_both = [r.get("clip_ratio_kept_both") or {} for r in reports]
        ratio = lambda key: [x[key] for x in r_both if x.get(key) is not None]  # noqa: E731
        median = fmt(ratio("median"), 2) if ratio("median") else "-"  # "-": 03 reported no CLIP ratio
        spread = f"{fmt(ratio('p05'), 2)} - {fmt(ratio('p95'), 2)}" if ratio("p05") and ratio("p95") else "-"
        lines.append(f"| {name} ({', '.join(users)}) | {get(lambda r: r['written'])} | {branch('focus')} | "
                     f"{branch('robust')} | {get(lambda r: r.get('kept_both', 0))} | {median} | {spread} |")
    return "\n".join(lines)


def perception_table(metrics, seeds, variants):
    """Markdown: the perception diagnostic (analysis/perception_diagnostic.py's metrics.json, names base and
    <variant>_seed<S>): open-question accuracy, AFR, attention ratio, P-Acc and the error split, mean ± std over
    seeds."""
    base = metrics["base"]
    lines = [f"\n**Perception** (analysis/perception_diagnostic.py: {base['n']} open questions about one object, "
             f"one per image of the split; AFR = 100 x stage 01's attention mass inside the object's true box; "
             f"attention ratio = that mass / the box's share of the image (uniform = 1); P-Acc = accuracy on the "
             f"{base['n_focus']} questions whose ratio is >= {base['focus_ratio']:g} in the fixed map (the base "
             f"model's, under the true answer, forced), the same questions for every model; P-Acc top half: on the "
             f"{base['n_top']} whose fixed-map ratio is >= its median, {base['median_ratio']:.2f}; processing "
             f"failures: the share of wrong answers whose own stage 01 crop holds the object)\n",
             "| model | open-question accuracy % | AFR | attention ratio | P-Acc % | P-Acc top half % | "
             "processing failures % |", "|---|---|---|---|---|---|---|"]
    rows = {"base": [base]}
    rows.update({("P2-DPO" if v == "full" else v): [metrics[f"{v}_seed{s}"] for s in seeds] for v in variants})
    for name, runs in rows.items():
        cells = [fmt([m[k] for m in runs], d) for k, d in
                 (("accuracy", 1), ("afr", 2), ("attention_ratio", 2), ("p_acc", 1), ("p_acc_top", 1),
                  ("processing_pct", 1))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def phenomena_table(m):
    """Markdown: the world's four phenomenon numbers (analysis/world_phenomena.py's metrics.json: the base model on
    world/val, before any training), with the targets they were built to meet."""
    o, c, s, d = m["open"], m["colour"], m["shape"], m["degenerate"]["all"]
    return ("\n**The world** (analysis/world_phenomena.py: the base model on world/val's open questions, before any "
            "training; does it hold the failure P2-DPO repairs?)\n\n"
            "| number | open | colour questions | shape questions | target |\n|---|---|---|---|---|\n"
            f"| stage 01's crop holds the object % | {o['hold_pct']} | {c['hold_pct']} | {s['hold_pct']} | >= 80 |\n"
            f"| zoom gain: (I, 01's crop) + P_enh minus I alone, points | {o['zoom_gain']:+.1f} | "
            f"{c['zoom_gain']:+.1f} | {s['zoom_gain']:+.1f} | >= +15 |\n"
            f"| the same with a crop around the true box, points | {o['oracle_gain']:+.1f} | "
            f"{c['oracle_gain']:+.1f} | {s['oracle_gain']:+.1f} | |\n"
            f"| processing failures (01's crop holds the object) among wrong answers % | {o['processing_pct']} | "
            f"{c['processing_pct']} | {s['processing_pct']} | > 50 |\n"
            f"| answers under P_enh degenerate for their prompt kind % (all {d['n']} prompts) | "
            f"{d['degenerate_pct']} | | | <= 5 |\n")


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    seeds = args.seeds or ([0, 1, 2] if args.ablations else [0])
    variants = args.variants or (list(VARIANTS) if args.ablations else ["full"])
    world, runs = Path(args.world).resolve(), Path(args.runs).resolve()  # every stage gets absolute paths
    runs.mkdir(parents=True, exist_ok=True)
    questions = world / ("pope" if args.split == "test" else "val/pope")
    describe = world / ("describe.jsonl" if args.split == "test" else "val/describe.jsonl")
    args.sigmas = [f"{s:g}" for s in args.sigmas]

    print("00 toy world", flush=True)
    if (world / "world.json").is_file() and (world / "model" / "config.json").is_file():
        print(f"  {world} is built: skipped")
    else:
        run(command("00_toy_world.py", "--out", world), runs / "00_toy_world.log", "00")
    model, crops = world / "model", runs / "crops.jsonl"
    print("01 attention crops", flush=True)
    run(command("01_attention_crop.py", "--model", model, "--data", world / "instances.jsonl", "--out", crops),
        runs / "01_attention_crop.log", "01")
    for seed in seeds:
        d = runs / f"seed{seed}"
        d.mkdir(exist_ok=True)
        print(f"02-03 pairs and filter, seed {seed}", flush=True)
        run(command("02_make_pairs.py", "--model", model, "--data", crops, "--out", d / "pairs.jsonl", "--seed", seed,
                    *shlex.split(args.pair_flags)), d / "02_make_pairs.log", "02")
        run(command("03_filter.py", "--model", model, "--clip", world / "clip", "--data", d / "pairs.jsonl",
                    "--out", d / "train.jsonl", *shlex.split(args.filter_flags)), d / "03_filter.log", "03")
        if "filter_dpo" in variants:
            run(command("03_filter.py", "--model", model, "--clip", world / "clip", "--data", d / "pairs.jsonl",
                        "--out", d / VARIANT_DATA["filter_dpo"], *shlex.split(args.filter_flags),
                        "--filter-context", "dpo"), d / "03_filter_dpo.log", "03 --filter-context dpo")
        if "offpolicy" in variants:
            run(command("analysis/offpolicy_pairs.py", "--pairs", d / "pairs.jsonl", "--world", world,
                        "--lines", d / "train.jsonl", "--out", d / "offpolicy_pairs.jsonl", "--seed", seed),
                d / "offpolicy_pairs.log", "off-policy pairs")
            run(command("03_filter.py", "--model", model, "--clip", "none", "--data", d / "offpolicy_pairs.jsonl",
                        "--out", d / VARIANT_DATA["offpolicy"], "--max-ppl", "1e9", "--margin-low=-1e9",
                        "--margin-high", "1e9"), d / "03_offpolicy.log", "03 off-policy (no filter)")
    print(f"04 training ({', '.join(variants)} x seeds {', '.join(map(str, seeds))})", flush=True)
    data = lambda s, v: runs / f"seed{s}" / VARIANT_DATA.get(v, "train.jsonl")  # noqa: E731
    train = [(command("04_train_calibrated_dpo.py", "--model", model, "--data", data(s, v),
                      "--out", runs / f"seed{s}" / v, "--seed", s, *VARIANTS[v], *shlex.split(args.train_flags),
                      *(["--resume"] if (runs / f"seed{s}" / v / "checkpoint.pt").is_file() else [])),
              runs / f"seed{s}" / f"04_{v}.log", f"04 seed {s} {v}")
             for s in seeds for v in variants if not (runs / f"seed{s}" / v / "config.json").is_file()]
    run_many(train, args.jobs)
    print(f"05 POPE ({args.split}, sigma {', '.join(args.sigmas)}) and CHAIR", flush=True)
    evals = [evaluation(model, runs / f"eval_base_{args.split}", args, questions, describe)]
    evals += [evaluation(runs / f"seed{s}" / v, runs / f"seed{s}" / f"eval_{v}_{args.split}", args, questions,
                         describe) for s in seeds for v in variants]
    run_many(evals, args.jobs)

    read = lambda path: json.loads((Path(path) / "metrics.json").read_text())  # noqa: E731
    results = {"base": [read(runs / f"eval_base_{args.split}")]}
    results.update({("P2-DPO" if v == "full" else v): [read(runs / f"seed{s}" / f"eval_{v}_{args.split}")
                                                        for s in seeds] for v in variants})
    splits = list(results["base"][0]["pope"][args.sigmas[0]])
    perception = ""
    if args.ablations:
        print("perception diagnostic (analysis/perception_diagnostic.py)", flush=True)
        models = [f"base={model}"] + [f"{v}_seed{s}={runs / f'seed{s}' / v}" for s in seeds for v in variants]
        run(command("analysis/perception_diagnostic.py", "--world", world, "--split", args.split,
                    "--out", runs / f"perception_{args.split}",
                    "--jobs", args.jobs, *[x for m in models for x in ("--model", m)]),
            runs / f"perception_{args.split}.log", "perception")
        metrics = json.loads((runs / f"perception_{args.split}" / "metrics.json").read_text())
        perception = perception_table(metrics, seeds, variants)
        print("the world's four phenomena (analysis/world_phenomena.py)", flush=True)
        run(command("analysis/world_phenomena.py", "--world", world, "--out", runs / "world_phenomena"),
            runs / "world_phenomena.log", "world phenomena")
        perception += phenomena_table(json.loads((runs / "world_phenomena" / "metrics.json").read_text()))
    title = (f"P2-DPO on the toy world: {args.split} split, seeds {', '.join(map(str, seeds))} "
             f"(mean ± std over seeds; the base model is one model), {time.time() - t_start:.0f}s")
    table = (f"# {title}\n" + results_table(results, args.sigmas, splits) + "\n"
             + data_table(runs, seeds, variants) + "\n" + perception)
    out = runs / ("ablations.md" if args.ablations else "results.md")
    out.write_text(table)
    print("\n" + table + f"\nwritten to {out}")


if __name__ == "__main__":
    main()

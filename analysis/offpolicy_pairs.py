"""The paper's baseline on the toy world: DPO on off-policy, human-style corrections (as RLHF-V's pairs).

The paper compares P2-DPO with DPO on human-corrected pairs (RLHF-V): an annotator rewrites the model's answer,
chosen = the correction, rejected = the model's own answer, both under (I, P). The toy world knows the truth, so
this script writes such pairs for the instances whose own greedy answer (stage 01's "answer") is not the truth:
chosen = the truth phrased as an annotator might (analysis/ips_on_vs_off_policy.py's rephrase: words the toy model
knows, never in this order), rejected = the model's own answer. They go out in stage 02's format (a "focus" pair,
"robust": null, the instance's derived images copied from the seed's pairs.jsonl, so 03 can score every term), to
be scored by 03 with the filter open (human pairs are not filtered) and trained by 04 as plain DPO under (I, P)
(--no-calib; a line with one branch has weight 1). To train the same number of steps as P2-DPO, --lines takes as
many lines as P2-DPO's train.jsonl holds (drawn with --seed; all of them when there are fewer).

  python analysis/offpolicy_pairs.py --pairs runs/seed0/pairs.jsonl --lines runs/seed0/train.jsonl \\
      --out runs/seed0/offpolicy_pairs.jsonl
  python 03_filter.py --data runs/seed0/offpolicy_pairs.jsonl --out runs/seed0/train_offpolicy.jsonl \\
      --max-ppl 1e9 --margin-low=-1e9 --margin-high 1e9 --clip none
  python 04_train_calibrated_dpo.py --data runs/seed0/train_offpolicy.jsonl --out runs/seed0/offpolicy --no-calib
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # stage_loader.py sits in the repository root
from stage_loader import load_stage  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", default="runs/seed0/pairs.jsonl",
                   help="pairs.jsonl from stage 02 (the instances, 01's answer, the derived images)")
    p.add_argument("--world", default="world", help="the toy world (truth.jsonl)")
    p.add_argument("--lines", default=None,
                   help="P2-DPO's train.jsonl: write as many lines as it has (the same steps in 04)")
    p.add_argument("--out", default="runs/seed0/offpolicy_pairs.jsonl",
                   help="output JSONL in stage 02's format; must sit in --pairs' folder (relative image paths)")
    p.add_argument("--seed", type=int, default=0, help="draws the lines when there are more than --lines")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    toy = load_stage("00_toy_world.py")
    ips = load_stage("analysis/ips_on_vs_off_policy.py")
    pairs = Path(args.pairs)
    world = Path(args.world)
    out = Path(args.out)
    assert out.parent.resolve() == pairs.parent.resolve(), "--out must sit beside --pairs (relative paths)"
    truth = {(world / r["image"]).resolve(): r["objects"] for r in map(json.loads, open(world / "truth.jsonl"))}
    rows = []
    for row in map(json.loads, open(pairs)):
        objects = truth[(pairs.parent / row["image"]).resolve()]
        answer = ips.truth_answer(row["prompt"], objects, toy.describe)
        if answer is None or row["answer"].strip() == answer:  # nothing for an annotator to correct
            continue
        rows.append({**{k: row[k] for k in ("id", "image", "prompt", "prompt_enh", "images")},
                     "focus": {"chosen": ips.rephrase(row["prompt"], answer, objects), "rejected": row["answer"]},
                     "robust": None, "gen": {"off_policy": "truth rephrased > the model's greedy answer"}})
    n_candidates = len(rows)
    if args.lines:
        n = sum(1 for line in open(args.lines) if line.strip())
        if n < len(rows):
            keep = np.random.default_rng(args.seed).choice(len(rows), n, replace=False)
            rows = [rows[i] for i in sorted(keep)]
    with open(out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{out}: {len(rows)} off-policy pairs (of {n_candidates} instances whose own answer is not the truth)")


if __name__ == "__main__":
    main()

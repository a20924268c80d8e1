"""Implicit preference strength of on-policy pairs (the model's own, from 02) vs off-policy pairs (the truth as chosen).

The paper compares IPS = log pi_ref(y_w | I, P) - log pi_ref(y_l | I, P) of its self-generated pairs with human-written
pairs (RLHF-V): off-policy chosen responses are text the model would not write, so their IPS is far from 0 and often
negative, and DPO on them spends its updates on style rather than on the image. The toy world knows the truth, so
the off-policy pairs here keep each focus pair's rejected response and replace the chosen one with the truth,
written either in the world's own words (00's description template, the very text the model was fine-tuned on;
the object's name for a question) or rephrased as an annotator might ("the image shows ..." with the objects
right to left after "in the image :"; "the shape of the object is a ..." or "the colour is ..." for a question,
all in the toy vocabulary).
Both files are scored by `03_filter.py --score-only` under the same reference model and context (I, P).

  python analysis/ips_on_vs_off_policy.py            # after pipeline.py: reads runs/seed0/pairs.jsonl, ~30 s on CPU
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # stage_loader.py sits in the repository root
from stage_loader import load_stage  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", default="runs/seed0/pairs.jsonl", help="pairs.jsonl from stage 02")
    p.add_argument("--world", default="world", help="the toy world (truth.jsonl, model/)")
    p.add_argument("--out", default="runs/ips", help="folder for the two preference files and their reports")
    return p.parse_args(argv)


def truth_answer(prompt, objects, describe):
    """The right answer in the world's own words (its fine-tuning replies: 00's description, the object's name
    "red square" for an open question), or None when the question has no unique answer."""
    words = prompt.split()
    if words[0] == "describe":
        return describe(objects)
    if words[:2] == ["what", "shape"]:  # what shape is the <colour> object ?
        found = [o["class"] for o in objects if o["class"].split()[0] == words[4]]
    else:  # what colour is the <shape> ?
        found = [o["class"] for o in objects if o["class"].split()[1] == words[4]]
    return found[0] if len(found) == 1 else None


def rephrase(prompt, answer, objects):
    """The same truth in words the toy model knows but was never trained to say in this order."""
    if answer.startswith("there is "):
        names = [f"a {o['class']}" for o in sorted(objects, key=lambda o: -o["box"][0])]
        return "in the image : " + " and ".join(names) + " ."
    colour, shape = answer.split()
    return f"the shape of the object is a {shape} ." if prompt.startswith("what shape") else f"the colour is {colour} ."


def main():
    args = parse_args()
    toy = load_stage("00_toy_world.py")
    pairs, world, out = Path(args.pairs), Path(args.world), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    truth = {(world / r["image"]).resolve(): r["objects"] for r in map(json.loads, open(world / "truth.jsonl"))}
    files = {"on-policy": out / "on_policy.jsonl", "off-policy": out / "off_policy.jsonl",
             "rephrased": out / "off_policy_rephrased.jsonl"}
    n = 0
    with open(files["on-policy"], "w") as on, open(files["off-policy"], "w") as off, \
            open(files["rephrased"], "w") as re_off:
        for row in map(json.loads, open(pairs)):
            image = (pairs.parent / row["image"]).resolve()
            answer = truth_answer(row["prompt"], truth[image], toy.describe)
            if not row.get("focus") or answer is None or answer == row["focus"]["rejected"]:
                continue
            line = {"id": row["id"], "image": str(image), "prompt": row["prompt"], "rejected": row["focus"]["rejected"]}
            on.write(json.dumps({**line, "chosen": row["focus"]["chosen"]}) + "\n")
            off.write(json.dumps({**line, "chosen": answer}) + "\n")
            re_off.write(json.dumps({**line, "chosen": rephrase(row["prompt"], answer, truth[image])}) + "\n")
            n += 1
    if n == 0:
        raise SystemExit(f"{pairs}: no focus pair whose rejected response differs from the truth: nothing to score")
    reports = {}
    for name, path in files.items():
        cmd = [sys.executable, str(ROOT / "03_filter.py"), "--score-only", "--model", str(world / "model"),
               "--clip", "none", "--data", str(path), "--out", str(path.with_suffix(".scored.jsonl"))]
        subprocess.run(cmd, check=True, capture_output=True, text=True)  # paths: as the caller gave them
        reports[name] = json.loads(path.with_suffix(".scored.report.json").read_text())["branches"]["pair"]["ips_all"]
    print(f"IPS = log pi_ref(y_w | I, P) - log pi_ref(y_l | I, P), summed, {n} focus pairs of {pairs} "
          f"(the same rejected responses; chosen: the model's own vs the truth)")
    print(f"{'pairs':<11} {'mean':>8} {'std':>8} {'median':>8} {'share < 0':>10}")
    for name, r in reports.items():
        print(f"{name:<11} {r['mean']:8.2f} {r['std']:8.2f} {r['median']:8.2f} {r['negative']:10.3f}")
    (out / "ips.json").write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()

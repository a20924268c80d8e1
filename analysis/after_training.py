"""What training changed in a model's answers, beside POPE and CHAIR: colour and shape words, and Delta pi.

A preference loss can move a model towards words its chosen responses favour (a learnt bias) rather than towards
the image. On the toy world this script counts, for each model:
  open questions   answers of the perception diagnostic (analysis/perception_diagnostic.py: <perception>/<name>/
                   crops.jsonl, one held-out question per image) per asked kind: accuracy (the diagnostic's rule)
                   and how often each colour / shape word is answered
  descriptions     colour / shape words over 05's clean descriptions (<eval>/describe.jsonl, sigma 0), and
                   how many of those name a word no object of the image has (wrong)
and, with --scored, the calibration quantity on the same training lines under the reference and the trained model:
  Delta pi(y_w) = log pi(y_w | I_aug, P_enh) - log pi(y_w | I_deg, P)   (stage 04's L_calib pushes it up)
from 03's "ref" of train.jsonl (the reference model) and of the same pairs scored by 03 with the trained model.

  python analysis/after_training.py --perception runs/perception --model base=runs/eval_base_test \\
      --model p2dpo=runs/seed0/eval_full_test
  python 03_filter.py --model runs/seed0/full --data runs/seed0/pairs.jsonl --clip none --max-ppl 1e9 \\
      --margin-low=-1e9 --margin-high 1e9 --out runs/seed0/rescored/train.jsonl
  python analysis/after_training.py --train runs/seed0/train.jsonl --scored runs/seed0/rescored/train.jsonl
"""
import argparse
import json
import statistics
import string
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # stage_loader.py sits in the repository root
from stage_loader import load_stage  # noqa: E402

TOY = load_stage("00_toy_world.py")
COLOURS = tuple(TOY.COLOURS)  # the world's words
SHAPES = tuple(TOY.SHAPES)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--perception", default=None, help="the perception diagnostic's --out folder")
    p.add_argument("--model", action="append", default=[], metavar="NAME=EVAL",
                   help="a model's name in the diagnostic and its 05 --out folder (describe.jsonl); repeatable")
    p.add_argument("--world", default="world", help="the toy world (truth.jsonl: the descriptions' wrong words)")
    p.add_argument("--train", default=None, help="train.jsonl (03 under the reference model)")
    p.add_argument("--scored", default=None, help="the same pairs scored by 03 with the trained model")
    p.add_argument("--out", default=None, help="write the numbers as JSON here (default: print only)")
    args = p.parse_args(argv)
    if bool(args.train) != bool(args.scored):
        p.error("--train and --scored go together")
    if not args.model and not args.train:
        p.error("nothing to do: give --model NAME=EVAL (with --perception) or --train and --scored")
    return args


def words(texts, truths=None):
    """How many texts name each colour / shape word (once per text); with truths (each text's set of true
    words), how many of them name it wrongly."""
    count = Counter()
    for text, true in zip(texts, truths or [None] * len(texts)):
        said = {w.strip(string.punctuation) for w in text.lower().split()} & set(COLOURS + SHAPES)
        count.update(said if true is None else said - true)
    return {w: count[w] for w in COLOURS + SHAPES}


def open_answers(perception, name, judge):
    """{kind: {"n", "accuracy", "words"}} over the diagnostic's questions answered by model `name`."""
    truth = {q["id"]: q for q in map(json.loads, open(perception / "questions_truth.jsonl"))}
    answers = {r["id"]: r["answer"] for r in map(json.loads, open(perception / name / "crops.jsonl"))}
    out = {}
    for kind, vocabulary in (("colour", COLOURS), ("shape", SHAPES)):
        ids = [i for i, q in truth.items() if q["kind"] == kind and i in answers]
        right = sum(judge(answers[i], truth[i]["answer"], vocabulary) for i in ids)
        out[kind] = {"n": len(ids), "accuracy": 100 * right / max(len(ids), 1),
                     "words": words([answers[i] for i in ids])}
    return out


def delta_pi(train, scored):
    """Delta pi(y_w) on the focus lines train.jsonl trains (keep.focus) that the scored file holds too:
    (reference, trained) lists, in the same order."""
    def per_id(path, kept_only):
        return {r["id"]: r["ref"]["calib_aug_w"] - r["ref"]["calib_deg_w"] for r in map(json.loads, open(path))
                if r.get("focus") and (r.get("ref") or {}).get("calib_aug_w") is not None
                and (not kept_only or (r.get("keep") or {}).get("focus"))}
    ref, new = per_id(train, True), per_id(scored, False)
    ids = sorted(set(ref) & set(new))
    return [ref[i] for i in ids], [new[i] for i in ids]


def main(argv=None):
    args = parse_args(argv)
    result = {}
    if args.model:
        judge = load_stage("analysis/perception_diagnostic.py").answer_correct
        # by file name: 05 keeps each description's image path as its input file had it (../images/ for val)
        truth = {Path(r["image"]).name: r["objects"] for r in map(json.loads, open(Path(args.world) / "truth.jsonl"))}
        for spec in args.model:
            name, _, folder = spec.partition("=")
            row = {}
            if args.perception:
                row["open"] = open_answers(Path(args.perception), name, judge)
            described = [r for r in map(json.loads, open(Path(folder) / "describe.jsonl")) if r["sigma"] == 0]
            texts = [r["text"] for r in described]
            true = [{w for o in truth[Path(r["image"]).name] for w in o["class"].split()} for r in described]
            row["describe"] = {"n": len(texts), "words": words(texts), "wrong": words(texts, true)}
            result[name] = row
            for kind, o in row.get("open", {}).items():
                print(f"{name:<8} {kind:<6} questions n {o['n']:3d}  accuracy {o['accuracy']:5.1f}%  answers: "
                      + ", ".join(f"{w} {c}" for w, c in o["words"].items() if c))
            print(f"{name:<8} descriptions n {len(texts)}  naming (wrongly): " + ", ".join(
                f"{w} {c} ({row['describe']['wrong'][w]})" for w, c in row["describe"]["words"].items()))
    if args.train:
        ref, new = delta_pi(args.train, args.scored)
        if not ref:
            raise SystemExit(f"no focus line is in both {args.train} and {args.scored}")
        down = sum(b < a for a, b in zip(ref, new))
        result["delta_pi"] = {"n": len(ref), "reference_mean": statistics.mean(ref),
                              "trained_mean": statistics.mean(new), "down": down}
        print(f"Delta pi(y_w) over the {len(ref)} focus lines in both files: reference {statistics.mean(ref):.2f}, "
              f"trained {statistics.mean(new):.2f}, down on {down} ({100 * down / len(ref):.0f}%)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

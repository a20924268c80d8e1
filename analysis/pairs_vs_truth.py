"""What the preference pairs teach, judged against the toy world's ground truth.

The method assumes each pair's chosen response y_w is better than its rejected y_l: for a focus pair, the answer
to (I, I_crop) under P_enh against the answer to (I_deg, P); for a robustness pair, the contrastive amplification
answer against the answer to (I_noise, P). The toy world knows every object, so this script checks that
assumption per branch, over every pair stage 02 made and over the ones stage 03 kept:
  open questions ("what shape is the red object ?")   y_w right / y_l right, and the pairs where only one is
                                                       right (the rule of analysis/perception_diagnostic.py: the
                                                       answer names the true word of the asked kind and no other)
  descriptions ("describe the image .")                hallucinated and true class mentions (05's CHAIR rule),
                                                       and y_w that is not a description (a bare "no")
  words                                                chosen minus rejected counts of each colour and shape word,
                                                       over the kept pairs (what DPO pushes up or down)
  DDW's r                                              03's CLIP gain ratio over train.jsonl's open questions,
                                                       split by whether stage 01's crop holds the queried object
A pair teaches the truth when y_w is right and y_l is not; "net" = (y_w only right) - (y_l only right).

  python analysis/pairs_vs_truth.py --pairs runs/seed0/pairs.jsonl --train runs/seed0/train.jsonl
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
CHAIR = load_stage("05_eval_pope.py").chair  # 05's mention rule
CENTRE_INSIDE = load_stage("analysis/world_phenomena.py").centre_inside  # "01's crop holds the object"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", default="runs/seed0/pairs.jsonl", help="pairs.jsonl from stage 02 (every pair)")
    p.add_argument("--train", default="runs/seed0/train.jsonl", help="train.jsonl from stage 03 (the kept ones)")
    p.add_argument("--world", default="world", help="the toy world (truth.jsonl)")
    p.add_argument("--out", default=None, help="write the numbers as JSON here (default: print only)")
    return p.parse_args(argv)


def queried(prompt, objects):
    """(kind, the object) of an open question about one object, or None (a description, or no unique object)."""
    words = prompt.split()
    if words[:2] == ["what", "shape"]:  # what shape is the <colour> object ?
        found = [o for o in objects if o["class"].split()[0] == words[4]]
        kind = "shape"
    elif words[:2] == ["what", "colour"]:  # what colour is the <shape> ?
        found = [o for o in objects if o["class"].split()[1] == words[4]]
        kind = "colour"
    else:
        return None
    return (kind, found[0]) if len(found) == 1 else None


def right(answer, kind, obj, judge):
    truth = obj["class"].split()[0 if kind == "colour" else 1]
    return judge(answer, truth, COLOURS if kind == "colour" else SHAPES)


def mentions(text, objects, vocabulary):
    """(hallucinated, true) class mentions of a description, by 05's CHAIR rule (whole words, once each)."""
    c = CHAIR([("", text)], {"": {o["class"] for o in objects}}, vocabulary)
    return c["hallucinated"], c["mentions"] - c["hallucinated"]


def word_counts(text):
    words = Counter(w.strip(string.punctuation) for w in text.lower().split())
    return Counter({w: words[w] for w in COLOURS + SHAPES if words[w]})


def branch_report(rows, branch, truth, judge, vocabulary):
    """Counts over the rows' `branch` pairs (rows: pairs.jsonl or train.jsonl lines with their image resolved)."""
    open_q = Counter()
    desc = Counter()
    words = Counter()
    for row in rows:
        pair = row.get(branch)
        if not pair:
            continue
        objects = truth[row["_image"]]
        words.update(word_counts(pair["chosen"]))
        words.subtract(word_counts(pair["rejected"]))
        q = queried(row["prompt"], objects)
        if q:
            kind, obj = q
            # int, not bool: a Counter's first update keeps the values as given, and JSON would write true
            w_right = int(right(pair["chosen"], kind, obj, judge))
            l_right = int(right(pair["rejected"], kind, obj, judge))
            for key in (kind, "open"):
                open_q.update({f"{key}_n": 1, f"{key}_w": w_right, f"{key}_l": l_right,
                               f"{key}_w_only": int(w_right and not l_right),
                               f"{key}_l_only": int(l_right and not w_right)})
        elif row["prompt"].startswith("describe"):
            hw, tw = mentions(pair["chosen"], objects, vocabulary)
            hl, tl = mentions(pair["rejected"], objects, vocabulary)
            desc.update({"n": 1, "halluc_w": hw, "true_w": tw, "halluc_l": hl, "true_l": tl,
                         "fewer_halluc_w": int(hw < hl), "fewer_halluc_l": int(hl < hw),
                         "w_not_description": int(not pair["chosen"].startswith("there is"))})
    return {"open": dict(open_q), "describe": dict(desc), "words": {w: words[w] for w in COLOURS + SHAPES}}


def ddw_ratio(rows, truth):
    """Median CLIP gain ratio r over the open questions of train.jsonl (lines that keep a branch) whose 01 crop
    holds / misses the queried object."""
    split = {True: [], False: []}
    for row in rows:
        q = queried(row["prompt"], truth[row["_image"]])
        # r is None where CLIPScore(P, I) = 0 (03's gain_ratio)
        if q and row.get("clip") and row["clip"]["ratio"] is not None and row.get("bbox"):
            split[CENTRE_INSIDE(q[1]["box"], row["bbox"])].append(row["clip"]["ratio"])
    return {name: {"n": len(v), "median": statistics.median(v) if v else None}
            for name, v in (("holds", split[True]), ("misses", split[False]))}


def read(path):
    """The rows of a JSONL file, each with "_image": its image path resolved against the file's folder."""
    path = Path(path)
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not JSON ({e.msg}, column {e.colno})")
            row["_image"] = str((path.parent / row["image"]).resolve())
            rows.append(row)
    if not rows:
        raise SystemExit(f"{path}: no rows")
    return rows


def pct(a, n):
    return f"{100 * a / n:.1f}%" if n else "-"


def print_report(name, rep):
    o, d = rep["open"], rep["describe"]
    for kind in ("open", "colour", "shape"):
        n = o.get(f"{kind}_n", 0)
        if n:
            print(f"  {name:<14} {kind:<7} n {n:4d}  y_w right {pct(o[f'{kind}_w'], n):>6}  y_l right "
                  f"{pct(o[f'{kind}_l'], n):>6}  only y_w {o[f'{kind}_w_only']:4d}  only y_l "
                  f"{o[f'{kind}_l_only']:4d}  net {o[f'{kind}_w_only'] - o[f'{kind}_l_only']:+d}")
    if d.get("n"):
        print(f"  {name:<14} describe n {d['n']:4d}  hallucinated mentions y_w {d['halluc_w']} / y_l "
              f"{d['halluc_l']}, true y_w {d['true_w']} / y_l {d['true_l']}; fewer hallucinations: y_w "
              f"{d['fewer_halluc_w']}, y_l {d['fewer_halluc_l']}; y_w not a description {d['w_not_description']}")


def main(argv=None):
    args = parse_args(argv)
    world = Path(args.world)
    judge = load_stage("analysis/perception_diagnostic.py").answer_correct
    truth = {str((world / r["image"]).resolve()): r["objects"] for r in map(json.loads, open(world / "truth.jsonl"))}
    vocabulary = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    pairs = read(args.pairs)
    train = read(args.train)
    kept = {b: [r for r in train if (r.get("keep") or {}).get(b)] for b in ("focus", "robust")}
    result = {}
    print(f"{args.pairs} (every pair) and {args.train} (the kept ones), against {world / 'truth.jsonl'}")
    for branch in ("focus", "robust"):
        result[branch] = {"all": branch_report(pairs, branch, truth, judge, vocabulary),
                          "kept": branch_report(kept[branch], branch, truth, judge, vocabulary)}
        print(f"{branch} pairs")
        print_report("all", result[branch]["all"])
        print_report("kept", result[branch]["kept"])
        words = result[branch]["kept"]["words"]
        print("  kept, chosen minus rejected words: " + ", ".join(f"{w} {words[w]:+d}" for w in COLOURS + SHAPES))
    result["ddw_r"] = ddw_ratio([r for r in train if r.get("clip")], truth)
    r = result["ddw_r"]
    med = {k: "-" if v["median"] is None else f"{v['median']:.3f}" for k, v in r.items()}
    print(f"DDW's r over train.jsonl's open questions: median {med['holds']} when 01's crop holds the object "
          f"(n {r['holds']['n']}), {med['misses']} when it misses (n {r['misses']['n']})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

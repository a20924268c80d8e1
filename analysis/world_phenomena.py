"""Does the toy world hold the failure P2-DPO repairs? Four numbers on world/val, before any training.

The paper (P2-DPO, ICLR 2026) targets perceptual-processing failures: the model's attention finds the
object the question is about, the answer is still wrong, and a zoomed crop fixes it. Measured here on
the base model, with the stages run as a user runs them:
  hold        = share of open questions whose object centre lies inside stage 01's bbox (01's
                defaults; the model's own greedy answer)
  zoom gain   = accuracy with (I, I.crop(01's bbox)) and P_enh (stage 02's two-image input and
                template) minus accuracy with I alone; oracle: the same with a crop around the true box
  degenerate  = share of answers under P_enh that do not have their prompt kind's form: a
                description that does not open with "there is", an open question whose first word
                is not a colour (shape) word, a yes/no question whose first word is not yes or no
                (a bare "yes" / "no" to a description or an open question is the case that matters)
  error split = the full view's wrong answers: perception failure when 01's crop misses the object
                (attention off it), processing failure when it holds it (attention on it, answer
                wrong); the paper's failure is the second
Questions: one open question per val image that has one (00's open_question: "what colour is the
{shape} ?" / "what shape is the {colour} object ?", about an object whose key is unique in it), the
descriptions of world/val/describe.jsonl, and the first --n-yesno questions of world/val/pope/random.
A question that locates its object by one attribute and asks for the other can be helped by zooming
only when the first is visible in the 64-px view and the second is not: colour and shape questions
are reported apart.

Output (--out folder): questions.jsonl (01's input; world.json copied beside it, so 01 takes the toy
world's settings), crops.jsonl (01's output), answers.jsonl (per question: kind, truth, bbox, hold,
the answer in each condition), metrics.json, a printed table.

  python analysis/world_phenomena.py                       # world/, world/model, runs/world_phenomena
  python analysis/world_phenomena.py --model runs/seed0/full --out runs/world_phenomena_p2dpo
"""
import argparse
import json
import os
import shutil
import string
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stage_loader import load_stage  # noqa: E402 (the repository root is on sys.path only now)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", default="world", help="the toy world (truth.jsonl, world.json, val/)")
    p.add_argument("--model", default=None, help="the model (default: <world>/model, the base model)")
    p.add_argument("--out", default="runs/world_phenomena", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="draws each image's open question")
    p.add_argument("--n-yesno", type=int, default=100,
                   help="yes/no questions of val/pope/random asked under P_enh (their form only)")
    p.add_argument("--stage01-args", default="",
                   help="extra flags for stage 01, for ablations (e.g. '--layers 1'); default none")
    p.add_argument("--batch-size", type=int, default=32, help="rows per generate call")
    args = p.parse_args(argv)
    args.model = args.model or str(Path(args.world) / "model")
    return args


# ---- the measurements ----
def centre_inside(box, bbox):
    """True when the centre of box [x1, y1, x2, y2] lies in bbox [x1, y1, x2, y2] (x2, y2 exclusive)."""
    cx = (box[0] + box[2]) / 2
    cy = (box[1] + box[3]) / 2
    return bbox[0] <= cx < bbox[2] and bbox[1] <= cy < bbox[3]


def oracle_box(box, side, size):
    """A square window of `side` px (at least the box's longer side + 4) centred on the true box,
    shifted to lie inside the image (size (X, Y)): the crop 01 would make if its attention were on
    the object."""
    side = min(max(side, box[2] - box[0] + 4, box[3] - box[1] + 4), size[0], size[1])
    x = round((box[0] + box[2] - side) / 2)
    y = round((box[1] + box[3] - side) / 2)
    x = min(max(x, 0), size[0] - side)
    y = min(max(y, 0), size[1] - side)
    return [x, y, x + side, y + side]


def words(text):
    return [w.strip(string.punctuation) for w in text.lower().split()]


def first_word(text):
    return (words(text) or [""])[0]


def asked_words(answer, vocabulary):
    """The words of the answer that are in vocabulary (the colour words for a colour question, the
    shape words for a shape question): the toy model answers with the object's name, "red square"."""
    return [w for w in words(answer) if w in vocabulary]


def correct(answer, truth, vocabulary):
    """The answer names the true word and no other word of its kind ("red square" is right for
    "what shape is the red object ?" when it is a square; so is "square")."""
    return asked_words(answer, vocabulary) == [truth]


def bare_yes_no(answer):
    """The answer is 'yes' or 'no' and nothing else (punctuation aside)."""
    return words(answer) in (["yes"], ["no"])


def degenerate(kind, answer, colours, shapes):
    """True when the answer does not have its prompt kind's form (see the module docstring)."""
    if kind == "describe":
        return not answer.lower().startswith("there is")
    if kind == "yesno":
        return first_word(answer) not in ("yes", "no")
    return not asked_words(answer, colours if kind == "colour" else shapes)


def score(q, full, zoom, oracle, vocab):
    """One question's row: its answers in the three conditions and what they are (see phenomena)."""
    colours, shapes = vocab["colour"], vocab["shape"]
    row = {"id": q["id"], "kind": q["kind"], "prompt": q["prompt"], "bbox": q["bbox"],
           "answer_full": full, "answer_enh": zoom,
           "degenerate_enh": degenerate(q["kind"], zoom, colours, shapes),
           "degenerate_full": degenerate(q["kind"], full, colours, shapes),
           "bare_enh": q["kind"] != "yesno" and bare_yes_no(zoom)}
    if "box" in q:
        asked = vocab[q["kind"]]
        row.update({"class": q["class"], "box": q["box"], "truth": q["answer"],
                    "oracle_bbox": q["oracle_bbox"], "answer_oracle": oracle,
                    "hold": centre_inside(q["box"], q["bbox"]),
                    "full": correct(full, q["answer"], asked), "enh": correct(zoom, q["answer"], asked),
                    "oracle": correct(oracle, q["answer"], asked)})
    return row


def phenomena(rows):
    """The four numbers from per-question rows. rows: {"kind", "hold", "full", "enh", "oracle" (bools
    for open questions: hold = 01's bbox holds the object centre, the others = answer correct), and
    "degenerate_enh", "bare_enh" (bools, every kind)}. -> {kind or "open": {...}} with counts and
    percentages."""
    out = {}
    open_rows = [r for r in rows if r["kind"] in ("colour", "shape")]
    for name, group in (("open", open_rows), ("colour", [r for r in open_rows if r["kind"] == "colour"]),
                        ("shape", [r for r in open_rows if r["kind"] == "shape"])):
        n = len(group)
        wrong = [r for r in group if not r["full"]]
        m = {"n": n, "hold": sum(r["hold"] for r in group)}
        for cond in ("full", "enh", "oracle"):
            m[f"correct_{cond}"] = sum(r[cond] for r in group)
        m["wrong_full"] = len(wrong)
        m["processing"] = sum(r["hold"] for r in wrong)  # attention on the object, answer wrong
        m["perception"] = len(wrong) - m["processing"]  # attention off it
        pct = lambda k, d: round(100.0 * m[k] / d, 1) if d else float("nan")  # noqa: E731
        m.update({"hold_pct": pct("hold", n), "acc_full": pct("correct_full", n),
                  "acc_enh": pct("correct_enh", n), "acc_oracle": pct("correct_oracle", n),
                  "processing_pct": pct("processing", len(wrong))})
        m["zoom_gain"] = round(m["acc_enh"] - m["acc_full"], 1)
        m["oracle_gain"] = round(m["acc_oracle"] - m["acc_full"], 1)
        out[name] = m
    for kind in ("describe", "colour", "shape", "yesno", "all"):
        group = [r for r in rows if kind in (r["kind"], "all")]
        n = len(group)
        bad = sum(r["degenerate_enh"] for r in group)
        bare = sum(r["bare_enh"] for r in group)
        out.setdefault("degenerate", {})[kind] = {
            "n": n, "degenerate": bad, "bare_yes_no": bare,
            "degenerate_pct": round(100.0 * bad / n, 1) if n else float("nan")}
    return out


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(1)
    world = Path(args.world)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    toy = load_stage("00_toy_world.py")
    stage01 = load_stage("01_attention_crop.py")
    stage02 = load_stage("02_make_pairs.py")
    settings = json.loads((world / "world.json").read_text())
    # the questions: open ones (one per val image), descriptions, yes/no
    questions = build_questions(world, toy, args.seed, args.n_yesno)
    for q in questions:
        q["path"] = world / q["image"]
    write_jsonl(out / "questions.jsonl",
                [{"id": q["id"], "prompt": q["prompt"],
                  "image": os.path.relpath(q["path"].resolve(), out.resolve())} for q in questions])
    shutil.copyfile(world / "world.json", out / "world.json")  # 01 takes the toy world's settings
    # stage 01 as a user runs it: its bbox around where the model looks when it answers
    crops = run_stage01(args.model, out / "questions.jsonl", out / "crops.jsonl", args.stage01_args)
    # the answers: full view, (I, 01's crop) + P_enh, (I, crop around the true box) + P_enh
    model, processor = stage01.load_model(args.model, "cpu")
    enh = stage02.ENH_TEMPLATE
    inputs = {"full": [], "enh": [], "oracle": []}
    for q in questions:
        image = Image.open(q["path"]).convert("RGB")
        q["bbox"] = crops[q["id"]]["bbox"]
        inputs["full"].append((q["prompt"], [image]))
        inputs["enh"].append((enh.format(question=q["prompt"]), [image, image.crop(q["bbox"])]))
        if "box" in q:  # an open question: its object's true box is known
            q["oracle_bbox"] = oracle_box(q["box"], settings["crop_base"], image.size)
            zoom = image.crop(q["oracle_bbox"])
            inputs["oracle"].append((enh.format(question=q["prompt"]), [image, zoom]))
    open_q = [q for q in questions if "box" in q]
    answers = {c: answer_all(stage01, model, processor, inputs[c], open_q if c == "oracle" else questions,
                             args.batch_size) for c in inputs}
    oracle = dict(zip([q["id"] for q in open_q], answers["oracle"]))
    vocab = {"colour": settings["colours"], "shape": settings["shapes"]}
    rows = [score(q, full, zoom, oracle.get(q["id"]), vocab)
            for q, full, zoom in zip(questions, answers["full"], answers["enh"])]
    write_jsonl(out / "answers.jsonl", rows)
    metrics = phenomena(rows)
    for cond in ("full", "enh"):  # what the shape questions get: a prior ("triangle") or the shape
        metrics[f"answers_of_shape_questions_{cond}"] = answer_counts(rows, "shape", f"answer_{cond}",
                                                                      vocab["shape"])
    metrics["model"] = str(args.model)
    metrics["stage01_args"] = args.stage01_args
    metrics["seconds"] = round(time.time() - t0, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(table(metrics))
    print(f"written to {out / 'metrics.json'} ({time.time() - t0:.0f}s)")


# ==================================================================================================
# Appendix: plumbing. A first reading may skip everything below: the questions, running stage 01,
# batched answers, the table.
# ==================================================================================================
def build_questions(world, toy, seed, n_yesno):
    """Open questions (one per val image that has one, drawn by 00's open_question with one generator
    seeded by `seed`), the val descriptions, the first n_yesno val/pope/random questions."""
    rng = np.random.default_rng(seed)
    questions = []
    truth = [r for r in map(json.loads, open(world / "truth.jsonl")) if r["split"] == "val"]
    for r in truth:
        q = toy.open_question(rng, r["objects"])
        if q is None:
            continue
        kind, prompt, answer = q[:3]
        key = prompt.split()[4]  # the shape of a colour question, the colour of a shape question
        obj = next(o for o in r["objects"] if key in o["class"].split())
        questions.append({"id": f"open_{r['id']}", "kind": kind, "prompt": prompt, "answer": answer,
                          "image": r["image"], "class": obj["class"], "box": obj["box"]})
    for name, kind, limit in (("describe.jsonl", "describe", None), ("pope/random.jsonl", "yesno", n_yesno)):
        rows = [json.loads(line) for line in open(world / "val" / name)][:limit]
        for r in rows:
            image = os.path.relpath((world / "val" / name).parent.joinpath(r["image"]).resolve(),
                                    world.resolve())
            text = r["text"] if kind == "describe" else r["text"].lower().replace("?", " ?")
            questions.append({"id": f"{kind}_{r['question_id']}", "kind": kind, "prompt": text,
                              "image": image})
    return questions


def run_stage01(model, data, out, extra):
    """Stage 01 with its defaults (plus `extra` flags), as a subprocess; -> {id: its output row}."""
    for suffix in ("", ".args.json", ".errors.jsonl"):  # a fresh run: the model may have changed
        Path(str(out) + suffix).unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "01_attention_crop.py"), "--model", str(model), "--data", str(data),
           "--out", str(out), *extra.split()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"stage 01 failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    print(proc.stdout.strip().split("\n")[0])
    return {r["id"]: r for r in map(json.loads, open(out))}


def answer_all(stage01, model, processor, inputs, questions, batch_size):
    """Greedy answers to (prompt, images) inputs, batched by their number of images; descriptions get
    48 new tokens, the rest 8."""
    answers = [None] * len(inputs)
    for long in (False, True):
        idx = [i for i, q in enumerate(questions) if (q["kind"] == "describe") == long]
        for s in range(0, len(idx), batch_size):
            part = idx[s:s + batch_size]
            texts = [stage01.chat_prompt(processor, inputs[i][0], len(inputs[i][1])) for i in part]
            images = [im for i in part for im in inputs[i][1]]
            with torch.no_grad():
                said = stage01.generate_greedy(model, processor, texts, images, 48 if long else 8)
            for i, a in zip(part, said):
                answers[i] = a
    return answers


def answer_counts(rows, kind, key, vocabulary):
    counts = {}
    for r in rows:
        if r["kind"] == kind:
            w = " ".join(asked_words(r[key], vocabulary)) or first_word(r[key])
            counts[w] = counts.get(w, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def table(m):
    lines = ["| questions | n | crop holds object % | acc full % | acc (I, 01 crop) + P_enh % | gain | "
             "acc (I, true-box crop) + P_enh % | wrong (full) | perception | processing |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("open", "colour", "shape"):
        r = m[name]
        lines.append(f"| {name} | {r['n']} | {r['hold_pct']} ({r['hold']}) | {r['acc_full']} | "
                     f"{r['acc_enh']} | {r['zoom_gain']:+.1f} | {r['acc_oracle']} | {r['wrong_full']} | "
                     f"{r['perception']} | {r['processing']} ({r['processing_pct']}%) |")
    lines += ["", "| prompt kind under P_enh | n | degenerate | bare yes/no | % |", "|---|---|---|---|---|"]
    for kind, d in m["degenerate"].items():
        lines.append(f"| {kind} | {d['n']} | {d['degenerate']} | {d['bare_yes_no']} | {d['degenerate_pct']} |")
    lines.append(f"\nshape questions, first words (full view): {m['answers_of_shape_questions_full']}")
    lines.append(f"shape questions, first words (01 crop + P_enh): {m['answers_of_shape_questions_enh']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""The perception-bottleneck diagnostic on the toy world: AFR, attention ratio and P-Acc per model.

The paper (P2-DPO, ICLR 2026) shows that P2-DPO moves the model's attention onto the object the question is about
(AFR, LLaVA-1.5-7B on TextVQA: 14.73 -> 18.71; DPO on RLHF-V: 15.57) and that accuracy rises where the base model
already looks at the right place (P-Acc: 66.29 -> 70.10; RLHF-V: 65.71). Its exact definitions are not public;
ours, on questions about ONE named object whose true box the toy world knows:
  mass    = share of stage 01's attention map A inside the object's true box (A mapped to image pixels by 01's
            own pixel_cells / pixel_heat: each patch's mass spread evenly over the original pixels it saw)
  ratio   = mass / (box area / image area)      (uniform attention = 1; Zhang et al., ICLR 2025, "MLLMs know
            where to look")
  AFR     = 100 x mean over questions of mass, from each model's OWN map (stage 01 on its own greedy answer)
  fixed map = the BASE model's (the first --model's) map with y = the TRUE answer word, teacher-forced, in the
            forward stage 01 makes (its attention_maps, its layers): computed once, the same for
            every model evaluated, and independent of any model's answer
  P-Acc   = 100 x answer accuracy on the questions whose fixed-map ratio is >= --focus-ratio
  P-Acc top half = the same on the questions whose fixed-map ratio is >= its median
  P-Acc own half = each model on ITS OWN better-focused half: its own-map ratio >= its own median. Shown beside,
            not instead: the own map follows the model's own answer, so this half favours its right answers
  accuracy = 100 x answer accuracy on every question
  error split = each model's wrong answers: a processing failure when its own stage 01 crop holds the object (the
            centre of the true box inside 01's bbox: attention on it, answer wrong; the failure the paper targets),
            a perception failure when the crop misses it
  correct = the answer names the true colour / shape word and no other word of that kind ("red square" is right
            for "what shape is the red object ?" when it is a square)
Why the fixed map (ours): stage 01's map is computed on the model's own answer, and the answer drives it (the toy
world before its redesign, 499 test questions, base model: correctness correlates 0.37 with the own-answer ratio,
0.06 with the forced true-answer ratio). A half chosen by one model's own map holds that model's right answers, and
any other model scores lower there by regression to the mean (base 71.6 / P2-DPO 60.8 on the base model's own half,
base 62.0 / P2-DPO 71.2 on P2-DPO's own half, 58.4 / 57.2 on the half chosen by the forced true answer).
Questions: one per held-out test image (the images of world/pope; --split val: world/val/pope's) that has an
object whose key is unique in the image (00's open questions: "what colour is the {shape} ?" / "what shape is the
{colour} object ?", from world.json's "prompts"), drawn with --seed among that image's candidates.
Time here (2 CPU cores shared with other work): stage 01 about 110 s per model, the fixed map and the scoring
about 30 s.

Output (--out folder): questions.jsonl (01's input: id, image, prompt; world.json copied beside it so 01 takes
the toy world's settings, layer 0, as it does on world/instances.jsonl), questions_truth.jsonl (id, kind, class,
box [x1, y1, x2, y2] px, x2/y2 exclusive, answer), <name>/crops.jsonl (stage 01, run once per model as a
subprocess; skipped when complete for this model and these questions), fixed_map.json (the base model's mass
and ratio per question under the true answer, with what made it; reused when those are unchanged),
metrics.json {name: {n, accuracy, afr, attention_ratio, focus_ratio, n_focus, p_acc, median_ratio, n_top,
p_acc_top, own_median_ratio, n_own_top, p_acc_own_top, n_wrong, processing, processing_pct, model}}, a printed table.

  python analysis/perception_diagnostic.py --model base=world/model --model p2dpo=runs/seed0/full \\
      --out runs/perception
"""
import argparse
import json
import os
import re
import shutil
import string
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
    p.add_argument("--world", default="world", help="the toy world (truth.jsonl, world.json, pope/)")
    p.add_argument("--model", action="append", default=None, metavar="NAME=PATH",
                   help="a model to diagnose, repeatable; the first one is the base model, whose map under "
                        "the true answer fixes the subsets (default: base=<world>/model)")
    p.add_argument("--out", default="runs/perception", help="output folder")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="the images of world/pope (held out: test) or of world/val/pope (val: for tuning)")
    p.add_argument("--seed", type=int, default=0, help="draws each image's question among its candidates")
    p.add_argument("--focus-ratio", type=float, default=1.0,
                   help="P-Acc's subset: questions whose fixed-map ratio is >= this (1: at least uniform "
                        "attention, Zhang et al.)")
    p.add_argument("--jobs", type=int, default=1, help="stage 01 runs side by side (one thread each)")
    args = p.parse_args(argv)
    args.model = args.model or [f"base={Path(args.world) / 'model'}"]
    models = {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        if not path or not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in models:
            p.error(f"--model {spec!r}: give NAME=PATH, NAME unique, of letters, digits, '.', '_', '-'")
        models[name] = path
    args.models = models
    return args


def question_candidates(objects, prompts):
    """Every open question about one object of this image whose key (its shape for a colour question, its colour
    for a shape question) is unique in the image, as 00's open_question: (kind, prompt, answer, object)."""
    colours = [o["class"].split()[0] for o in objects]
    shapes = [o["class"].split()[1] for o in objects]
    out = [("colour", prompts["colour"].format(shape=s), c, o)
           for c, s, o in zip(colours, shapes, objects) if shapes.count(s) == 1]
    out += [("shape", prompts["shape"].format(colour=c), s, o)
            for c, s, o in zip(colours, shapes, objects) if colours.count(c) == 1]
    return out


def build_questions(truth_rows, prompts, seed):
    """One question per image (truth_rows in order), drawn with one generator seeded by `seed`; an image with no
    candidate gets none. -> [{"id", "image", "prompt", "kind", "class", "box", "answer"}]."""
    rng = np.random.default_rng(seed)
    questions = []
    for row in truth_rows:
        options = question_candidates(row["objects"], prompts)
        if not options:
            continue
        kind, prompt, answer, obj = options[rng.integers(len(options))]
        questions.append({"id": f"q_{row['id']}", "image": row["image"], "prompt": prompt, "kind": kind,
                          "class": obj["class"], "box": obj["box"], "answer": answer})
    return questions


def box_attention(attn, image_size, box, image_processor, stretch, stage01):
    """(mass, ratio): mass = share of the attention map inside box, ratio = mass / (box area / image area).
    attn: (h, w) patch-grid map (01's "attn", sums to 1); image_size: (X, Y) px; box: [x1, y1, x2, y2] px, x2/y2
    exclusive; the grid goes to pixels by stage 01's own pixel_cells and pixel_heat (stage01: the module)."""
    attn = np.asarray(attn, dtype=np.float64)  # (h, w)
    cols, rows, _ = stage01.pixel_cells(image_processor, image_size, attn.shape, stretch)
    heat = stage01.pixel_heat(attn, cols, rows)  # (Y, X), sums to 1
    x1, y1, x2, y2 = box
    assert 0 <= x1 < x2 <= image_size[0] and 0 <= y1 < y2 <= image_size[1], f"box {box} in an image {image_size}"
    mass = float(heat[y1:y2, x1:x2].sum())
    share = (x2 - x1) * (y2 - y1) / (image_size[0] * image_size[1])
    return mass, mass / share


@torch.no_grad()
def fixed_map(model, processor, questions, root, layers, stage01, batch_size=8):
    """{question id: (mass, ratio)} under the map stage 01 makes with y = the TRUE answer word, teacher-forced
    (its attention_maps on (I, P, y_true)): nobody's own answer enters it, so, made once with the base model,
    it fixes the same subsets for every model. questions: build_questions' rows, images relative to root."""
    out = {}
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        images = [stage01.load_image(Path(root) / q["image"]) for q in batch]
        maps, stretch = stage01.attention_maps(model, processor, [q["prompt"] for q in batch],
                                               [q["answer"] for q in batch], images, layers)
        for q, image, grid_map in zip(batch, images, maps):
            out[q["id"]] = box_attention(grid_map, image.size, q["box"], processor.image_processor, stretch,
                                         stage01)
    return out


def answer_correct(answer, truth, vocabulary):
    """The answer names the true word and no other word of the asked kind (`vocabulary`: the colour words for a
    colour question, the shape words for a shape question), lower-cased and stripped of punctuation: the toy
    model answers an open question with the object's name, so "red square" is right for "what shape is the red
    object ?" when it is a square, and so is "square"; "red circle square" is not."""
    named = [w.strip(string.punctuation) for w in answer.lower().split()]
    return [w for w in named if w in vocabulary] == [truth.lower()]


def subsets(ratios, focus_ratio):
    """(focus, top, median) of {question id: ratio}: the ids whose ratio is >= focus_ratio, those whose ratio is
    >= the median, and that median."""
    ids = sorted(ratios)
    median = float(np.median([ratios[q] for q in ids]))
    focus = [q for q in ids if ratios[q] >= focus_ratio]
    top = [q for q in ids if ratios[q] >= median]
    return focus, top, median


def perception_metrics(scores, fixed, focus_ratio=1.0):
    """{name: {"n", "accuracy", "afr", "attention_ratio", "focus_ratio", "n_focus", "p_acc", "median_ratio",
    "n_top", "p_acc_top", "own_median_ratio", "n_own_top", "p_acc_own_top", "n_wrong", "processing",
    "processing_pct"}} (accuracy, afr, p_acc* and processing_pct: %).
    scores: {name: {question id: (mass, ratio, correct, hold)}}, each model under its own answer (AFR, attention
    ratio, its own half, and the error split: a wrong answer is a processing failure when the model's own crop
    holds the object, a perception failure when it misses it); fixed: {question id: ratio} of the fixed map,
    which alone chooses P-Acc's subset (ratio >= focus_ratio) and the top half (ratio >= its median), so both
    are the same for every model."""
    focus, top, median = subsets(fixed, focus_ratio)
    ids = sorted(fixed)

    def accuracy(s, qs):
        return 100.0 * float(np.mean([s[q][2] for q in qs])) if qs else float("nan")
    out = {}
    for name, s in scores.items():
        assert sorted(s) == ids, f"{name}: not the questions of the fixed map"
        _, own_top, own_median = subsets({q: s[q][1] for q in ids}, focus_ratio)
        out[name] = {"n": len(ids),
                     "accuracy": accuracy(s, ids),
                     "afr": 100.0 * float(np.mean([s[q][0] for q in ids])),
                     "attention_ratio": float(np.mean([s[q][1] for q in ids])),
                     "focus_ratio": focus_ratio,
                     "n_focus": len(focus),
                     "p_acc": accuracy(s, focus),
                     "median_ratio": median,
                     "n_top": len(top),
                     "p_acc_top": accuracy(s, top),
                     "own_median_ratio": own_median,
                     "n_own_top": len(own_top),
                     "p_acc_own_top": accuracy(s, own_top)}
        wrong = [q for q in ids if not s[q][2]]
        out[name]["n_wrong"] = len(wrong)
        out[name]["processing"] = sum(bool(s[q][3]) for q in wrong)
        out[name]["processing_pct"] = 100.0 * out[name]["processing"] / len(wrong) if wrong else float("nan")
    return out


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    stage01 = load_stage("01_attention_crop.py")
    world = Path(args.world)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps({k: v for k, v in vars(args).items() if k != "model"}, indent=1))
    pope_dir = world / ("pope" if args.split == "test" else "val/pope")
    for need in ("truth.jsonl", "world.json", pope_dir.relative_to(world)):
        if not (world / need).exists():
            raise SystemExit(f"--world {world}: no {need} (build it with `python 00_toy_world.py --out {world}`)")
    # the held-out test images: those world/pope asks about (--split val: world/val/pope's)
    pope = {(f.parent / json.loads(line)["image"]).resolve() for f in sorted(pope_dir.glob("*.jsonl"))
            for line in open(f) if line.strip()}
    truth = [r for r in map(json.loads, open(world / "truth.jsonl")) if (world / r["image"]).resolve() in pope]
    settings = json.loads((world / "world.json").read_text())
    questions = build_questions(truth, settings["prompts"], args.seed)
    if not questions:
        raise SystemExit(f"{world}: no test image has an object whose colour or shape is unique in it")
    for q in questions:
        q["image"] = os.path.relpath((world / q["image"]).resolve(), out.resolve())
    data = out / "questions.jsonl"
    write_if_changed(data, [{k: q[k] for k in ("id", "image", "prompt")} for q in questions])
    write_if_changed(out / "questions_truth.jsonl",
                     [{k: q[k] for k in ("id", "kind", "class", "box", "answer")} for q in questions])
    shutil.copyfile(world / "world.json", out / "world.json")  # 01: the toy world's settings (layer 0)
    print(f"{data}: {len(questions)} questions, one per {args.split} image of {len(pope)} with a unique key",
          flush=True)

    # each model's own answer and own map: stage 01 as a user runs it
    crops = {name: out / name / "crops.jsonl" for name in args.models}
    todo = [(name, path) for name, path in args.models.items() if not complete(crops[name], data, path, stage01)]
    for name in [n for n in args.models if n not in dict(todo)]:
        print(f"  01 {name}: {crops[name]} holds every question, from this model: not rerun", flush=True)
    run_stage01(todo, data, crops, args.jobs)
    scores = {}
    for name, path in args.models.items():
        scores[name] = score_crops(crops[name], questions, out, path, stage01,
                                   {"colour": settings["colours"], "shape": settings["shapes"]})
    # the fixed map: the base model under the true answer, in 01's forward with 01's layers
    base, base_path = next(iter(args.models.items()))
    fixed = cached_fixed_map(out, base_path, crops[base], data, questions, stage01)
    metrics = perception_metrics(scores, {q: ratio for q, (_, ratio) in fixed.items()}, args.focus_ratio)
    for name, path in args.models.items():
        metrics[name]["model"] = str(path)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(table(metrics, base))
    print(f"written to {out / 'metrics.json'} ({time.time() - t0:.0f}s)")


# ==================================================================================================
# Appendix: plumbing. A first reading may skip everything below: running stage 01, reading its output, the table.
# ==================================================================================================
def write_if_changed(path, rows):
    """Write rows as JSONL unless the file already holds exactly them (01 resumes only into the same input)."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def complete(crops, data, model, stage01):
    """crops.jsonl already holds every question, made from this questions file and this model: nothing to run."""
    args = crops.with_suffix(".args.json")
    if not crops.is_file() or not args.is_file():
        return False
    made = json.loads(args.read_text())
    n = sum(1 for line in open(data) if line.strip())
    return (made.get("data_identity") == stage01.file_identity(data)
            and made.get("model_identity") == stage01.model_identity(model)
            and sum(1 for line in open(crops) if line.strip()) == n)


def run_stage01(todo, data, crops, jobs):
    """Stage 01 on the questions, once per (name, model path), `jobs` at a time, as a user would run it: by
    pipeline.py's own runner (one thread each, the first failure stops them all and shows its log)."""
    pipeline = load_stage("pipeline.py")
    runs = []
    for name, path in todo:
        crops[name].parent.mkdir(parents=True, exist_ok=True)
        model = Path(path).resolve() if Path(path).exists() else path  # (the runner works in the repository root)
        cmd = pipeline.command("01_attention_crop.py", "--model", model, "--data", Path(data).resolve(),
                               "--out", crops[name].resolve())
        runs.append((cmd, crops[name].with_suffix(".log"), f"01 {name}"))
    pipeline.run_many(runs, max(1, jobs))


def score_crops(crops, questions, out, model, stage01, vocabulary):
    """{question id: (mass, ratio, correct, hold)} from one model's crops.jsonl (hold: the centre of the object's
    true box lies inside the model's own 01 bbox); every question must be there.
    vocabulary: {"colour": the world's colour words, "shape": its shape words}."""
    from transformers import AutoProcessor
    rows = {r["id"]: r for r in map(json.loads, open(crops))}
    missing = [q["id"] for q in questions if q["id"] not in rows]
    if missing:
        raise SystemExit(f"{crops}: {len(missing)} questions missing (e.g. {missing[:3]}; see "
                         f"{crops.with_suffix('.errors.jsonl')})")
    image_processor = AutoProcessor.from_pretrained(stage01.find_model(model)).image_processor
    stretch = None
    scores = {}
    for q in questions:
        row = rows[q["id"]]
        image = Image.open(out / q["image"]).convert("RGB")
        if stretch is None:  # 01's test: Qwen2.5-VL's processor gives image_grid_thw (the grid covers the image)
            stretch = "image_grid_thw" in image_processor(images=[image], return_tensors="np")
        assert list(np.shape(row["attn"])) == row["grid"], f"{crops}: {q['id']}: attn is not its grid {row['grid']}"
        mass, ratio = box_attention(row["attn"], image.size, q["box"], image_processor, stretch, stage01)
        cx, cy = (q["box"][0] + q["box"][2]) / 2, (q["box"][1] + q["box"][3]) / 2
        x1, y1, x2, y2 = row["bbox"]
        hold = x1 <= cx < x2 and y1 <= cy < y2  # 01's crop holds the object: attention on it
        scores[q["id"]] = (mass, ratio, answer_correct(row["answer"], q["answer"], vocabulary[q["kind"]]), hold)
    return scores


def cached_fixed_map(out, model_path, base_crops, data, questions, stage01):
    """fixed_map for the base model, with the layers its stage 01 run recorded (so it is 01's map,
    only with the true answer), kept in <out>/fixed_map.json and reused while the model, the questions and
    those settings are the same."""
    made = json.loads(base_crops.with_suffix(".args.json").read_text())
    key = {"model_identity": stage01.model_identity(model_path), "data_identity": stage01.file_identity(data),
           "layers": made["layers"]}
    path = out / "fixed_map.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if {k: old.get(k) for k in key} == key:
            return {q: tuple(v) for q, v in old["mass_ratio"].items()}
    print(f"  fixed map: {model_path} under the true answers ({len(questions)} questions)", flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = stage01.load_model(model_path, device, attn_implementation="eager")
    model.requires_grad_(False)
    fixed = fixed_map(model, processor, questions, out, key["layers"], stage01)
    path.write_text(json.dumps({**key, "mass_ratio": fixed}, indent=1))
    return fixed


def table(metrics, base):
    lines = [f"P-Acc and its top half: on questions chosen by {base}'s map under the TRUE answer (the same for "
             f"every model); own half: each model's own-map half (favours its own right answers); AFR, ratio: "
             f"each model's own map",
             "| model | questions | accuracy % | AFR | attention ratio | P-Acc subset | P-Acc % | top half | "
             "P-Acc top half % | own half | P-Acc own half % | wrong | processing failures |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in metrics.items():
        lines.append(f"| {name} | {m['n']} | {m['accuracy']:.1f} | {m['afr']:.2f} | {m['attention_ratio']:.2f} | "
                     f"{m['n_focus']} | {m['p_acc']:.1f} | {m['n_top']} | {m['p_acc_top']:.1f} | "
                     f"{m['n_own_top']} | {m['p_acc_own_top']:.1f} | {m['n_wrong']} | {m['processing']} "
                     f"({m['processing_pct']:.1f}%) |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

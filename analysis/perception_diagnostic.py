"""The perception-bottleneck diagnostic on the toy world: AFR, attention ratio and P-Acc per model.

The paper (P2-DPO, ICLR 2026) shows that P2-DPO moves the model's attention onto the object the question is about
(AFR, LLaVA-1.5-7B on TextVQA: 14.73 -> 18.71; DPO on RLHF-V: 15.57) and that accuracy rises where the base model
already looks at the right place (P-Acc: 66.29 -> 70.10; RLHF-V: 65.71). Its exact definitions are not public;
ours, on questions about ONE named object whose true box the toy world knows:
  mass    = share of stage 01's attention map A inside the object's true box (A mapped to image pixels by 01's
            own pixel_cells / pixel_heat: each patch's mass spread evenly over the original pixels it saw)
  ratio   = mass / (box area / image area)      (uniform attention = 1; Zhang et al., ICLR 2025, "MLLMs know
            where to look")
  AFR     = 100 x mean over questions of mass
  focus   = the questions whose ratio >= 1 under the BASE model (the first --model): one fixed subset, the same
            for every model evaluated
  P-Acc   = 100 x answer accuracy on the focus subset; accuracy = 100 x answer accuracy on every question
  P-Acc top half = the same on the questions whose ratio under the base model is >= its median (ours: the
            toy world's base model looks at every object more than uniformly, so ratio >= 1 is every question)
  correct = the answer's first word, lower-cased and stripped of punctuation, equals the true colour / shape word
Questions: one per held-out test image (the images of world/pope; --split val: world/val/pope's) that has an
object whose key is unique in the image (00's open questions: "what colour is the {shape} ?" / "what shape is the
{colour} object ?", from world.json's "prompts"), drawn with --seed among that image's candidates.
Measured on the toy world (499 questions; the base model of 00, P2-DPO and off-policy DPO from pipeline.py
--ablations, seeds 0-2): the base model's ratio is 1.3 at least (median 3.6), so at --focus-ratio 1 the focus subset
is every question and P-Acc equals accuracy; P-Acc top half (ratio >= 3.6 here) keeps the base model's
better-focused half.
Stage 01 takes 32 s per model here (2 busy CPU cores; 16 s of it the 499 forwards), this script's own import and
scoring about 15 s.

Output (--out folder): questions.jsonl (01's input: id, image, prompt; world.json copied beside it so 01 takes
the toy world's settings, layer 0, as it does on world/instances.jsonl), questions_truth.jsonl (id, kind, class,
box [x1, y1, x2, y2] px, x2/y2 exclusive, answer), <name>/crops.jsonl (stage 01, run once per model as a
subprocess; skipped when complete for this model and these questions), metrics.json {name: {n, accuracy, afr,
attention_ratio, focus_ratio, n_focus, p_acc, median_ratio, n_top, p_acc_top, model}}, a printed table.

  python analysis/perception_diagnostic.py --model base=world/model --model p2dpo=runs/seed0/full \\
      --out runs/perception
"""
import argparse
import importlib.util
import json
import os
import re
import shutil
import string
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", default="world", help="the toy world (truth.jsonl, world.json, pope/)")
    p.add_argument("--model", action="append", default=None, metavar="NAME=PATH",
                   help="a model to diagnose, repeatable; the first one is the base model, whose attention "
                        "fixes the focus subset (default: base=<world>/model)")
    p.add_argument("--out", default="runs/perception", help="output folder")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="the images of world/pope (held out: test) or of world/val/pope (val: for tuning)")
    p.add_argument("--seed", type=int, default=0, help="draws each image's question among its candidates")
    p.add_argument("--focus-ratio", type=float, default=1.0,
                   help="the focus subset: questions whose base attention ratio is >= this (1: at least uniform "
                        "attention, Zhang et al.; the toy world's base model is above 1 on every question)")
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


def answer_correct(answer, truth):
    """The answer's first word, lower-cased and stripped of punctuation, equals the true word."""
    words = answer.lower().split()
    return bool(words) and words[0].strip(string.punctuation) == truth.lower()


def perception_metrics(scores, base, focus_ratio=1.0):
    """{name: {"n", "accuracy", "afr", "attention_ratio", "focus_ratio", "n_focus", "p_acc", "median_ratio",
    "n_top", "p_acc_top"}} (percentages for accuracy, afr, p_acc, p_acc_top). scores: {name: {question id: (mass,
    ratio, correct)}}, every model on the same questions; the focus subset is the questions whose ratio under `base`
    is >= focus_ratio, the top half those whose ratio under `base` is >= its median: each the same for every model."""
    ids = sorted(scores[base])
    focus = [q for q in ids if scores[base][q][1] >= focus_ratio]
    median = float(np.median([scores[base][q][1] for q in ids]))
    top = [q for q in ids if scores[base][q][1] >= median]  # the base model's better-focused half
    out = {}
    for name, s in scores.items():
        assert sorted(s) == ids, f"{name}: not the questions of {base}"
        out[name] = {"n": len(ids),
                     "accuracy": 100.0 * float(np.mean([s[q][2] for q in ids])),
                     "afr": 100.0 * float(np.mean([s[q][0] for q in ids])),
                     "attention_ratio": float(np.mean([s[q][1] for q in ids])),
                     "focus_ratio": focus_ratio,
                     "n_focus": len(focus),
                     "p_acc": 100.0 * float(np.mean([s[q][2] for q in focus])) if focus else float("nan"),
                     "median_ratio": median,
                     "n_top": len(top),
                     "p_acc_top": 100.0 * float(np.mean([s[q][2] for q in top]))}
    return out


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    stage01 = load("attention_crop", "01_attention_crop.py")
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
    prompts = json.loads((world / "world.json").read_text())["prompts"]
    questions = build_questions(truth, prompts, args.seed)
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

    crops = {name: out / name / "crops.jsonl" for name in args.models}
    todo = [(name, path) for name, path in args.models.items() if not complete(crops[name], data, path, stage01)]
    for name in [n for n in args.models if n not in dict(todo)]:
        print(f"  01 {name}: {crops[name]} holds every question, from this model: not rerun", flush=True)
    run_stage01(todo, data, crops, args.jobs)
    scores = {}
    for name, path in args.models.items():
        scores[name] = score_crops(crops[name], questions, out, path, stage01)
    metrics = perception_metrics(scores, next(iter(args.models)), args.focus_ratio)
    for name, path in args.models.items():
        metrics[name]["model"] = str(path)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(table(metrics))
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
    pipeline = load("pipeline", "pipeline.py")
    runs = []
    for name, path in todo:
        crops[name].parent.mkdir(parents=True, exist_ok=True)
        model = Path(path).resolve() if Path(path).exists() else path  # (the runner works in the repository root)
        cmd = pipeline.command("01_attention_crop.py", "--model", model, "--data", Path(data).resolve(),
                               "--out", crops[name].resolve())
        runs.append((cmd, crops[name].with_suffix(".log"), f"01 {name}"))
    pipeline.run_many(runs, max(1, jobs))


def score_crops(crops, questions, out, model, stage01):
    """{question id: (mass, ratio, correct)} from one model's crops.jsonl; every question must be there."""
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
        scores[q["id"]] = (mass, ratio, answer_correct(row["answer"], q["answer"]))
    return scores


def table(metrics):
    lines = ["| model | questions | accuracy % | AFR | attention ratio | focus subset (base) | P-Acc % | "
             "top half (base) | P-Acc top half % |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m in metrics.items():
        lines.append(f"| {name} | {m['n']} | {m['accuracy']:.1f} | {m['afr']:.2f} | {m['attention_ratio']:.2f} | "
                     f"{m['n_focus']} | {m['p_acc']:.1f} | {m['n_top']} | {m['p_acc_top']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

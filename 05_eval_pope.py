"""POPE evaluation: greedy yes/no answers, the official POPE parser and metrics, a noise sweep, CHAIR on the toy world.

Paper: hallucination measured on POPE (Li et al., 2023) with the LLaVA-1.5 protocol, also on noisy
images I_noise.
  prompt   = question + "\n" + "Answer the question using a single word or phrase."
             (the join of LLaVA-1.5's own POPE questions, haotian-liu/LLaVA:
             playground/data/eval/pope/llava_pope_test.jsonl; chat template; --no-suffix drops it)
  decoding = greedy, at most 128 new tokens, stop at EOS   (LLaVA-1.5's model_vqa_loader settings)
  parse    = "no" if {"No", "not", "no"} meets text.split(".")[0].replace(",", "").split(" ")
             else "yes"   (official)
  metrics  = per split, "yes" positive: accuracy = (TP+TN)/n, precision = TP/(TP+FP),
             recall = TP/(TP+FN), F1 = 2PR/(P+R), yes_ratio = (TP+FP)/n,
             0.0 on a zero denominator; "POPE" = mean F1 over splits
  noise    = I_noise = clip(I + sigma * eps, 0, 1), eps seeded by (seed, image path as written),
             as in stage 02
  CHAIR    = (Rohrbach et al., 2018) on descriptions: CHAIR_i = hallucinated mentions / mentions,
             CHAIR_s = share of descriptions with a hallucinated mention, recall = share of true
             classes mentioned; a mention is a class name as whole words of the lowercased text,
             counted once per description.
Answers are matched to questions by question_id (the official scorer relies on line order).

Input   questions, one file per split (split = file name less "coco_pope_" and extension),
          images relative to --images, else to the file:
          {"question_id", "image", "text", "label": "yes"|"no"}
        --answers (re-score, no model): {"question_id", "text", ["split"], ["sigma"]}
          (LLaVA's answer files as is)
        --describe (toy world): {"question_id", "image", "text"};
          truth.jsonl: {"image", "objects": [{"class"}]}
Output  <out>/answers.jsonl {"question_id", "split", "sigma", "prompt", "text", "answer"},
          appended as produced;
        <out>/describe.jsonl {"question_id", "sigma", "image", "prompt", "text"};
        <out>/args.json;
        <out>/metrics.json {"model", "questions", "sigmas", "pope": {sigma: {split: metrics}},
          "mean", "chair"}
Shapes: B = prompts in a batch.

Launch (single process: POPE is small, one device is enough, so there is no torchrun path):
  python 05_eval_pope.py                     # toy world on CPU: world/model on world/pope
  python 05_eval_pope.py --model runs/p2dpo --out runs/eval_p2dpo --noise-sigma 0 0.1 0.2 0.3 \
      --describe world/describe.jsonl        # toy world: trained model, noise sweep, CHAIR
  python 05_eval_pope.py --model llava-hf/llava-1.5-7b-hf --questions /path/to/pope/coco \
      --images /path/to/val2014 --out runs/eval_llava          # one GPU, real model
  python 05_eval_pope.py --questions coco_pope_random.json --answers answers.jsonl \
      --out runs/rescore                     # re-score an answers file, no model
A rerun into the same --out resumes: (split, sigma, question_id) already in answers.jsonl are
skipped.
"""
import argparse
import functools
import json
import os
import re
import zlib
from pathlib import Path

# a model is a local folder or the user's own cache: never download
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

# LLaVA-1.5's POPE prompt: its question files join question and suffix with a newline
SUFFIX = "\nAnswer the question using a single word or phrase."
# resuming into an --out needs these arguments equal to those of the run that wrote its answers
ANSWER_ARGS = ("model", "no_suffix", "max_new_tokens", "describe_max_new_tokens", "seed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="world/model",
                   help="model folder or a name in your own HF cache")
    p.add_argument("--questions", default="world/pope",
                   help="POPE question file or folder of them")
    p.add_argument("--images", default=None,
                   help="image folder (default: each question file's folder)")
    p.add_argument("--out", default="runs/eval_base",
                   help="output folder (a rerun into it resumes)")
    p.add_argument("--answers", default=None,
                   help="re-score this answers file instead of running a model")
    p.add_argument("--no-suffix", action="store_true",
                   help="ask the bare question, without LLaVA-1.5's suffix")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="answer length cap (LLaVA-1.5's setting: 128)")
    p.add_argument("--noise-sigma", type=float, nargs="+", default=[0.0],
                   help="I_noise sigmas, e.g. 0 0.1 0.2 0.3")
    p.add_argument("--describe", default=None,
                   help="toy world: description prompts JSONL, scored with CHAIR")
    p.add_argument("--describe-max-new-tokens", type=int, default=64,
                   help="description length cap")
    p.add_argument("--truth", default=None,
                   help="truth.jsonl for CHAIR (default: by the describe file, or one up)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image noise")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N questions of each split")
    return p.parse_args(argv)


def parse_yes_no(text):
    """The official POPE rule, exactly: keep the text before the first '.', drop ',', split on
    single spaces; "no" if any word is `No`, `not` or `no`, else "yes". So "NO", "Nope", "Not" and
    "" all count as "yes", as in the official scorer: changing that would make our numbers
    incomparable with published ones."""
    words = text.split(".")[0].replace(",", "").split(" ")
    if any(w in ("No", "not", "no") for w in words):
        return "no"
    return "yes"


def ratio(a, b):
    """a / b, or 0.0 when the denominator b is 0."""
    return a / b if b else 0.0


def pope_metrics(preds, labels):
    """Confusion counts and rates with "yes" as the positive class. preds, labels: equal-length
    lists of "yes"/"no". A rate whose denominator is 0 is 0.0 (e.g. precision when nothing is
    predicted "yes")."""
    assert len(preds) == len(labels), f"{len(preds)} predictions for {len(labels)} labels"
    pairs = list(zip(preds, labels))  # [(pred, label)]
    tp = pairs.count(("yes", "yes"))
    fp = pairs.count(("yes", "no"))
    tn = pairs.count(("no", "no"))
    fn = pairs.count(("no", "yes"))
    n = len(pairs)
    precision = ratio(tp, tp + fp)
    recall = ratio(tp, tp + fn)
    return {"TP": tp, "FP": fp, "TN": tn, "FN": fn,
            "accuracy": ratio(tp + tn, n),
            "precision": precision,
            "recall": recall,
            "f1": ratio(2 * precision * recall, precision + recall),
            "yes_ratio": ratio(tp + fp, n),
            "n": n}


def mean_over_splits(per_split):
    """Mean of each rate over splits (mean F1 is the number LLaVA-1.5 reports as "POPE"); n is
    summed."""
    mean = {}
    for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        mean[k] = sum(m[k] for m in per_split.values()) / len(per_split)
    return {**mean, "n": sum(m["n"] for m in per_split.values())}


def match_by_id(questions, answers, where):
    """Answer texts in question order, matched by question_id, never by line order.
    questions: [row] of one split; answers: [(line, row)] for that split and sigma; where: the
    answers file and group, for error messages."""
    by_id = {}
    for n, row in answers:
        qid = str(row["question_id"])  # 17 and "17" are the same question: files disagree on type
        if qid in by_id:
            raise ValueError(f"{where}: question_id {row['question_id']!r} answered twice "
                             f"(lines {by_id[qid][0]}, {n})")
        by_id[qid] = (n, row)
    known = {str(q["question_id"]) for q in questions}
    unknown = [(n, row["question_id"]) for qid, (n, row) in by_id.items() if qid not in known]
    if unknown:
        line, question_id = unknown[0]
        raise ValueError(f"{where}:{line}: question_id {question_id!r} is not among the questions")
    missing = [q["question_id"] for q in questions if str(q["question_id"]) not in by_id]
    if missing:
        raise ValueError(f"{where}: no answer for question_id {missing[0]!r} "
                         f"({len(missing)} missing)")
    return [by_id[str(q["question_id"])][1]["text"] for q in questions]


def score_pope(questions, answers, where):
    """{sigma: {split: metrics}} from answer rows, re-parsed from their text.
    questions: {split: [row]}; answers: [(line, row)], grouped by their "split" and "sigma" fields
    (absent: the only split, sigma 0)."""
    splits = ", ".join(questions)
    groups = {}  # {sigma: {split: [(line, row)]}}
    for n, row in answers:
        for field in ("question_id", "text"):
            if field not in row:
                raise ValueError(f"{where}:{n}: missing field '{field}'")
        if "split" not in row and len(questions) != 1:  # POPE's ids repeat across split files
            raise ValueError(f"{where}:{n}: no 'split' field, so answers cannot be told apart "
                             f"across the {len(questions)} question files ({splits}): "
                             f"pass one question file")
        split = row.get("split", next(iter(questions)))
        if split not in questions:
            raise ValueError(f"{where}:{n}: split {split!r} is not among the questions ({splits})")
        sigma = float(row.get("sigma", 0.0))
        groups.setdefault(sigma, {}).setdefault(split, []).append((n, row))
    pope = {}
    for sigma in sorted(groups):
        pope[sigma] = {}
        for split, rows in questions.items():
            group = groups[sigma].get(split, [])
            texts = match_by_id(rows, group, f"{where} (split {split}, sigma {sigma:g})")
            preds = [parse_yes_no(t) for t in texts]
            pope[sigma][split] = pope_metrics(preds, [q["label"] for q in rows])
    return pope


def chair(descriptions, objects, vocabulary):
    """CHAIR_i = hallucinated mentions / mentions, CHAIR_s = descriptions with a hallucination /
    descriptions, recall = true classes mentioned / true classes (all micro-averaged).
    descriptions: [(image path, text)]; objects: {image path: set of true classes}; a mention is a
    class named as whole words, once per description."""
    n_mentions = n_hallucinated = n_bad = n_true = n_found = 0
    for path, text in descriptions:
        text = " ".join(text.lower().split())
        true = objects[path]
        said = {c for c in vocabulary if re.search(r"\b" + re.escape(c) + r"\b", text)}
        hallucinated = said - true
        n_mentions += len(said)
        n_hallucinated += len(hallucinated)
        n_bad += bool(hallucinated)
        n_true += len(true)
        n_found += len(said & true)
    return {"chair_i": ratio(n_hallucinated, n_mentions),
            "chair_s": ratio(n_bad, len(descriptions)),
            "recall": ratio(n_found, n_true),
            "n": len(descriptions),
            "mentions": n_mentions,
            "hallucinated": n_hallucinated}


def main(argv=None):
    args = parse_args(argv)
    # a repeated sigma would answer every question twice
    args.noise_sigma = sorted(set(args.noise_sigma))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    questions = read_questions(args.questions, args.limit)

    if args.answers:  # re-score only, like POPE's evaluate.py
        if args.describe:
            raise SystemExit("--describe needs a model; "
                             "descriptions are not re-scored from --answers")
        # its metrics.json and args.json belong to the run that made them
        if (out / "answers.jsonl").exists():
            raise SystemExit(f"{out} holds a run's answers.jsonl: re-score into another --out")
        args.model = None
        answers = read_answers(args.answers, questions, args.limit)
        check_resume(args, out)
        pope = score_pope(questions, answers, args.answers)
    else:
        # a local folder: resumes compare where it is, not how it was spelled
        if Path(args.model).exists():
            args.model = str(Path(args.model).resolve())
        check_resume(args, out)
        jobs = pope_jobs(args, questions)
        if args.describe:  # read and checked before any generation
            objects, vocabulary = read_truth(args.describe, args.truth)
            chair_jobs = describe_jobs(args, objects)
        generate_all(args, jobs, out / "answers.jsonl", args.max_new_tokens, "POPE",
                     parse=parse_yes_no)
        answers = answers_to(jobs, out / "answers.jsonl")
        pope = score_pope(questions, answers, out / "answers.jsonl")

    metrics = {"model": args.model, "questions": str(args.questions), "sigmas": sorted(pope),
               "pope": {f"{s:g}": per_split for s, per_split in pope.items()},
               "mean": {f"{s:g}": mean_over_splits(per_split) for s, per_split in pope.items()}}
    if args.describe:  # toy world only: it knows every object in every image
        generate_all(args, chair_jobs, out / "describe.jsonl", args.describe_max_new_tokens,
                     "describe")
        texts = descriptions_by_key(out / "describe.jsonl")
        metrics["chair"] = {}
        for sigma in args.noise_sigma:
            descriptions = [(j["path"], texts[j["key"]])
                            for j in chair_jobs if j["sigma"] == sigma]
            metrics["chair"][f"{sigma:g}"] = chair(descriptions, objects, vocabulary)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print_table(metrics)
    return metrics


# ==================================================================================================
# Appendix: plumbing. A first reading may skip everything below: the stage's own input/output
# and printing, then helpers that several stages need, copied verbatim between
# "# ---- shared: NAME ----" rulers so each script stands alone (tests/test_shared_blocks.py
# keeps every copy identical).
# ==================================================================================================
# ---- plumbing: reading inputs ----
def read_rows(path, fields, limit=None):
    """Rows of a JSONL file, each checked to have `fields`, with their line number."""
    rows = [{**row, "line": n} for n, row in read_jsonl(path)[:limit]]
    for r in rows:
        missing = [f for f in fields if f not in r]
        if missing:
            raise ValueError(f"{path}:{r['line']}: missing field '{missing[0]}'")
    return rows


def read_questions(path, limit=None):
    """{split: [row]} from a POPE question file or a folder of them; split = file name without
    "coco_pope_". A folder's describe*.jsonl is skipped: the toy world keeps its description
    prompts beside val/'s splits."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.suffix in (".json", ".jsonl") and not p.stem.startswith("describe"))
    else:
        files = [path]
    if not files:
        raise ValueError(f"{path}: no *.json or *.jsonl question files")
    questions = {}
    for file in files:
        split = file.stem.removeprefix("coco_pope_")
        if split in questions:
            raise ValueError(f"{path}: two files give split {split!r}")
        rows = read_rows(file, ("question_id", "image", "text", "label"), limit)
        seen = {}  # {question_id: its first line}
        for q in rows:
            where = f"{file}:{q['line']}"
            q["label"] = str(q["label"]).strip().lower()
            if q["label"] not in ("yes", "no"):
                raise ValueError(f"{where}: label must be 'yes' or 'no', got {q['label']!r}")
            first = seen.setdefault(str(q["question_id"]), q["line"])
            if first != q["line"]:
                raise ValueError(f"{where}: question_id {q['question_id']!r} repeats line {first}")
            q["file"] = file
        questions[split] = rows
    return questions


def resolve_images(rows, images):
    """Image path per row (relative to --images, else to the row's file); a missing file is an
    error."""
    for r in rows:
        r["path"] = Path(images or r["file"].parent) / r["image"]
        if not r["path"].is_file():
            raise FileNotFoundError(f"{r['file']}:{r['line']}: image not found: {r['path']}")


def read_truth(describe, truth=None):
    """({absolute image path: set of classes}, vocabulary) from truth.jsonl; vocabulary =
    world.json's "classes" when it lies beside truth.jsonl, else every class seen in
    truth.jsonl."""
    if truth:
        candidates = [Path(truth)]
    else:
        candidates = [Path(describe).parent / "truth.jsonl",
                      Path(describe).parent.parent / "truth.jsonl"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no truth.jsonl for CHAIR in {', '.join(map(str, candidates))}: "
                                f"pass --truth")
    objects = {}
    for r in read_rows(path, ("image", "objects")):
        objects[(path.parent / r["image"]).resolve()] = {o["class"].lower() for o in r["objects"]}
    world = path.parent / "world.json"
    if world.is_file():
        classes = json.loads(world.read_text())["classes"]
    else:
        classes = set().union(*objects.values())
    return objects, {c.lower() for c in classes}


def read_answers(path, questions, limit):
    """[(line, row)] of an answers file to re-score; with a --limit, only the answers to the
    questions kept."""
    answers = read_jsonl(path)
    if limit is not None:
        only_split = next(iter(questions))  # an answer without "split" answers the only file
        keep = {(s, str(q["question_id"])) for s, rows in questions.items() for q in rows}
        answers = [(n, r) for n, r in answers
                   if (r.get("split", only_split), str(r.get("question_id"))) in keep]
    if not answers:
        raise SystemExit(f"{path}: no answers")
    return answers


def answers_to(jobs, path):
    """[(line, row)] of the answers file that answer these jobs: a run scores its own questions
    only, even if an earlier run into the same --out answered more."""
    wanted = {j["key"] for j in jobs}
    answers = []
    for n, r in read_jsonl(path):
        if (r["split"], float(r["sigma"]), str(r["question_id"])) in wanted:
            answers.append((n, r))
    return answers


def descriptions_by_key(path):
    """{job key: text} of a describe.jsonl (a description's key has no split)."""
    texts = {}
    for d in continue_jsonl(path):
        texts[(None, float(d["sigma"]), str(d["question_id"]))] = d["text"]
    return texts

# ---- end plumbing ----


# ---- plumbing: generation jobs ----
def pope_jobs(args, questions):
    """One generation job per question per sigma; the noise key is the image path as written, as
    in stage 02."""
    for rows in questions.values():
        resolve_images(rows, args.images)
    suffix = "" if args.no_suffix else SUFFIX
    jobs = []
    for sigma in args.noise_sigma:
        for split, rows in questions.items():
            for q in rows:
                row = {"question_id": q["question_id"], "split": split, "sigma": sigma}
                jobs.append({"key": (split, sigma, str(q["question_id"])),
                             "prompt": q["text"] + suffix,
                             "path": q["path"],
                             "noise_key": q["image"],
                             "sigma": sigma,
                             "row": row})
    return jobs


def describe_jobs(args, objects):
    """One generation job per description prompt per sigma, each image checked to have a line in
    the truth file. objects: read_truth's {absolute image path: set of classes}."""
    rows = read_rows(args.describe, ("question_id", "image", "text"), args.limit)
    for r in rows:
        r["file"] = Path(args.describe)
    resolve_images(rows, args.images)
    for r in rows:
        if r["path"].resolve() not in objects:
            raise ValueError(f"{args.describe}:{r['line']}: image {r['image']} "
                             f"has no line in the truth file")
    jobs = []
    for sigma in args.noise_sigma:
        for r in rows:
            row = {"question_id": r["question_id"], "sigma": sigma, "image": r["image"]}
            jobs.append({"key": (None, sigma, str(r["question_id"])),
                         "prompt": r["text"],
                         "path": r["path"].resolve(),
                         "noise_key": r["image"],
                         "sigma": sigma,
                         "row": row})
    return jobs

# ---- end plumbing ----


# ---- plumbing: generation, resume, printing ----
@functools.lru_cache(maxsize=1)
def cached_model(path, device):
    """Load the model once, and only when something is left to answer (a finished rerun needs no
    model)."""
    return load_model(path, device)


def generate_all(args, jobs, out_path, max_new_tokens, desc, parse=None):
    """Answer every job whose key is not yet in out_path, appending one row per answer as it comes
    (the file is the checkpoint). jobs: dicts with key, prompt, path (image file), noise_key, sigma
    and row (the fields to write); parse(text), when given, adds the parsed "answer". A row already
    there with another prompt for the same key stops the run: its answer was asked differently
    (e.g. POPE's suffix joined by a space before LLaVA's newline)."""
    prompts = {j["key"]: j["prompt"] for j in jobs}
    done = set()
    for r in continue_jsonl(out_path):
        key = (r.get("split"), float(r["sigma"]), str(r["question_id"]))
        done.add(key)
        if key in prompts and r.get("prompt", prompts[key]) != prompts[key]:
            raise SystemExit(f"{out_path}: question_id {r['question_id']!r} was asked "
                             f"{r['prompt']!r} there, not {prompts[key]!r}: use another --out")
    todo = [j for j in jobs if j["key"] not in done]
    if not todo:
        return
    model, processor = cached_model(args.model, args.device)
    with open(out_path, "a", encoding="utf-8") as f, tqdm(total=len(todo), desc=desc) as bar:
        for i in range(0, len(todo), args.batch_size):
            batch = todo[i:i + args.batch_size]
            images = [add_noise(load_image(j["path"]), j["sigma"], args.seed, j["noise_key"])
                      for j in batch]
            texts = [chat_prompt(processor, j["prompt"]) for j in batch]
            outputs = generate_greedy(model, processor, texts, images, max_new_tokens)
            for j, text in zip(batch, outputs):
                row = {**j["row"], "prompt": j["prompt"], "text": text}
                if parse:
                    row["answer"] = parse(text)
                append_jsonl(f, row)
            bar.update(len(batch))


def check_resume(args, out):
    """Refuse to mix answers of different models or settings in one --out; then record this run's
    arguments."""
    path = out / "args.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    if not old.get("answers"):  # an earlier model run (a re-score holds no answers of its own)
        for k in ANSWER_ARGS:
            new = getattr(args, k)
            if k in old and old[k] != new:
                raise SystemExit(f"{out} holds answers made with {k}={old[k]!r}, not {new!r}: "
                                 f"use another --out or delete it")
    record = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path.write_text(json.dumps(record, indent=1))


def print_table(metrics):
    """POPE rates per sigma and split, each sigma's mean over splits, then CHAIR per sigma."""
    print(f"{'sigma':>5} {'split':<12} {'acc':>6} {'prec':>6} {'rec':>6} {'F1':>6} "
          f"{'yes':>6} {'n':>6}")
    for s, per_split in metrics["pope"].items():
        for split, m in [*per_split.items(), ("mean", metrics["mean"][s])]:
            print(f"{s:>5} {split:<12} {m['accuracy']:6.3f} {m['precision']:6.3f} "
                  f"{m['recall']:6.3f} {m['f1']:6.3f} {m['yes_ratio']:6.3f} {m['n']:6d}")
    for s, c in metrics.get("chair", {}).items():
        print(f"{s:>5} CHAIR_i {c['chair_i']:.3f}  CHAIR_s {c['chair_s']:.3f}  "
              f"recall {c['recall']:.3f}  n {c['n']}")

# ---- end plumbing ----


# ---- shared: jsonl ----
def read_jsonl(path, on_error=None):
    """[(line_number, row)] for each non-blank line of a JSONL file (CRLF endings are fine).

    A line that is not a JSON object raises ValueError naming the file and line, or,
    when on_error is given, is reported as on_error(line_number, message) and skipped.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            except ValueError as e:
                message = f"{path}:{n}: bad JSON line ({e})"
                if on_error is None:
                    raise ValueError(message) from None
                on_error(n, message)
                continue
            rows.append((n, row))
    return rows


def append_jsonl(f, row):
    """Write one row and flush, so a crash or Ctrl-C loses at most the line being written."""
    f.write(json.dumps(row) + "\n")
    f.flush()
# ---- end shared ----


# ---- shared: resume ----
def continue_jsonl(path):
    """Rows already in an output JSONL, after cutting a last line left unfinished by a crash
    (appends must start on a fresh line). Any other bad line is an error."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
    return [row for _, row in read_jsonl(path)]
# ---- end shared ----


# ---- shared: images ----
def load_image(path):
    """Open an image as 8-bit RGB. Grayscale, palette and 16-bit images are converted; transparency
    is composited on white (what a viewer shows). Raises OSError/ValueError naming the file when
    unreadable."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
            # 16-bit grayscale: scale to 8 bits, not clip
            a = np.asarray(img, dtype=np.float64)
            a = np.round(a * (255.0 / 65535.0)).clip(0, 255)
            img = Image.fromarray(a.astype(np.uint8))
        has_alpha = img.mode in ("RGBA", "LA", "PA")
        if has_alpha or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        return img.convert("RGB")
# ---- end shared ----


# ---- shared: noise ----
def add_noise(image, sigma, seed, key):
    """I_noise = clip(I + sigma * eps, 0, 1) in [0, 1] pixel space, eps ~ N(0, 1) from a generator
    seeded by (seed, key), so the same image gets the same noise in every stage and process.
    Returns 8-bit RGB."""
    if sigma == 0:
        return image.copy()
    rng = np.random.default_rng([seed, zlib.crc32(str(key).encode("utf-8"))])
    x = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    eps = rng.standard_normal(x.shape, dtype=np.float32)
    x = np.clip(x + sigma * eps, 0.0, 1.0)
    return Image.fromarray(np.round(x * 255.0).astype(np.uint8))
# ---- end shared ----


# ---- shared: model ----
def load_model(path, device, attn_implementation=None):
    """(model, processor) from a local folder or a name in the user's own Hugging Face cache
    (offline). bf16 on CUDA, fp32 on CPU; left padding, since batched decoding appends on the right."""
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device).eval(), processor


def chat_prompt(processor, prompt, n_images=1):
    """The model's own chat template around one user turn (n_images images, then the text), ready
    for the answer."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
# ---- end shared ----


# ---- shared: generate ----
@torch.no_grad()
def generate_greedy(model, processor, texts, images, max_new_tokens):
    """Greedy answers for a batch (left padded; each row stops at EOS). texts: B chat prompts;
    images: flat list, in the order their image tokens appear."""
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    inputs = inputs.to(model.device, dtype=model.dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id)  # (B, T + new)
    new = out[:, inputs["input_ids"].shape[1]:]  # (B, new)
    return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
# ---- end shared ----


if __name__ == "__main__":
    main()

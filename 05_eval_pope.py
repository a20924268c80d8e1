"""Stage 05: POPE (official parser and metrics) over a noise sweep, and CHAIR on the toy world.

Paper: experiments, main results (POPE average F1, LLaVA-1.5's protocol) and the robustness study
(POPE F1 on noisy images I_noise). POPE: Li et al., 2023; CHAIR: Rohrbach et al., 2018.
  prompt   = question + "\n" + "Answer the question using a single word or phrase."
             (in the model's chat template; --no-suffix asks the bare question)
  decoding = greedy, at most 128 new tokens, stop at EOS
  I_noise  = clip(I + sigma * eps, 0, 1) in [0, 1] pixel space, eps ~ N(0, 1) seeded by (seed,
             image path as written): stage 02's noise
  parse    = "no" if {"No", "not", "no"} meets text.split(".")[0].replace(",", "").split(" ")
             else "yes"
  metrics  = per split, "yes" positive: accuracy = (TP+TN)/n, precision = TP/(TP+FP),
             recall = TP/(TP+FN), F1 = 2PR/(P+R), yes_ratio = (TP+FP)/n, 0.0 on a zero
             denominator; "POPE" = mean F1 over splits
  CHAIR_i  = hallucinated mentions / mentions, CHAIR_s = descriptions with one / descriptions,
  recall   = true classes mentioned / true classes; a mention is a class name as whole words of
             the lowercased description, counted once per description
Sources (repository: path): haotian-liu/LLaVA: playground/data/eval/pope/llava_pope_test.jsonl (the
  suffix, joined by a newline; in eval.zip, docs/Evaluation.md), llava/eval/model_vqa_loader.py
  (decoding), llava/eval/eval_pope.py (parse, metrics; it trusts line order: answers are matched to
  questions by question_id here). AMBER, HallusionBench, MMHal-Bench: 05_eval_benchmarks.py.

Input   question files, one per split (split = file name less "coco_pope_"), images relative to --images,
          else to the file: {"question_id": text | int, "image", "text", "label": "yes" | "no"}
        --answers (re-score, no model; LLaVA's answer files as they are): {"question_id", "text",
          ["split"], ["sigma"], ["prompt"], ["image"]}; one that names another question is refused
        --describe (toy world): {"question_id", "image", "text"}; truth.jsonl {"image", "objects":
          [{"class"}]}; world.json {"classes"} beside it (else the classes truth.jsonl names)
Output  <out>/answers.jsonl {"question_id", "split", "sigma", "image", "prompt", "text", "answer"} and
          <out>/describe.jsonl (no split, no answer), appended as produced; <out>/args.json;
          <out>/metrics.json {"model", "questions", "sigmas", "pope": {sigma: {split: metrics}},
          "mean": {sigma: metrics}, "chair": {sigma: scores}}
Shapes: B = prompts in a batch.

  python 05_eval_pope.py --noise-sigma 0 0.1 0.2 0.3 --describe world/describe.jsonl  # toy, CPU
  python 05_eval_pope.py --model llava-hf/llava-1.5-7b-hf --questions data/pope_coco \
      --images coco/val2014 --out runs/pope_llava                                   # one GPU
  python 05_eval_pope.py --questions data/pope_coco --answers answers.jsonl --out runs/rescore
No torchrun path: POPE's 9,000 questions take one GPU. A rerun into --out resumes what it lacks,
made by the same model (files and all) and settings, else it is refused. A bad input line, an
unreadable image or a prompt past the context ends the run in one sentence naming its file and line.
"""
import argparse
import errno
import fcntl
import functools
import json
import math
import os
import re
import signal
import socket
import sys
import traceback
import warnings
import zlib
from pathlib import Path

# a model is a local folder or the user's own cache: never download
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import cached_file

# LLaVA-1.5's POPE prompt: its question file joins question and suffix with a newline
SUFFIX = "\nAnswer the question using a single word or phrase."
# resuming into an --out needs these arguments equal to those of the run that wrote its answers
ANSWER_ARGS = ("model", "no_suffix", "max_new_tokens", "describe_max_new_tokens", "seed", "model_identity")
# flags a re-score (--answers) has no use for: given with it, they are refused, not ignored
MODEL_FLAGS = ("model", "images", "no_suffix", "max_new_tokens", "noise_sigma", "describe",
               "describe_max_new_tokens", "truth", "seed", "batch_size", "device", "max_image_pixels")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="world/model", help="model folder or a name in your HF cache")
    p.add_argument("--questions", default="world/pope",
                   help="POPE question file, or a folder of them (one per split)")
    p.add_argument("--images", default=None, help="image folder (default: each file's folder)")
    p.add_argument("--out", default="runs/eval_base", help="output folder (a rerun resumes)")
    p.add_argument("--answers", default=None, help="re-score this answers JSONL instead of running a model")
    p.add_argument("--no-suffix", action="store_true", help="ask the bare question, without LLaVA-1.5's suffix")
    p.add_argument("--max-new-tokens", type=at_least(1), default=128,
                   help="answer length cap (LLaVA-1.5's setting: 128)")
    p.add_argument("--noise-sigma", type=at_least(0.0, float, 1.0), nargs="+", default=[0.0],
                   help="I_noise sigmas in [0, 1] (pixel values are in [0, 1]), e.g. 0 0.1 0.2 0.3")
    p.add_argument("--describe", default=None, help="toy world: description prompts JSONL, scored with CHAIR")
    p.add_argument("--describe-max-new-tokens", type=at_least(1), default=64,
                   help="description length cap (ours: the toy world's descriptions are short)")
    p.add_argument("--truth", default=None,
                   help="truth.jsonl for CHAIR (default: beside the describe file, or one up)")
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of the image noise")
    p.add_argument("--batch-size", type=at_least(1), default=32, help="prompts per generate call")
    p.add_argument("--device", type=device_name,
                   default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--limit", type=at_least(1), default=None, help="use only the first N questions of each split")
    p.add_argument("--max-image-pixels", type=at_least(0), default=89_478_485,
                   help="an image with more pixels ends the run (PIL's decompression-bomb guard); 0: no limit")
    p.add_argument("--debug", action="store_true", help="show the traceback behind an error message")
    args = p.parse_args(argv)
    # flags checked together before anything loads: one made pointless by another is refused
    given = [f"--{k.replace('_', '-')}" for k in MODEL_FLAGS if getattr(args, k) != p.get_default(k)]
    if args.answers and given:
        p.error(f"--answers re-scores a file without a model: {', '.join(given)} would do nothing")
    if not args.describe and (args.truth or "--describe-max-new-tokens" in given):
        p.error("--truth and --describe-max-new-tokens only matter with --describe")
    return args


# ---- the official POPE rule and metrics ----
def parse_yes_no(text):
    """The official POPE rule, exactly: keep the text before the first '.', drop ',', split on single
    spaces; "no" if any word is `No`, `not` or `no`, else "yes". So "NO", "Nope", "Not" and "" count as
    "yes", as in the official scorer: changing that would make our numbers incomparable with published ones."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def ratio(a, b):
    """a / b, or 0.0 when the denominator b is 0."""
    return a / b if b else 0.0


def pope_metrics(preds, labels):
    """Confusion counts and rates with "yes" as the positive class; a rate whose denominator is 0 is 0.0
    (e.g. precision when nothing is predicted "yes"). preds, labels: equal-length lists of "yes"/"no"."""
    assert len(preds) == len(labels), f"{len(preds)} predictions for {len(labels)} labels"
    pairs = list(zip(preds, labels))  # [(pred, label)]
    tp = pairs.count(("yes", "yes"))
    fp = pairs.count(("yes", "no"))
    tn = pairs.count(("no", "no"))
    fn = pairs.count(("no", "yes"))
    n = len(pairs)
    precision = ratio(tp, tp + fp)
    recall = ratio(tp, tp + fn)
    return {"TP": tp, "FP": fp, "TN": tn, "FN": fn, "accuracy": ratio(tp + tn, n), "precision": precision,
            "recall": recall, "f1": ratio(2 * precision * recall, precision + recall),
            "yes_ratio": ratio(tp + fp, n), "n": n}


def mean_over_splits(per_split):
    """Mean of each rate over splits (mean F1 is the number LLaVA-1.5 reports as "POPE"); n is summed."""
    rates = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    mean = {k: sum(m[k] for m in per_split.values()) / len(per_split) for k in rates}
    return {**mean, "n": sum(m["n"] for m in per_split.values())}


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
    return {"chair_i": ratio(n_hallucinated, n_mentions), "chair_s": ratio(n_bad, len(descriptions)),
            "recall": ratio(n_found, n_true), "n": len(descriptions), "mentions": n_mentions,
            "hallucinated": n_hallucinated}


# ---- answering: each question at each sigma ----
def pope_jobs(args, questions):
    """The noise sweep: one job per question per sigma, the question asked about I_noise at that sigma
    (noise keyed by the image path as written, as in stage 02). questions: {split: [row]}; split None:
    description prompts, asked as written and written without a split."""
    for rows in questions.values():
        resolve_images(rows, args.images)
    jobs = []
    for sigma in args.noise_sigma:
        for split, rows in questions.items():
            suffix = "" if args.no_suffix or split is None else SUFFIX
            for q in rows:
                row = {"question_id": q["question_id"], "split": split, "sigma": sigma, "image": q["image"]}
                jobs.append({"key": (split, sigma, str(q["question_id"])), "sigma": sigma,
                             "row": {k: v for k, v in row.items() if v is not None},  # (no split: None)
                             "prompt": q["text"] + suffix, "path": q["path"], "noise_key": q["image"],
                             "where": f"{q['file']}:{q['line']}"})
    return jobs


def noisy_image(job, seed):
    """A job's image as the model sees it: I_noise at the job's sigma. An unreadable file ends the run
    naming the question (every question needs its answer; those before it are kept)."""
    try:
        image = load_image(job["path"])
    except (OSError, ValueError) as e:
        fail(f"{job['where']}: unreadable image {job['path']}: {e}")
    return add_noise(image, job["sigma"], seed, job["noise_key"])


def generate_all(args, jobs, out_path, max_new_tokens, desc, parse=None):
    """Answer every job whose key is not yet in out_path, greedily, B jobs per generate call, each row
    appended as it comes (the file is the checkpoint); parse(text), when given, adds the parsed "answer".
    A row already there with another prompt or image under the same key answers another question (POPE's
    suffix joined by a space, other question files under the same split names): the run stops."""
    asked = {j["key"]: (j["prompt"], j["noise_key"]) for j in jobs}  # the image as written
    done = set()
    for _, r in answered(out_path):
        done.add(row_key(r))
        prompt, image = asked.get(row_key(r), (None, None))
        was = (r.get("prompt", prompt), r.get("image", image))  # (older rows lack "image")
        if prompt is not None and was != (prompt, image):
            fail(f"{out_path}: question_id {r['question_id']!r} was asked {was[0]!r} about {was[1]!r} there, "
                 f"not {prompt!r} about {image!r} (other question files under the same names?): use another --out")
    todo = [j for j in jobs if j["key"] not in done]
    if not todo:
        return
    model, processor = cached_model(args.model, args.device)
    write_args(args_path(out_path.parent, folder=True), vars(args))  # the model loaded: its answers are valid
    with open(out_path, "a", encoding="utf-8") as f, tqdm(total=len(todo), desc=desc) as bar:
        for i in range(0, len(todo), args.batch_size):
            batch = todo[i:i + args.batch_size]
            images = [noisy_image(j, args.seed) for j in batch]  # B images, each at its sigma
            texts = [chat_prompt(processor, j["prompt"]) for j in batch]
            problems = prompt_problems(model, processor, texts, [[im] for im in images],
                                       [max_new_tokens] * len(batch), "new tokens at most")
            for j, problem in zip(batch, problems):  # every question needs its answer
                if problem:
                    fail(f"{j['where']}: {problem}")
            outputs = generate_greedy(model, processor, texts, images, max_new_tokens)  # B texts
            for j, text in zip(batch, outputs):
                row = {**j["row"], "prompt": j["prompt"], "text": text}
                append_jsonl(f, {**row, "answer": parse(text)} if parse else row)
            bar.update(len(batch))


# ---- scoring: the official parse of answers matched by question_id ----
def match_by_id(questions, answers, where):
    """Answer texts in question order, matched by question_id, never by line order. questions: [row] of
    one split; answers: [(line, row)] for that split and sigma; where: the answers file and group."""
    by_id = {}
    for n, row in answers:
        qid = str(row["question_id"])  # 17 and "17" are the same question: files disagree on type
        if qid in by_id:
            raise ValueError(f"{where}: question_id {row['question_id']!r} answered twice "
                             f"(lines {by_id[qid][0]}, {n})")
        by_id[qid] = (n, row)
    known = {str(q["question_id"]) for q in questions}
    for qid, (n, row) in by_id.items():
        if qid not in known:
            raise ValueError(f"{where}:{n}: question_id {row['question_id']!r} is not among the questions")
    missing = [q["question_id"] for q in questions if str(q["question_id"]) not in by_id]
    if missing:
        raise ValueError(f"{where}: no answer for question_id {missing[0]!r} ({len(missing)} missing)")
    for q in questions:  # an answer that says what it answered must answer this question
        n, row = by_id[str(q["question_id"])]
        asked = " ".join(row.get("prompt", "").split())  # (the suffix may follow)
        if "prompt" in row and not asked.startswith(" ".join(q.get("text", "").split())):
            raise ValueError(f"{where}:{n}: question_id {q['question_id']!r} answers {row['prompt']!r}, "
                             f"not {q['text']!r} (another split's answers?)")
        if row.get("image", q.get("image")) != q.get("image"):
            raise ValueError(f"{where}:{n}: question_id {q['question_id']!r} answers about {row['image']!r}, "
                             f"not {q['image']!r} (another split's answers?)")
    return [by_id[str(q["question_id"])][1]["text"] for q in questions]


def score_pope(questions, answers, where):
    """{sigma: {split: metrics}} from answer rows, re-parsed from their text by the official rule.
    questions: {split: [row]}; answers: [(line, row)], grouped by their "split" and "sigma" fields
    (absent: the only split, sigma 0)."""
    splits = ", ".join(questions)
    blind = sum("split" not in row and "prompt" not in row for _, row in answers)
    if blind:
        print(f"warning: {where}: {blind} answers carry neither 'split' nor 'prompt', so nothing "
              f"shows they answer these questions")
    groups = {}  # {sigma: {split: [(line, row)]}}
    for n, row in answers:
        if "split" not in row and len(questions) != 1:  # POPE's ids repeat across split files
            raise ValueError(f"{where}:{n}: no 'split' field, so answers cannot be told apart across the "
                             f"{len(questions)} question files ({splits}): pass one question file")
        split = row.get("split", next(iter(questions)))
        if split not in questions:
            raise ValueError(f"{where}:{n}: split {split!r} is not among the questions ({splits})")
        groups.setdefault(float(row.get("sigma", 0.0)), {}).setdefault(split, []).append((n, row))
    pope = {}
    for sigma in sorted(groups):
        pope[sigma] = {}
        for split, rows in questions.items():
            texts = match_by_id(rows, groups[sigma].get(split, []), f"{where} (split {split}, sigma {sigma:g})")
            pope[sigma][split] = pope_metrics([parse_yes_no(t) for t in texts], [q["label"] for q in rows])
    return pope


def main(argv=None):
    exits_in_one_sentence("rerun the same command: the answers written so far are kept")
    args = parse_args(argv)
    # ---- plumbing: one run per --out; every input read and checked before the model loads ----
    Image.MAX_IMAGE_PIXELS = args.max_image_pixels or None
    args.noise_sigma = sorted(set(args.noise_sigma))  # a repeated sigma would ask everything twice
    out = Path(args.out)
    claim_out(out, {"--questions": args.questions, "--answers": args.answers, "--model": args.model}, folder=True)
    out.mkdir(parents=True, exist_ok=True)
    try:
        questions = read_questions(args.questions, args.limit)
        if args.answers:  # re-score an answers file, like POPE's own scorer: no model
            pope = score_pope(questions, read_answers(args, out, questions), args.answers)
            write_args(args_path(out, folder=True), vars(args))
        else:
            if Path(args.model).exists():  # a local folder: resumes compare where, not spelling
                args.model = str(Path(args.model).resolve())
            jobs = pope_jobs(args, questions)
            if args.describe:
                objects, vocabulary = read_truth(args.describe, args.truth)
                describe = describe_jobs(args, objects)
            args.model_identity = model_identity(args.model)  # retrained in place: another model
            check_resume(args, out)
            # 1. answer each question at each sigma (I_noise), appended as the answers come
            generate_all(args, jobs, out / "answers.jsonl", args.max_new_tokens, "POPE", parse=parse_yes_no)
            # 2. score with the official parser, answers matched to questions by question_id
            pope = score_pope(questions, answered(out / "answers.jsonl", jobs), out / "answers.jsonl")
        metrics = {"model": args.model, "questions": str(args.questions), "sigmas": sorted(pope),
                   "pope": {f"{s:g}": per_split for s, per_split in pope.items()},
                   "mean": {f"{s:g}": mean_over_splits(per_split) for s, per_split in pope.items()}}
        if args.describe:  # 3. CHAIR on descriptions (the toy world knows every object)
            generate_all(args, describe, out / "describe.jsonl", args.describe_max_new_tokens, "describe")
            texts = {row_key(r): r["text"] for _, r in answered(out / "describe.jsonl", describe)}
            metrics["chair"] = {}
            for sigma in args.noise_sigma:
                said = [(j["path"], texts[j["key"]]) for j in describe if j["sigma"] == sigma]
                metrics["chair"][f"{sigma:g}"] = chair(said, objects, vocabulary)
    except (ValueError, FileNotFoundError) as e:  # the readers' and scorers' "file:line: why"
        fail(str(e))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print_table(metrics)
    return metrics


# ==================================================================================================
# Appendix: plumbing. A first reading may skip everything below: the stage's own input/output
# and printing, then helpers that several stages need, copied verbatim between
# "# ---- shared: NAME ----" rulers so each script stands alone (tests/test_shared_blocks.py
# keeps every copy identical).
# ==================================================================================================
# ---- plumbing: reading inputs, each field checked on its own line ----
# what a field must be: (test, what the error says); a bool is no number and no id
ID = (lambda v: isinstance(v, str) or type(v) is int, "text or an integer")
TEXT = (lambda v: isinstance(v, str) and v.strip() != "", "non-empty text")
STR = (lambda v: isinstance(v, str), "text")
YES_NO = (lambda v: isinstance(v, str) and v.strip().lower() in ("yes", "no"), "'yes' or 'no'")
SIGMA = (lambda v: type(v) in (int, float) and 0 <= v <= 1, "a number in [0, 1]")
OBJECTS = (lambda v: isinstance(v, list) and all(isinstance(o, dict) and isinstance(o.get("class"), str)
                                                 for o in v), 'a list of {"class": text}')
QUESTION = {"question_id": ID, "image": TEXT, "text": TEXT, "label": YES_NO}
DESCRIBE = {"question_id": ID, "image": TEXT, "text": TEXT}
# an answer as this stage writes it; the last four are optional (LLaVA's answer files lack some)
ANSWER = {"question_id": ID, "text": STR, "split": TEXT, "sigma": SIGMA, "prompt": STR, "image": TEXT}


def check_fields(row, fields, where, optional=()):
    """Raise ValueError naming `where` (file:line) for the first field of `fields` ({name: (test, what)})
    that is missing (and not optional) or fails its test."""
    for name, (ok, what) in fields.items():
        if name not in row and name not in optional:
            raise ValueError(f"{where}: missing field '{name}'")
        if name in row and not ok(row[name]):
            raise ValueError(f"{where}: {name} must be {what}, got {str(row[name])[:80]!r}")


def read_rows(path, fields, limit=None):
    """The first `limit` lines of a JSONL file with their file and line, each checked field by field; a
    question_id may not repeat (POPE's ids repeat across split files, not within one)."""
    rows = []
    seen = {}  # {question_id: its first line}
    for n, row in read_jsonl(path)[:limit]:
        check_fields(row, fields, f"{path}:{n}")
        first = seen.setdefault(str(row.get("question_id")), n)
        if "question_id" in fields and first != n:
            raise ValueError(f"{path}:{n}: question_id {row['question_id']!r} repeats line {first}")
        rows.append({**row, "file": Path(path), "line": n})
    return rows


def read_questions(path, limit=None):
    """{split: [row]} from a POPE question file or a folder of them; split = file name without "coco_pope_".
    A folder's describe*.jsonl is skipped: the toy world keeps its description prompts beside val/'s splits."""
    path = Path(path)
    files = [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.suffix in (".json", ".jsonl") and not p.stem.startswith("describe"))
    if not files:
        raise ValueError(f"{path}: no *.json or *.jsonl question files")
    questions = {}
    for file in files:
        split = file.stem.removeprefix("coco_pope_")
        if split in questions:
            raise ValueError(f"{path}: two files give split {split!r}")
        questions[split] = [{**q, "label": q["label"].strip().lower()} for q in read_rows(file, QUESTION, limit)]
    return questions


def resolve_images(rows, images):
    """Absolute image path per row (relative to --images, else to the row's file); a missing file is an error."""
    for r in rows:
        r["path"] = (Path(images or r["file"].parent) / r["image"]).resolve()
        if not r["path"].is_file():
            raise FileNotFoundError(f"{r['file']}:{r['line']}: image not found: {r['path']}")


def read_truth(describe, truth=None):
    """({absolute image path: set of classes}, vocabulary) from truth.jsonl (--truth, else beside the
    describe file or one folder up); vocabulary = world.json's "classes" beside it, else every class
    truth.jsonl names."""
    near = Path(describe).parent
    candidates = [Path(truth)] if truth else [near / "truth.jsonl", near.parent / "truth.jsonl"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no truth.jsonl in {', '.join(map(str, candidates))}: pass --truth")
    objects = {(path.parent / r["image"]).resolve(): {o["class"].lower() for o in r["objects"]}
               for r in read_rows(path, {"image": TEXT, "objects": OBJECTS})}
    classes = set().union(*objects.values())
    world = path.parent / "world.json"
    if world.is_file():
        try:
            classes = json.loads(world.read_text())["classes"]
        except (ValueError, KeyError, TypeError):
            classes = None
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise ValueError(f"{world}: expected a JSON object whose 'classes' lists class names")
    return objects, {c.lower() for c in classes}


def describe_jobs(args, objects):
    """CHAIR's jobs: the noise sweep of the description prompts, each image checked to have its line in
    the truth file. objects: read_truth's {absolute image path: set of classes}."""
    rows = read_rows(args.describe, DESCRIBE, args.limit)
    jobs = pope_jobs(args, {None: rows})
    for r in rows:
        if r["path"] not in objects:
            raise ValueError(f"{r['file']}:{r['line']}: image {r['image']} has no line in the truth file")
    return jobs


def read_answers(args, out, questions):
    """[(line, row)] of the --answers file to re-score (with a --limit, only the answers to the questions
    kept). An --out holding a run's answers is refused: its metrics.json and args.json belong to that run."""
    if (out / "answers.jsonl").exists():
        raise SystemExit(f"{out} holds a run's answers.jsonl: re-score into another --out")
    args.model = None
    args.model_identity = None
    answers = read_jsonl(args.answers)
    for n, r in answers:
        check_fields(r, ANSWER, f"{args.answers}:{n}", optional=list(ANSWER)[2:])
    if args.limit is not None:
        only_split = next(iter(questions))  # an answer without "split" answers the only file
        keep = {(s, str(q["question_id"])) for s, rows in questions.items() for q in rows}
        answers = [(n, r) for n, r in answers if (r.get("split", only_split), str(r["question_id"])) in keep]
    if not answers:
        raise SystemExit(f"{args.answers}: no answers")
    check_resume(args, out)
    return answers


def row_key(row):
    """(split, sigma, question_id) of an output row (a description's split is None)."""
    return row.get("split"), float(row["sigma"]), str(row["question_id"])


def answered(path, jobs=None):
    """[(line, row)] already in an output file (of these jobs, when given: a run scores its own questions,
    even if an earlier run into the --out answered more), after cutting a last line a crash left
    unfinished; a row that is not one this stage writes ends the run naming its line."""
    if not continue_jsonl(path):
        return []
    rows = read_jsonl(path)
    for n, r in rows:
        check_fields(r, ANSWER, f"{path}:{n}", optional=("split", "prompt", "image"))
    wanted = None if jobs is None else {j["key"] for j in jobs}
    return [(n, r) for n, r in rows if wanted is None or row_key(r) in wanted]


# ---- plumbing: the model, resume and printing ----
@functools.lru_cache(maxsize=1)
def cached_model(path, device):
    """Load the model once, and only when something is left to answer (a finished rerun needs none)."""
    return load_model(path, device)


def check_resume(args, out):
    """Refuse to mix answers of other models or settings (ANSWER_ARGS) in one --out. Nothing is written:
    args.json is written once the model has loaded, so a wrong --model leaves none to refuse its fix."""
    old = read_args(args_path(out, folder=True))
    if not old.get("answers"):  # a re-score holds no answers of its own
        same_settings(old, vars(args), ANSWER_ARGS, f"{out} holds answers made with")


def print_table(metrics):
    """POPE rates per sigma and split, each sigma's mean over splits, then CHAIR per sigma."""
    print(f"{'sigma':>5} {'split':<12} {'acc':>6} {'prec':>6} {'rec':>6} {'F1':>6} {'yes':>6} {'n':>6}")
    for s, per_split in metrics["pope"].items():
        for split, m in [*per_split.items(), ("mean", metrics["mean"][s])]:
            print(f"{s:>5} {split:<12} {m['accuracy']:6.3f} {m['precision']:6.3f} {m['recall']:6.3f} "
                  f"{m['f1']:6.3f} {m['yes_ratio']:6.3f} {m['n']:6d}")
    for s, c in metrics.get("chair", {}).items():
        print(f"{s:>5} CHAIR_i {c['chair_i']:.3f}  CHAIR_s {c['chair_s']:.3f}  recall {c['recall']:.3f}  n {c['n']}")

# ---- end plumbing ----


# ---- shared: jsonl ----
def read_jsonl(path, on_error=None):
    """[(line number, row)] of a JSONL file's non-blank lines. A line that is not a JSON object
    raises ValueError naming file and line, or goes to on_error(line number, message)."""
    rows = []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is that line's error
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:  # a BOM, CRLF: fine; not UTF-8, nested past the recursion limit: that line's error
                row = json.loads(raw.decode("utf-8-sig" if n == 1 else "utf-8"))
                assert isinstance(row, dict), f"expected a JSON object, got {type(row).__name__}"
                rows.append((n, row))
            except (ValueError, RecursionError, AssertionError) as e:
                if on_error is None:
                    raise ValueError(f"{path}:{n}: bad JSON line ({e})") from None
                on_error(n, f"{path}:{n}: bad JSON line ({e})")
    return rows


def append_jsonl(f, row):
    """Write one row and flush: a crash or Ctrl-C loses at most the line being written."""
    f.write(json.dumps(row) + "\n")
    f.flush()
# ---- end shared ----


# ---- shared: resume ----
def continue_jsonl(path):
    """The rows already in an output JSONL, once a last line a crash left unfinished is cut."""
    path = Path(path)
    data = path.read_bytes() if path.exists() else b""
    if not data.endswith(b"\n"):
        with open(path, "ab") as f:
            f.truncate(data.rfind(b"\n") + 1)
    try:
        return [row for _, row in read_jsonl(path)]
    except ValueError as e:  # not a crash's trace: an edit, or two writers
        raise SystemExit(f"{e}: a line inside the output is damaged; mend or delete that line, or "
                         f"delete {path} to start over") from None
# ---- end shared ----


# ---- shared: images ----
def open_image(path):
    """The image, opened lazily (header only) behind PIL's decompression-bomb guard, its warning an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise ValueError(f"{path}: {e} (a guard against decompression bombs; "
                             f"--max-image-pixels raises it)") from None


def load_image(path):
    """8-bit RGB, upright by its EXIF orientation (what a viewer shows): grayscale, palette and
    16-bit images converted, transparency composited on white."""
    with open_image(path) as img:
        img = ImageOps.exif_transpose(img)
    if img.mode == "F":  # 32-bit float: no range says what is white
        raise ValueError(f"{path}: a 32-bit float image; convert it to 8 or 16 bits")
    if img.mode.startswith("I"):  # 16-bit grayscale: scaled to 8 bits, not clipped
        img = Image.fromarray(np.round(np.asarray(img, np.float64) * 255 / 65535).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")
# ---- end shared ----


# ---- shared: noise ----
def add_noise(image, sigma, seed, key):
    """I_noise = clip(I + sigma * eps, 0, 1) in [0, 1] pixel space, eps ~ N(0, 1) from a generator
    seeded by (seed, key): the same image gets the same noise in every stage and process."""
    if sigma == 0:
        return image.copy()
    rng = np.random.default_rng([seed, zlib.crc32(str(key).encode("utf-8"))])
    x = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    eps = rng.standard_normal(x.shape, dtype=np.float32)
    x = np.clip(x + sigma * eps, 0.0, 1.0)
    return Image.fromarray(np.round(x * 255.0).astype(np.uint8))
# ---- end shared ----


# ---- shared: model ----
def find_model(path):
    """--model's folder: a local folder, or a name in the user's own Hugging Face cache."""
    folder = Path(path)
    if not folder.is_dir():
        try:
            folder = Path(cached_file(path, "config.json", local_files_only=True)).parent
        except OSError:
            local = os.path.isabs(path) or path.startswith(".") or path.count("/") > 1
            fail(f"--model {path}: no such folder" + ("" if local else
                 ", and no model of that name in your Hugging Face cache (nothing is downloaded "
                 f"here: fetch it first, e.g. `hf download {path}`)"))
    if not (folder / "config.json").is_file():
        fail(f"--model {path}: {folder} holds no config.json, so it is not a saved model")
    return folder


def model_identity(path):
    """Folder, count, size and newest mtime of a model's files: one replaced in place differs."""
    folder = find_model(path).resolve()
    stats = [p.stat() for p in folder.iterdir() if p.is_file()]
    newest = max(s.st_mtime_ns for s in stats)
    return f"{folder}: {len(stats)} files, {sum(s.st_size for s in stats)} bytes, mtime {newest}"


def load_model(path, device, attn_implementation=None):
    """(model, processor), eval mode, bf16 on CUDA, left padding (decoding appends on the right)."""
    find_model(path)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        processor = AutoProcessor.from_pretrained(path)
        processor.tokenizer.padding_side = "left"
        chat_prompt(processor, "?")  # a processor without a chat template fails here, not mid-run
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation)
    except Exception as e:  # noqa: BLE001 (whatever the folder lacks; --debug shows the traceback)
        reason = str(e).strip().split("\n")[0][:300]
        fail(f"--model {path}: no image-text model and processor load from it ({type(e).__name__}: {reason})")
    return model.to(device).eval(), processor


def chat_prompt(processor, prompt, n_images=1):
    """The model's chat template around one user turn: n_images images, then the text."""
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


# ---- shared: errors ----
LOCKS = {}  # lock file -> its open file (claim_out): the kernel frees an flock when its process ends


def fail(message):
    """End the run with one sentence: what is at fault, what to do (--debug: the traceback too).
    --out's lock is let go first, for a process that lives on (a notebook, a test)."""
    if "--debug" in sys.argv[1:] and sys.exc_info()[0] is not None:
        traceback.print_exc()
    for f in LOCKS.values():
        f.close()
    LOCKS.clear()
    raise SystemExit(message)


def exits_in_one_sentence(rerun):
    """From here on, Ctrl-C, SIGTERM (`kill`, `timeout`, a job scheduler), a full disk or an unreadable file
    end the process in one sentence saying what is kept and what to do (`rerun`); --debug: the traceback."""
    def hook(kind, e, tb):
        if "--debug" in sys.argv[1:] or not issubclass(kind, (KeyboardInterrupt, OSError)):
            return sys.__excepthook__(kind, e, tb)
        if kind is KeyboardInterrupt:
            what, then = "interrupted", rerun
        elif e.errno in (errno.ENOSPC, errno.EDQUOT):
            what, then = f"the disk is full ({e.filename or e})", f"free some space, then {rerun}"
        elif e.filename:
            what, then = f"cannot read or write {e.filename} ({e.strerror})", f"mend that, then {rerun}"
        else:
            return sys.__excepthook__(kind, e, tb)
        print(f"\n{what}: what was written so far is kept; {then}", file=sys.stderr)
    sys.excepthook = hook
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt, as Ctrl-C does
# ---- end shared ----


# ---- shared: flags ----
def at_least(minimum, kind=int, most=math.inf):
    """An argparse type: a finite `kind` in [minimum, most], else an error naming the flag."""
    def number(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of type {kind.__name__}")
        if not (math.isfinite(value) and minimum <= value <= most):
            bounds = f">= {minimum}" if most == math.inf else f"in [{minimum}, {most}]"
            raise argparse.ArgumentTypeError(f"{text} is not a finite number {bounds}")
        return value
    return number


def device_name(text):
    """An argparse type: a torch device this machine has (cpu, cuda, cuda:N)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    n = torch.cuda.device_count()
    if not device or (device.type != "cpu" and (device.index or 0) >= n):
        has = f"cpu, or cuda:N for N < {n}" if n else "it has no GPU: cpu"
        raise argparse.ArgumentTypeError(f"{text!r} is no device of this machine ({has})")
    return text
# ---- end shared ----


# ---- shared: lock ----
STAGE = Path(__file__).name  # recorded in each args.json: which stage wrote an output


def args_path(out, folder=False):
    """Where a stage records how it made `out`."""
    return Path(out) / "args.json" if folder else Path(out).with_suffix(".args.json")


def read_args(path):
    """The settings a run recorded ({} if none)."""
    try:
        return json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    except ValueError:
        fail(f"{path} is not JSON: delete it, and what it describes, to start over")


def write_args(path, settings):
    """Record a run's settings and which stage wrote them, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"stage": STAGE, **{k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def same_settings(old, new, keys, what):
    """Refuse a rerun whose `keys` differ from what the earlier run recorded."""
    for k in keys:
        if k in old and old[k] != new.get(k):
            fail(f"{what} {k}={old[k]!r}, not {new.get(k)!r}: use another --out, or delete it to start over")


def claim_out(out, inputs, folder=False):
    """Before any model loads: refuse an `out` that is an input ({flag: path}), of the wrong kind (`folder`),
    written by another stage, or a folder of the user's; then hold `<out>.lock` (an flock the kernel frees
    when the process ends; the file stays), so that a second run into `out` refuses, naming this one."""
    out = Path(out)
    kind = "folder" if folder else "file"
    for flag, path in inputs.items():
        if path is not None and Path(path).resolve() == out.resolve():
            fail(f"--out {out} is also the input {flag} {path}: writing it would destroy the input; pass another --out")
    if out.exists() and out.is_dir() != folder:
        fail(f"--out {out} exists and is not a {kind}: this stage writes a {kind} there")
    recorded = read_args(args_path(out, folder))
    if recorded and recorded.get("stage") != STAGE:
        writer = recorded.get("stage") or "an older version or another program (no stage named)"
        fail(f"--out {out} was written by {writer}, not {STAGE}: pass another --out")
    if folder and not recorded and out.is_dir() and any(p.is_file() and p.stat().st_size for p in out.rglob("*")):
        fail(f"--out {out} is a folder this stage did not write (no args.json in it): pass a new or empty folder")
    lock = out.with_name(out.name + ".lock")
    if lock in LOCKS:  # main() run again in this process (a notebook, a test)
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock, "a+")
    except OSError as e:
        fail(f"--out {out}: cannot write there ({e.strerror or e})")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        fail(f"{out} is in use by {f.read().strip() or 'another run'} (lock {lock}): wait for that run to end, "
             f"or pass another --out")
    except OSError as e:  # a filesystem without locks (some network mounts)
        print(f"warning: cannot lock {lock} ({e.strerror}): nothing stops a second run into {out}")
    LOCKS[lock] = f
    f.truncate(0)
    print(f"pid {os.getpid()} on host {socket.gethostname()}", file=f, flush=True)
# ---- end shared ----


# ---- shared: context ----
def prompt_problems(model, processor, texts, images, extra, what):
    """For each row None, or why the model cannot take it: its text holds an image placeholder (the processor
    would fail the whole batch), or its tokens, images included, + extra[r] `what` run past
    max_position_embeddings (garbage, no error). texts: R chat prompts; images: R lists of images."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    marks = [getattr(processor, k, None) for k in ("image_token", "video_token")]
    problems = []
    for text, imgs, more in zip(texts, images, extra):
        problem = None
        for mark, n in zip(marks, (len(imgs), 0)):
            if isinstance(mark, str) and text.count(mark) != n:
                problem = f"the text holds the model's image placeholder {mark!r}"
        if problem is None and limit:  # image tokens depend on the sizes alone: blank images
            blanks = [Image.new("RGB", im.size) for im in imgs] or None
            n = len(processor(text=[text], images=blanks)["input_ids"][0])
            if n + more > limit:
                problem = (f"the prompt is {n} tokens (images included), + {more} {what} is over "
                           f"the model's context of {limit} positions")
        problems.append(problem)
    return problems
# ---- end shared ----


if __name__ == "__main__":
    main()

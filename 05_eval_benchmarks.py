"""Stage 05: AMBER, HallusionBench, MMHal-Bench answers in their official files; string-rule scores.

Paper: experiments, main results (AMBER, HallusionBench aAcc, MMHal score; POPE: 05_eval_pope.py).
Each question is asked as its file writes it (the benchmarks' own scripts add no suffix), greedily,
up to EOS or --max-new-tokens (128) for yes/no questions, --open-max-new-tokens (1024) for open ones
(AMBER's descriptions, MMHal-Bench); --noise-sigma asks about I_noise as 05_eval_pope.py does.
  AMBER    yes/no answers -> exactly "Yes" / "No" by the POPE parse; scored as AMBER scores them,
           "No" positive: accuracy, precision = (No & truth no) / No, recall = (No & truth no) /
           truth no, F1 = 2PR/(P+R+1e-4) from P, R in percent rounded to 0.1 (existence: +1e-3),
           every count starting at 0.001; overall, existence, attribute (state, number, action),
           relation = every other non-generative type. Descriptions go to AMBER's own scorer.
  HallusionBench  model_prediction added to each question. aAcc, fAcc, qAcc with a string rule in
           place of the GPT-4 judge, so an APPROXIMATION: verdict "Yes" / "No" / "Unknown" as
           VLMEvalKit extracts it, right if it is gt_answer ("1": yes); "Unknown" is right only on
           VS questions without a figure (the official "uncertain" rule).
  MMHal-Bench  model_answer filled into the template, in its order (the GPT-4 judge reads the
           question type from the position); its score is the user's GPT-4 run.
Sources (repository: path): junyangwang0410/AMBER: README.md (query, answer list, ids 1-1004
  generative), inference.py (json.load of the answers, annotation of id at position id - 1, its
  "type", exact "Yes"/"No", the rates), data/metrics.txt (counts from 0.001), data/annotations.json
  (975 "discriminative-relation" + 689 "relation" items). tianyi-lab/HallusionBench: README.md
  (HallusionBench.json, hallusion_bench/ beside it, HallusionBench_result.json), utils.py
  (assign_correctness, get_eval_all, get_eval_fig, get_eval_pair_all); open-compass/VLMEvalKit:
  vlmeval/dataset/utils/yorn.py (YOrN_Extraction). llava-rlhf/LLaVA-RLHF: Eval/eval_gpt_mmhal.py
  (96 items, question type = position % 8), MMHal-Bench-eval/get_response.py at 6a0df2d (fills
  response_template.json); TideDra/VL-RLHF: src/vlrlhf/eval/mmhal/eval.py (images/ by file name).

Input   amber: a query file [{"id": int >= 1, "image", "query"}], annotations.json [{"id", "type",
          "truth": "yes" | "no" (generative: a list)}]
        hallusionbench: HallusionBench.json [{"category": "VD" | "VS", "subcategory", "set_id",
          "figure_id", "question_id", "question", "gt_answer": "0" | "1", "filename" (null: no
          image), ...}]
        mmhal: response_template.json [{"question", "image_src", ...}], images by image_src's name
Output  <out>/answers.jsonl {"question_id", "split" (the benchmark), "sigma", "image", "prompt",
          "text", ["answer": AMBER's "Yes" | "No"]}, appended as produced; <out>/args.json;
        <out>/sigma<s>/amber_responses.json, HallusionBench_result.json or mmhal_responses.json;
        <out>/metrics.json {"model", "benchmark", "questions", "sigmas", "files",
          <benchmark>: {sigma: scores}}
Shapes: B = prompts in a batch.

  python 05_eval_benchmarks.py --benchmark amber --questions AMBER/data/query/query_all.json \
      --images AMBER/image --limit 8                                  # CPU smoke run, world/model
  python 05_eval_benchmarks.py --benchmark hallusionbench --model llava-hf/llava-1.5-7b-hf \
      --questions HallusionBench/HallusionBench.json --out runs/hallusion_llava   # one GPU
No torchrun path: each benchmark takes one GPU. A rerun into --out resumes what it lacks, made by
the same model (files and all) and settings, else it is refused. A bad input item, an unreadable
image or a prompt past the context ends the run in one sentence naming its file and item.
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
from urllib.parse import urlparse

# a model is a local folder or the user's own cache: never download
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import cached_file

BENCHMARKS = ("amber", "hallusionbench", "mmhal")
# resuming into an --out needs these arguments equal to those of the run that wrote its answers
ANSWER_ARGS = ("model", "benchmark", "max_new_tokens", "open_max_new_tokens", "seed", "model_identity")
# the benchmarks a flag matters for (HallusionBench has no open questions, MMHal-Bench no others)
ONLY_FOR = {"annotations": ("amber",), "max_new_tokens": ("amber", "hallusionbench"),
            "open_max_new_tokens": ("amber", "mmhal")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--benchmark", choices=BENCHMARKS, required=True, help="which benchmark --questions holds")
    p.add_argument("--model", default="world/model", help="model folder or a name in your HF cache")
    p.add_argument("--questions", required=True,
                   help="AMBER's query file, HallusionBench.json or MMHal-Bench's response_template.json")
    p.add_argument("--images", default=None, help="image folder (default: beside --questions: AMBER its "
                                                  "folder, HallusionBench hallusion_bench/, MMHal-Bench images/)")
    p.add_argument("--annotations", default=None,
                   help="AMBER's annotations.json (default: beside the query file or one up)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<benchmark>_base; a rerun resumes)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=128,
                   help="yes/no answer length cap (LLaVA-1.5's setting: 128)")
    p.add_argument("--open-max-new-tokens", type=at_least(1), default=1024,
                   help="cap for AMBER's descriptions and MMHal-Bench's open answers "
                        "(LLaVA-RLHF's Eval/model_vqa_mmhal.py: 1024)")
    p.add_argument("--noise-sigma", type=at_least(0.0, float, 1.0), nargs="+", default=[0.0],
                   help="I_noise sigmas in [0, 1] (pixel values are in [0, 1]), e.g. 0 0.2")
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of the image noise")
    p.add_argument("--batch-size", type=at_least(1), default=32, help="prompts per generate call")
    p.add_argument("--device", type=device_name,
                   default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--limit", type=at_least(1), default=None, help="use only the first N questions of the file")
    p.add_argument("--max-image-pixels", type=at_least(0), default=89_478_485,
                   help="an image with more pixels ends the run (PIL's decompression-bomb guard); 0: no limit")
    p.add_argument("--debug", action="store_true", help="show the traceback behind an error message")
    args = p.parse_args(argv)
    # checked before anything loads: a flag that would do nothing for this benchmark is refused
    pointless = [f"--{k.replace('_', '-')}" for k, which in ONLY_FOR.items()
                 if args.benchmark not in which and getattr(args, k) != p.get_default(k)]
    if pointless:
        p.error(f"{', '.join(pointless)} would do nothing for --benchmark {args.benchmark}")
    args.out = args.out or f"runs/{args.benchmark}_base"
    return args


def ratio(a, b):
    """a / b, or 0.0 when the denominator b is 0."""
    return a / b if b else 0.0


# ---- each benchmark's rules ----
def amber_response(text):
    """A yes/no answer as AMBER's scorer compares it: exactly "Yes" or "No" (inference.py tests
    `response == 'Yes'` and `response == 'No'`, so "yes" or "No." would score as wrong), read by the
    official POPE rule (05_eval_pope.py's parse_yes_no) so that both benchmarks parse answers alike:
    the text before the first '.', ',' dropped, split on single spaces; "No" if a word is No, not, no."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "No" if any(w in ("No", "not", "no") for w in words) else "Yes"


# AMBER's inference.py counts each yes/no item in one counter set chosen by its annotation's
# "type" (an if/elif chain); every other non-generative type falls to its `else`, relation: the
# 689 items typed "relation" are scored there beside the 975 typed "discriminative-relation".
AMBER_DIMENSION = {"discriminative-hallucination": "existence",
                   "discriminative-attribute-state": "state",
                   "discriminative-attribute-number": "number",
                   "discriminative-attribute-action": "action"}
# the groups inference.py prints, each the sum of these counter sets (overall has its own)
AMBER_GROUPS = {"overall": ("overall",), "existence": ("existence",),
                "attribute": ("state", "number", "action"), "state": ("state",),
                "number": ("number",), "action": ("action",), "relation": ("relation",)}


def amber_metrics(rows):
    """AMBER's yes/no scores as its inference.py computes and prints them, "No" positive:
      accuracy  = correct / n         (correct: truth "yes" and "Yes", or truth "no" and "No")
      precision = TP / said "No",     recall = TP / truth "no",    TP = said "No" and truth "no"
      F1        = 2PR / (P + R + eps) from P and R already rounded; eps = 1e-4, existence 1e-3
    in percent rounded to 0.1. Every count starts at 0.001 (data/metrics.txt), so an empty group
    scores 0.0 and attribute, the sum of three counter sets, divides by n + 0.003. A response that
    is not exactly "Yes" or "No" is wrong and is not a "No".
    rows: [(annotation type, truth "yes"|"no", response)]. Returns {group: counts and rates}."""
    counters = {name: {"n": 0.001, "correct": 0, "truth_no": 0.001, "said_no": 0.001, "tp": 0}
                for name in ("overall", "existence", "state", "number", "action", "relation")}
    for kind, truth, response in rows:
        for name in ("overall", AMBER_DIMENSION.get(kind, "relation")):
            c = counters[name]
            c["n"] += 1
            c["correct"] += (truth, response) in (("yes", "Yes"), ("no", "No"))
            c["truth_no"] += truth == "no"
            c["said_no"] += response == "No"
            c["tp"] += (truth, response) == ("no", "No")
    metrics = {}
    for group, names in AMBER_GROUPS.items():
        total = {k: sum(counters[name][k] for name in names) for k in counters["overall"]}
        precision = round(total["tp"] / total["said_no"] * 100, 1)
        recall = round(total["tp"] / total["truth_no"] * 100, 1)
        eps = 0.001 if group == "existence" else 0.0001
        f1 = 2 * (precision / 100) * (recall / 100) / ((precision / 100) + (recall / 100) + eps)
        metrics[group] = {"accuracy": round(total["correct"] / total["n"] * 100, 1), "precision": precision,
                          "recall": recall, "f1": round(f1 * 100, 1),
                          **{k: int(v) for k, v in total.items()}}  # the counts, less 0.001s
    return metrics


# VLMEvalKit's process_punctuation (from the VQA evaluation), which YOrN_Extraction applies
VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
             "@", "`", ",", "?", "!"]


def yes_no_verdict(text):
    """"Yes", "No" or "Unknown" as VLMEvalKit's YOrN_Extraction reads an answer: lowercase, its
    VQA punctuation handling (a mark touching a space, or any text with a digit,digit, is dropped,
    else it becomes a space; a '.' not before a digit is dropped), split on whitespace; "Yes" if
    the word "yes" occurs and "no" does not, "No" the other way round, else "Unknown". (Its
    re.sub passes re.UNICODE as the count, capping the '.' removal at 32; not copied.)"""
    text = text.lower()
    out = text
    for p in VQA_PUNCT:
        if p + " " in text or " " + p in text or re.search(r"(\d)(,)(\d)", text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    words = re.sub(r"\.(?!\d)", "", out).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "no" in words and "yes" not in words:
        return "No"
    return "Unknown"


def hallusion_metrics(rows):
    """HallusionBench's accuracies with a string verdict in place of the GPT-4 judge, so an
    approximation of the official scores:
      right = verdict == gt_answer ("1" Yes, "0" No), or "Unknown" on a VS question without a
              figure (figure_id "0"), which the official assign_correctness counts right when
              the judge says "uncertain"
      aAcc  = right questions / questions                               (utils.py get_eval_all)
      fAcc  = figures (category, subcategory, set_id, figure_id) with every question right /
              figures, VS figure "0" (no figure) left out               (get_eval_fig)
      qAcc  = question pairs (category, subcategory, set_id, question_id) with every question
              right / pairs                                             (get_eval_pair_all)
    in percent, overall and per category (VD, VS). rows: HallusionBench items with
    "model_prediction"."""
    scores = {}
    for group in ("overall", "VD", "VS"):
        figures = {}  # {figure: [right]}
        pairs = {}  # {question pair: [right]}
        right = []
        for r in rows:
            if group != "overall" and r["category"] != group:
                continue
            verdict = yes_no_verdict(r["model_prediction"])
            no_figure = r["category"] == "VS" and str(r["figure_id"]) == "0"
            truth = {"1": "Yes", "0": "No"}[str(r["gt_answer"])]
            right.append(verdict == truth or (verdict == "Unknown" and no_figure))
            stem = [r["category"], r["subcategory"], str(r["set_id"])]
            if not no_figure:
                figures.setdefault("_".join(stem + [str(r["figure_id"])]), []).append(right[-1])
            pairs.setdefault("_".join(stem + [str(r["question_id"])]), []).append(right[-1])
        scores[group] = {"aAcc": 100 * ratio(sum(right), len(right)),
                         "fAcc": 100 * ratio(sum(map(all, figures.values())), len(figures)),
                         "qAcc": 100 * ratio(sum(map(all, pairs.values())), len(pairs)),
                         "n": len(right)}
    return scores


def mmhal_responses(template, answers):
    """The template's items in the template's order, each with "model_answer" filled: LLaVA-RLHF's
    eval_gpt_mmhal.py asserts 96 items and takes the question type as position % 8 ("assuming
    order of 96 questions is not changed"). template: [item]; answers: {str(position): text}, in
    any order; items without an answer (a --limit run) are left out."""
    return [{**item, "model_answer": answers[str(i)]}
            for i, item in enumerate(template) if str(i) in answers]


def score_benchmark(benchmark, items, responses):
    """In-repo scores of one sigma's answer file. items: read_benchmark's; responses: the rows of
    the benchmark's own answer file (what its official scorer reads)."""
    if benchmark == "amber":
        said = {str(r["id"]): r["response"] for r in responses}
        rows = [(it["type"], it["truth"], said[it["id"]]) for it in items if not it["open"] and it["id"] in said]
        generative = sum(it["open"] and it["id"] in said for it in items)
        return {"discriminative": amber_metrics(rows), "generative_exported": generative}
    if benchmark == "hallusionbench":
        return {"approximate": hallusion_metrics(responses), "note": "rule-based verdict, not the official GPT-4 judge"}
    return {"n": len(responses), "note": "scored by GPT-4 with LLaVA-RLHF's eval_gpt_mmhal.py"}


# ---- answering: each question at each sigma, then each sigma's official answer file ----
def benchmark_jobs(args, items):
    """The noise sweep: one job per item per sigma, its split the benchmark's name, the question asked
    about I_noise at that sigma (noise keyed by the image path as written); every image is checked to
    exist first (HallusionBench's text-only questions have none)."""
    folder = Path(args.images or Path(args.questions).parent / IMAGE_FOLDERS[args.benchmark])
    for it in items:
        it["path"] = None if it["image"] is None else folder / it["image"]
        if it["path"] is not None and not it["path"].is_file():
            raise FileNotFoundError(f"{args.questions}: item {it['index']}: image not found: {it['path']}")
    jobs = []
    for sigma in args.noise_sigma:
        for it in items:
            row = {"question_id": it["id"], "split": args.benchmark, "sigma": sigma, "image": it["image"]}
            jobs.append({"key": (args.benchmark, sigma, it["id"]), "row": row, "prompt": it["prompt"],
                         "path": it["path"], "noise_key": it["image"], "sigma": sigma, "open": it["open"],
                         "where": f"{args.questions}: item {it['index']}"})
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
    """Answer every job whose key is not yet in out_path, greedily, B jobs per generate call (all with
    an image, or all without: HallusionBench's text-only questions), each row appended as it comes (the
    file is the checkpoint); parse(text), when given, adds the parsed "answer". A row already there
    with another prompt or image under the same key stops the run."""
    asked = {j["key"]: (j["prompt"], j["noise_key"]) for j in jobs}  # the image as written
    done = set()
    for _, r in answered(out_path):
        done.add(row_key(r))
        if row_key(r) in asked and (r["prompt"], r["image"]) != asked[row_key(r)]:
            fail(f"{out_path}: question_id {r['question_id']!r} was asked {r['prompt']!r} about {r['image']!r} "
                 f"there, not {asked[row_key(r)][0]!r} about {asked[row_key(r)][1]!r} (another benchmark "
                 f"file under the same name?): use another --out")
    todo = [j for j in jobs if j["key"] not in done]
    if not todo:
        return
    model, processor = cached_model(args.model, args.device)
    write_args(args_path(out_path.parent, folder=True), vars(args))  # the model loaded: its answers are valid
    groups = [[j for j in todo if j["path"] is not None], [j for j in todo if j["path"] is None]]
    with open(out_path, "a", encoding="utf-8") as f, tqdm(total=len(todo), desc=desc) as bar:
        for group in groups:
            for i in range(0, len(group), args.batch_size):
                batch = group[i:i + args.batch_size]
                images = [noisy_image(j, args.seed) for j in batch if j["path"] is not None]
                texts = [chat_prompt(processor, j["prompt"], 1 if images else 0) for j in batch]
                problems = prompt_problems(model, processor, texts, [[im] for im in images] or [[] for _ in batch],
                                           [max_new_tokens] * len(batch), "new tokens at most")
                for j, problem in zip(batch, problems):  # every question needs its answer
                    if problem:
                        fail(f"{j['where']}: {problem}")
                outputs = generate_greedy(model, processor, texts, images or None, max_new_tokens)  # B texts
                for j, text in zip(batch, outputs):
                    row = {**j["row"], "prompt": j["prompt"], "text": text}
                    append_jsonl(f, {**row, "answer": parse(text)} if parse else row)
                bar.update(len(batch))


def answer_file(benchmark, items, answered):
    """One sigma's answer file in the benchmark's official format, in question-file order.
    answered: {id: answers.jsonl row}."""
    if benchmark == "amber":  # a yes/no response is the normalised "answer"
        return [{"id": it["fields"]["id"], "response": answered[it["id"]].get("answer", answered[it["id"]]["text"])}
                for it in items if it["id"] in answered]
    if benchmark == "hallusionbench":
        return [{**it["fields"], "model_prediction": answered[it["id"]]["text"]}
                for it in items if it["id"] in answered]
    texts = {qid: row["text"] for qid, row in answered.items()}
    return mmhal_responses([it["fields"] for it in items], texts)


def main(argv=None):
    exits_in_one_sentence("rerun the same command: the answers written so far are kept")
    args = parse_args(argv)
    # ---- plumbing: one run per --out; every input read and checked before the model loads ----
    Image.MAX_IMAGE_PIXELS = args.max_image_pixels or None
    args.noise_sigma = sorted(set(args.noise_sigma))  # a repeated sigma would ask everything twice
    out = Path(args.out)
    claim_out(out, {"--questions": args.questions, "--annotations": args.annotations, "--model": args.model},
              folder=True)
    out.mkdir(parents=True, exist_ok=True)
    try:
        items = read_benchmark(args)
        if Path(args.model).exists():  # a local folder: resumes compare where, not spelling
            args.model = str(Path(args.model).resolve())
        jobs = benchmark_jobs(args, items)
        args.model_identity = model_identity(args.model)  # retrained in place: another model
        # args.json is written once the model has loaded: a wrong --model leaves none to refuse its fix
        same_settings(read_args(args_path(out, folder=True)), vars(args), ANSWER_ARGS, f"{out} holds answers made with")
        # 1. answer each question at each sigma: yes/no ones, then open ones (their own cap)
        path = out / "answers.jsonl"
        parse = amber_response if args.benchmark == "amber" else None
        generate_all(args, [j for j in jobs if not j["open"]], path, args.max_new_tokens, args.benchmark, parse)
        generate_all(args, [j for j in jobs if j["open"]], path, args.open_max_new_tokens, f"{args.benchmark} (open)")
        # 2. each sigma's answers in the benchmark's own answer file (JSON: its official scorer json.loads it)
        files = {}
        for sigma in args.noise_sigma:
            rows = answered(path, [j for j in jobs if j["sigma"] == sigma])
            files[f"{sigma:g}"] = answer_file(args.benchmark, items, {str(r["question_id"]): r for _, r in rows})
            file = out / f"sigma{sigma:g}" / ANSWER_FILES[args.benchmark]
            file.parent.mkdir(exist_ok=True)
            file.write_text(json.dumps(files[f"{sigma:g}"], indent=1))
        # 3. the in-repo scores, where the official rule is a string rule
        scores = {s: score_benchmark(args.benchmark, items, rows) for s, rows in files.items()}
    except (ValueError, FileNotFoundError) as e:  # the readers' "file: item: why"
        fail(str(e))
    written = {s: str(out / f"sigma{s}" / ANSWER_FILES[args.benchmark]) for s in files}
    metrics = {"model": args.model, "benchmark": args.benchmark, "questions": str(args.questions),
               "sigmas": args.noise_sigma, "files": written, args.benchmark: scores}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print_benchmark(metrics)
    return metrics


# ==================================================================================================
# Appendix: plumbing. A first reading may skip everything below: the stage's own input/output
# and printing, then helpers that several stages need, copied verbatim between
# "# ---- shared: NAME ----" rulers so each script stands alone (tests/test_shared_blocks.py
# keeps every copy identical).
# ==================================================================================================
# ---- plumbing: reading the benchmarks' files, each field checked on its own item ----
# what a field must be: (test, what the error says); a bool is no number and no id
ID = (lambda v: isinstance(v, str) or type(v) is int, "text or an integer")
COUNT = (lambda v: type(v) is int and v >= 1, "an integer >= 1")
TEXT = (lambda v: isinstance(v, str) and v.strip() != "", "non-empty text")
STR = (lambda v: isinstance(v, str), "text")
IMAGE = (lambda v: v is None or TEXT[0](v), "a path or null")
SIGMA = (lambda v: type(v) in (int, float) and 0 <= v <= 1, "a number in [0, 1]")
HALLUSION = {"category": (lambda v: v in ("VD", "VS"), "'VD' or 'VS'"), "subcategory": TEXT,
             "set_id": ID, "figure_id": ID, "question_id": ID, "question": TEXT,
             "gt_answer": (lambda v: ID[0](v) and str(v) in ("0", "1"), "'0' or '1'"), "filename": IMAGE}
QUESTIONS = {"amber": {"id": COUNT, "image": TEXT, "query": TEXT}, "hallusionbench": HALLUSION,
             "mmhal": {"question": TEXT, "image_src": TEXT}}
# an answers.jsonl row as this stage writes it (its prompt and image are compared on resume)
ANSWER = {"question_id": ID, "split": TEXT, "sigma": SIGMA, "prompt": STR, "image": IMAGE, "text": STR}
ANSWER_FILES = {"amber": "amber_responses.json", "hallusionbench": "HallusionBench_result.json",
                "mmhal": "mmhal_responses.json"}
IMAGE_FOLDERS = {"amber": ".", "hallusionbench": "hallusion_bench", "mmhal": "images"}


def check_fields(row, fields, where):
    """Raise ValueError naming `where` (file and item or line) for the first field of `fields`
    ({name: (test, what)}) that is missing or fails its test."""
    for name, (ok, what) in fields.items():
        if name not in row:
            raise ValueError(f"{where}: missing field '{name}'")
        if not ok(row[name]):
            raise ValueError(f"{where}: {name} must be {what}, got {str(row[name])[:80]!r}")


def read_json_list(path, fields, limit=None):
    """The first `limit` items of a JSON list file, each an object whose fields pass their test."""
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list, got {type(items).__name__}")
    for i, item in enumerate(items[:limit]):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: item {i} is not a JSON object")
        check_fields(item, fields, f"{path}: item {i}")
    return items[:limit]


def hallusion_key(row):
    """A HallusionBench question's id: the key its get_eval_all asserts unique."""
    return "_".join(str(row[f]) for f in ("category", "subcategory", "set_id", "figure_id", "question_id"))


def read_amber_annotations(path, queries):
    """{id: annotation} of AMBER's annotations.json (default: beside the query file, or one up as in
    AMBER's data/query/ and data/annotations.json). inference.py reads id's annotation at position
    id - 1, so each item must sit there; a yes/no item's truth is "yes" or "no"."""
    candidates = [Path(path)] if path else [Path(queries).parent / "annotations.json",
                                            Path(queries).parent.parent / "annotations.json"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no annotations.json in {', '.join(map(str, candidates))}: pass --annotations")
    annotations = read_json_list(path, {"id": COUNT, "type": TEXT, "truth": (lambda v: True, "")})
    for i, a in enumerate(annotations):
        if a["id"] != i + 1:
            raise ValueError(f"{path}: item {i} has id {a['id']!r}, but AMBER's inference.py "
                             f"reads an id's annotation at position id - 1")
        if a["type"] != "generative" and a["truth"] not in ("yes", "no"):
            raise ValueError(f"{path}: item {i}: truth must be 'yes' or 'no', got {a['truth']!r}")
    return {a["id"]: a for a in annotations}


def read_benchmark(args):
    """The questions of an AMBER, HallusionBench or MMHal-Bench file as items {id (str), image (relative;
    None: no image), prompt, open (a long answer), fields (the item as read), index} and, for AMBER, its
    annotation's type and truth. An id may not repeat."""
    path = Path(args.questions)
    annotations = read_amber_annotations(args.annotations, path) if args.benchmark == "amber" else {}
    items = []
    seen = {}  # {id: its first item}
    for i, q in enumerate(read_json_list(path, QUESTIONS[args.benchmark], args.limit)):
        item = {"fields": q, "index": i, "open": args.benchmark == "mmhal"}
        if args.benchmark == "amber":
            if q["id"] not in annotations:
                raise ValueError(f"{path}: item {i}: id {q['id']!r} has no annotation")
            a = annotations[q["id"]]
            item.update(id=str(q["id"]), image=q["image"], prompt=q["query"], open=a["type"] == "generative",
                        type=a["type"], truth=a["truth"])
        elif args.benchmark == "hallusionbench":
            item.update(id=hallusion_key(q), image=q["filename"], prompt=q["question"])
        else:  # mmhal: the images folder holds each image_src under its file name
            item.update(id=str(i), image=Path(urlparse(q["image_src"]).path).name, prompt=q["question"])
        first = seen.setdefault(item["id"], i)
        if first != i:
            raise ValueError(f"{path}: item {i}: id {item['id']!r} repeats item {first}")
        items.append(item)
    return items


def row_key(row):
    """(split, sigma, question_id) of an answers.jsonl row."""
    return row["split"], float(row["sigma"]), str(row["question_id"])


def answered(path, jobs=None):
    """[(line, row)] already in answers.jsonl (of these jobs, when given: a run writes its own questions'
    files, even if an earlier run into the --out answered more), after cutting a last line a crash left
    unfinished; a row that is not one this stage writes ends the run naming its line."""
    if not continue_jsonl(path):
        return []
    rows = read_jsonl(path)
    for n, r in rows:
        check_fields(r, ANSWER, f"{path}:{n}")
    wanted = None if jobs is None else {j["key"] for j in jobs}
    return [(n, r) for n, r in rows if wanted is None or row_key(r) in wanted]


# ---- plumbing: the model and printing ----
@functools.lru_cache(maxsize=1)
def cached_model(path, device):
    """Load the model once, and only when something is left to answer (a finished rerun needs none)."""
    return load_model(path, device)


def print_benchmark(metrics):
    """AMBER's yes/no scores as AMBER prints them (percent), HallusionBench's approximate accuracies,
    and where each sigma's answer file is."""
    benchmark = metrics["benchmark"]
    for s, scores in metrics[benchmark].items():
        if benchmark == "amber":
            print(f"{'sigma':>5} {'AMBER':<10} {'acc':>6} {'prec':>6} {'rec':>6} {'F1':>6} {'n':>6}")
            for group, m in scores["discriminative"].items():
                print(f"{s:>5} {group:<10} {m['accuracy']:6.1f} {m['precision']:6.1f} "
                      f"{m['recall']:6.1f} {m['f1']:6.1f} {m['n']:6d}")
            print(f"{s:>5} {scores['generative_exported']} descriptions exported for AMBER's "
                  f"inference.py (CHAIR, Cover, Hal, Cog)")
        elif benchmark == "hallusionbench":
            print(f"{'sigma':>5} {'HallusionBench':<14} {'aAcc':>6} {'fAcc':>6} {'qAcc':>6} "
                  f"{'n':>6}   (rule-based: approximates the GPT-4-judged scores)")
            for group, m in scores["approximate"].items():
                print(f"{s:>5} {group:<14} {m['aAcc']:6.2f} {m['fAcc']:6.2f} {m['qAcc']:6.2f} {m['n']:6d}")
        else:
            print(f"{s:>5} MMHal-Bench: {scores['n']} answers; score them with LLaVA-RLHF's "
                  f"Eval/eval_gpt_mmhal.py (GPT-4)")
        print(f"{s:>5} answer file: {metrics['files'][s]}")

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

"""POPE and the paper's other benchmarks (AMBER, HallusionBench, MMHal-Bench): greedy answers in
each benchmark's official format, the official string-rule scores, a noise sweep, CHAIR on the toy
world.

Paper: hallucination measured on POPE (Li et al., 2023) with the LLaVA-1.5 protocol, also on noisy
images I_noise, and on AMBER, HallusionBench and MMHal-Bench.
  prompt   = question + "\n" + "Answer the question using a single word or phrase."
             (the join of LLaVA-1.5's own POPE questions; chat template; --no-suffix drops it)
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
The other benchmarks (--benchmark) ask each question as their files write it, with no suffix;
open questions (AMBER's descriptions, MMHal-Bench) get --open-max-new-tokens:
  AMBER    yes/no answers -> exactly "Yes" / "No" by the POPE parse; scored as AMBER scores them:
             exact match, "No" positive, accuracy, precision = (No & truth no) / No,
             recall = (No & truth no) / truth no, F1 = 2PR/(P+R+1e-4) from P, R in percent
             rounded to 0.1 (existence: +1e-3), counts starting at 0.001; overall, existence,
             attribute (state, number, action), relation = every other non-generative type.
             Descriptions are exported for AMBER's own scorer (it needs spaCy and nltk).
  HallusionBench  model_prediction added to each question. aAcc, fAcc, qAcc with a string rule in
             place of the GPT-4 judge, so an APPROXIMATION: verdict "Yes"/"No"/"Unknown" as
             VLMEvalKit extracts it, right if it is gt_answer ("1" yes); "Unknown" is right only
             on VS questions without a figure (the official "uncertain" rule).
  MMHal-Bench  model_answer filled into the template, in its order (the GPT-4 judge takes the
             question type from the position); its score is the user's GPT-4 run.
Where each rule comes from (repository: path):
  POPE     haotian-liu/LLaVA: playground/data/eval/pope/llava_pope_test.jsonl (suffix and "\n"
           join; shipped in eval.zip, docs/Evaluation.md; a copy sits in commit 32cebc3, off the
           main branch), llava/eval/model_vqa_loader.py (decoding), llava/eval/eval_pope.py (parse)
  AMBER    junyangwang0410/AMBER: README.md (query {id, image, query}; answers a JSON list
           [{id, response}]; ids 1-1004 generative), inference.py (json.load of the answers, the
           annotation of id at position id - 1, its "type", exact "Yes"/"No", the rates),
           data/metrics.txt (counts start at 0.001), data/annotations.json (975
           "discriminative-relation" + 689 "relation" items, both relation)
  HallusionBench  tianyi-lab/HallusionBench: README.md (HallusionBench.json, model_prediction,
           HallusionBench_result.json), evaluation.py (reads that file), utils.py
           (assign_correctness, get_eval_all, get_eval_fig, get_eval_pair_all: aAcc, fAcc, qAcc);
           the verdict: open-compass/VLMEvalKit: vlmeval/dataset/utils/yorn.py (YOrN_Extraction)
  MMHal    llava-rlhf/LLaVA-RLHF: Eval/eval_gpt_mmhal.py (asserts 96 items, question type =
           position % 8, reads image_content, question, gt_answer, model_answer),
           MMHal-Bench-eval/get_response.py at 6a0df2d (fills model_answer into
           response_template.json, reads image_src and question)
  Not checked here: MMHal-Bench's response_template.json (a Hugging Face dataset; its images/
  by file name as TideDra/VL-RLHF: src/vlrlhf/eval/mmhal/eval.py reads them), the image zips of
  AMBER and HallusionBench (Google Drive; HallusionBench's README unzips hallusion_bench/ beside
  HallusionBench.json, whose filenames start ./VD/ or ./VS/).

Input   questions, one file per split (split = file name less "coco_pope_" and extension),
          images relative to --images, else to the file:
          {"question_id", "image", "text", "label": "yes"|"no"}
        --answers (re-score, no model): {"question_id", "text", ["split"], ["sigma"], ["prompt"],
          ["image"]} (LLaVA's answer files as is); an answer whose prompt does not start with its
          question's text, or whose image is another, is refused (another split's answers)
        --describe (toy world): {"question_id", "image", "text"};
          truth.jsonl: {"image", "objects": [{"class"}]}
        --benchmark amber: a query file [{"id", "image", "query"}] and annotations.json
          [{"id", "type", "truth"}]; --answers: an AMBER answer file [{"id", "response"}]
        --benchmark hallusionbench: HallusionBench.json [{"category", "subcategory", "set_id",
          "figure_id", "question_id", "question", "gt_answer", "filename" (null: no image), ...}];
          --answers: a HallusionBench_result.json
        --benchmark mmhal: response_template.json [{"question", "image_src", ...}], images by the
          file name of image_src
Output  <out>/answers.jsonl {"question_id", "split", "sigma", "image", "prompt", "text", "answer"},
          appended as produced (a benchmark's name is its split; AMBER's "answer" is "Yes"/"No");
        <out>/describe.jsonl {"question_id", "sigma", "image", "prompt", "text"};
        <out>/args.json;
        <out>/metrics.json {"model", "questions", "sigmas", "pope": {sigma: {split: metrics}},
          "mean", "chair"}, or {"model", "benchmark", "questions", "sigmas", "files",
          <benchmark>: {sigma: scores}};
        <out>/sigma<s>/amber_responses.json, HallusionBench_result.json or mmhal_responses.json
Shapes: B = prompts in a batch.

Launch (single process: POPE is small, one device is enough, so there is no torchrun path):
  python 05_eval_pope.py                     # toy world on CPU: world/model on world/pope
  python 05_eval_pope.py --model runs/p2dpo --out runs/eval_p2dpo --noise-sigma 0 0.1 0.2 0.3 \
      --describe world/describe.jsonl        # toy world: trained model, noise sweep, CHAIR
  python 05_eval_pope.py --model llava-hf/llava-1.5-7b-hf --questions /path/to/pope/coco \
      --images /path/to/val2014 --out runs/eval_llava          # one GPU, real model
  python 05_eval_pope.py --benchmark amber --model llava-hf/llava-1.5-7b-hf \
      --questions AMBER/data/query/query_all.json --images /path/to/AMBER/image \
      --out runs/amber_llava                 # one GPU: AMBER, scored here and exported
  python 05_eval_pope.py --questions coco_pope_random.json --answers answers.jsonl \
      --out runs/rescore                     # re-score an answers file, no model
A rerun into the same --out resumes: (split, sigma, question_id) already in answers.jsonl are
skipped when they were asked the same prompt about the same image, by the same model (files and
all) and settings; anything else is refused. args.json is written once the model has loaded; one
run per --out at a time (<out>.lock). A question whose image is unreadable, or whose prompt + the
length cap runs past the model's context, ends the run naming its file and line: every question
needs its answer.
"""
import argparse
import errno
import fcntl
import functools
import json
import math
import os
import re
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

# LLaVA-1.5's POPE prompt: its question files join question and suffix with a newline
SUFFIX = "\nAnswer the question using a single word or phrase."
BENCHMARKS = ("pope", "amber", "hallusionbench", "mmhal")
# resuming into an --out needs these arguments equal to those of the run that wrote its answers
ANSWER_ARGS = ("model", "no_suffix", "max_new_tokens", "describe_max_new_tokens", "seed",
               "benchmark", "open_max_new_tokens", "model_identity")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--benchmark", choices=BENCHMARKS, default="pope",
                   help="pope, or the paper's other benchmarks in their official formats")
    p.add_argument("--model", default="world/model",
                   help="model folder or a name in your own HF cache")
    p.add_argument("--questions", default=None,
                   help="POPE question file or folder of them (default world/pope); AMBER's query "
                        "file, HallusionBench.json or MMHal-Bench's response_template.json")
    p.add_argument("--images", default=None,
                   help="image folder (default: each question file's folder; HallusionBench: its "
                        "hallusion_bench/ beside it; MMHal-Bench: its images/ beside it)")
    p.add_argument("--annotations", default=None,
                   help="AMBER's annotations.json (default: beside the query file or one up)")
    p.add_argument("--out", default="runs/eval_base",
                   help="output folder (a rerun into it resumes)")
    p.add_argument("--answers", default=None,
                   help="re-score this answers file instead of running a model (POPE: answers "
                        "JSONL; AMBER and HallusionBench: their own answer file)")
    p.add_argument("--no-suffix", action="store_true",
                   help="ask the bare question, without LLaVA-1.5's suffix (POPE)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=128,
                   help="answer length cap (LLaVA-1.5's setting: 128)")
    p.add_argument("--open-max-new-tokens", type=at_least(1), default=1024,
                   help="cap for AMBER's descriptions and MMHal-Bench's open answers "
                        "(LLaVA-RLHF's Eval/model_vqa_mmhal.py: 1024)")
    p.add_argument("--noise-sigma", type=at_least(0.0, float), nargs="+", default=[0.0],
                   help="I_noise sigmas, e.g. 0 0.1 0.2 0.3")
    p.add_argument("--describe", default=None,
                   help="toy world: description prompts JSONL, scored with CHAIR")
    p.add_argument("--describe-max-new-tokens", type=at_least(1), default=64,
                   help="description length cap")
    p.add_argument("--truth", default=None,
                   help="truth.jsonl for CHAIR (default: by the describe file, or one up)")
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of the image noise")
    p.add_argument("--batch-size", type=at_least(1), default=32, help="prompts per generate call")
    p.add_argument("--device", type=device_name,
                   default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--limit", type=at_least(1), default=None,
                   help="use only the first N questions of each split or benchmark file")
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
    for q in questions:  # an answer that says what it answered must answer this question
        n, row = by_id[str(q["question_id"])]
        asked = " ".join(str(row.get("prompt", "")).split())  # (the suffix may follow)
        if "prompt" in row and not asked.startswith(" ".join(q.get("text", "").split())):
            raise ValueError(f"{where}:{n}: question_id {q['question_id']!r} answers "
                             f"{row['prompt']!r}, not {q['text']!r} (another split's answers?)")
        if row.get("image", q.get("image")) != q.get("image"):
            raise ValueError(f"{where}:{n}: question_id {q['question_id']!r} answers about "
                             f"{row['image']!r}, not {q['image']!r} (another split's answers?)")
    return [by_id[str(q["question_id"])][1]["text"] for q in questions]


def score_pope(questions, answers, where):
    """{sigma: {split: metrics}} from answer rows, re-parsed from their text.
    questions: {split: [row]}; answers: [(line, row)], grouped by their "split" and "sigma" fields
    (absent: the only split, sigma 0)."""
    splits = ", ".join(questions)
    blind = sum("split" not in row and "prompt" not in row for _, row in answers)
    if blind:
        print(f"warning: {where}: {blind} answers carry neither 'split' nor 'prompt', so nothing "
              f"shows they answer these questions")
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


# ---- the other benchmarks' rules ----
def amber_response(text):
    """A yes/no answer as AMBER's scorer compares it: exactly "Yes" or "No" (inference.py tests
    `response == 'Yes'` and `response == 'No'`, so "yes" or "No." would score as wrong), read by
    the POPE rule so that both benchmarks parse answers alike."""
    return "No" if parse_yes_no(text) == "no" else "Yes"


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
    counters = {}  # {counter set: {count: value}}, accumulated in inference.py's order
    for name in ("overall", "existence", "state", "number", "action", "relation"):
        counters[name] = {"n": 0.001, "correct": 0, "truth_no": 0.001, "said_no": 0.001, "tp": 0}
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
        metrics[group] = {"accuracy": round(total["correct"] / total["n"] * 100, 1),
                          "precision": precision,
                          "recall": recall,
                          "f1": round(f1 * 100, 1),
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
        rows = [(it["type"], it["truth"], said[it["id"]])
                for it in items if not it["open"] and it["id"] in said]
        generative = sum(it["open"] and it["id"] in said for it in items)
        return {"discriminative": amber_metrics(rows), "generative_exported": generative}
    if benchmark == "hallusionbench":
        return {"approximate": hallusion_metrics(responses),
                "note": "rule-based verdict, not the official GPT-4 judge"}
    return {"n": len(responses), "note": "scored by GPT-4 with LLaVA-RLHF's eval_gpt_mmhal.py"}


def main(argv=None):
    exits_in_one_sentence("rerun the same command: the answers written so far are kept")
    args = parse_args(argv)
    # a repeated sigma would answer every question twice
    args.noise_sigma = sorted(set(args.noise_sigma))
    out = Path(args.out)
    inputs = {"--questions": args.questions, "--answers": args.answers, "--model": args.model}
    claim_out(out, inputs, folder=True)  # one run per --out
    out.mkdir(parents=True, exist_ok=True)
    if args.questions is None:
        if args.benchmark != "pope":
            raise SystemExit(f"--benchmark {args.benchmark} needs --questions (its question file)")
        args.questions = "world/pope"
    try:
        if args.benchmark == "pope":
            metrics = evaluate_pope(args, out)
        else:
            metrics = evaluate_benchmark(args, out)
    except (ValueError, FileNotFoundError) as e:  # the readers' and scorers' "file:line: why"
        fail(str(e))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if args.benchmark == "pope":
        print_table(metrics)
    else:
        print_benchmark(metrics)
    return metrics


def evaluate_pope(args, out):
    """POPE's metrics per sigma and split (from a model, or re-scored from --answers), and CHAIR
    on the toy world's descriptions."""
    questions = read_questions(args.questions, args.limit)
    if args.answers:  # re-score only, like POPE's evaluate.py
        if args.describe:
            raise SystemExit("--describe needs a model; "
                             "descriptions are not re-scored from --answers")
        # its metrics.json and args.json belong to the run that made them
        if (out / "answers.jsonl").exists():
            raise SystemExit(f"{out} holds a run's answers.jsonl: re-score into another --out")
        args.model = None
        args.model_identity = None
        answers = read_answers(args.answers, questions, args.limit)
        check_resume(args, out)
        pope = score_pope(questions, answers, args.answers)
        record_args(args, out)
    else:
        # a local folder: resumes compare where it is, not how it was spelled
        if Path(args.model).exists():
            args.model = str(Path(args.model).resolve())
        jobs = pope_jobs(args, questions)
        if args.describe:  # read and checked before any generation
            objects, vocabulary = read_truth(args.describe, args.truth)
            chair_jobs = describe_jobs(args, objects)
        args.model_identity = model_identity(args.model)  # a model retrained in place is another
        check_resume(args, out)
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
    return metrics


def evaluate_benchmark(args, out):
    """AMBER, HallusionBench or MMHal-Bench: per sigma, the answers in the benchmark's own file
    (<out>/sigma<s>/) and the in-repo scores; or --answers, that file re-scored."""
    if args.describe:
        raise SystemExit("--describe (CHAIR) is the toy world's, on POPE runs")
    items = read_benchmark(args)
    if args.answers:
        if args.benchmark == "mmhal":
            raise SystemExit("MMHal-Bench is scored by a GPT-4 judge (LLaVA-RLHF's "
                             "Eval/eval_gpt_mmhal.py), not here")
        if (out / "answers.jsonl").exists():
            raise SystemExit(f"{out} holds a run's answers.jsonl: re-score into another --out")
        args.model = None
        args.model_identity = None
        check_resume(args, out)
        files = {0.0: read_answer_file(args, items)}
        written = {}
        record_args(args, out)
    else:
        if Path(args.model).exists():
            args.model = str(Path(args.model).resolve())
        jobs = benchmark_jobs(args, items)
        args.model_identity = model_identity(args.model)  # a model retrained in place is another
        check_resume(args, out)
        parse = amber_response if args.benchmark == "amber" else None
        generate_all(args, [j for j in jobs if not j["open"]], out / "answers.jsonl",
                     args.max_new_tokens, args.benchmark, parse=parse)
        generate_all(args, [j for j in jobs if j["open"]], out / "answers.jsonl",
                     args.open_max_new_tokens, f"{args.benchmark} (open)")
        answered = rows_by_sigma(jobs, out / "answers.jsonl")
        files = {s: answer_file(args.benchmark, items, answered[s]) for s in args.noise_sigma}
        written = write_answer_files(args.benchmark, files, out)
    return {"model": args.model, "benchmark": args.benchmark, "questions": str(args.questions),
            "sigmas": sorted(files), "files": written,
            args.benchmark: {f"{s:g}": score_benchmark(args.benchmark, items, rows)
                             for s, rows in files.items()}}


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


def beside_or_one_up(given, anchor, name, flag):
    """The file `given` (a flag's value), else `name` beside the file `anchor` or one folder up."""
    if given:
        candidates = [Path(given)]
    else:
        candidates = [Path(anchor).parent / name, Path(anchor).parent.parent / name]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no {name} in {', '.join(map(str, candidates))}: pass {flag}")
    return path


def read_truth(describe, truth=None):
    """({absolute image path: set of classes}, vocabulary) from truth.jsonl; vocabulary =
    world.json's "classes" when it lies beside truth.jsonl, else every class seen in
    truth.jsonl."""
    path = beside_or_one_up(truth, describe, "truth.jsonl", "--truth")
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


# ---- plumbing: the other benchmarks' files ----
HALLUSION_FIELDS = ("category", "subcategory", "set_id", "figure_id", "question_id", "question",
                    "gt_answer", "filename")
ANSWER_FILES = {"amber": "amber_responses.json", "hallusionbench": "HallusionBench_result.json",
                "mmhal": "mmhal_responses.json"}
IMAGE_FOLDERS = {"amber": ".", "hallusionbench": "hallusion_bench", "mmhal": "images"}


def read_json_list(path, fields, limit=None):
    """The first `limit` items of a JSON list file, each checked to be an object with `fields`."""
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list, got {type(items).__name__}")
    items = items[:limit]
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: item {i} is not a JSON object")
        missing = [f for f in fields if f not in item]
        if missing:
            raise ValueError(f"{path}: item {i}: missing field '{missing[0]}'")
    return items


def hallusion_key(row):
    """A HallusionBench question's id: the key its get_eval_all asserts unique."""
    fields = ("category", "subcategory", "set_id", "figure_id", "question_id")
    return "_".join(str(row[f]) for f in fields)


def read_amber_annotations(path, queries):
    """{id: annotation} of AMBER's annotations.json (default: beside the query file, or one up as
    in AMBER's data/query/ and data/annotations.json). inference.py reads id's annotation at
    position id - 1, so each item must sit there."""
    path = beside_or_one_up(path, queries, "annotations.json", "--annotations")
    annotations = read_json_list(path, ("id", "type", "truth"))
    for i, a in enumerate(annotations):
        if a["id"] != i + 1:
            raise ValueError(f"{path}: item {i} has id {a['id']!r}, but AMBER's inference.py "
                             f"reads an id's annotation at position id - 1")
    return {a["id"]: a for a in annotations}


def read_benchmark(args):
    """The questions of an AMBER, HallusionBench or MMHal-Bench file as items {id (str), image
    (relative; None: no image), prompt, open (a long answer), fields (the item as read), index}
    and, for AMBER, its annotation's type and truth."""
    path = Path(args.questions)
    items = []
    if args.benchmark == "amber":
        annotations = read_amber_annotations(args.annotations, path)
        for i, q in enumerate(read_json_list(path, ("id", "image", "query"), args.limit)):
            if q["id"] not in annotations:
                raise ValueError(f"{path}: item {i}: id {q['id']!r} has no annotation")
            a = annotations[q["id"]]
            items.append({"id": str(q["id"]), "image": q["image"], "prompt": q["query"],
                          "open": a["type"] == "generative", "fields": q, "index": i,
                          "type": a["type"], "truth": a["truth"]})
    elif args.benchmark == "hallusionbench":
        for i, q in enumerate(read_json_list(path, HALLUSION_FIELDS, args.limit)):
            items.append({"id": hallusion_key(q), "image": q["filename"], "prompt": q["question"],
                          "open": False, "fields": q, "index": i})
    else:  # mmhal: the images folder holds each image_src under its file name
        for i, q in enumerate(read_json_list(path, ("question", "image_src"), args.limit)):
            image = Path(urlparse(q["image_src"]).path).name
            items.append({"id": str(i), "image": image, "prompt": q["question"], "open": True,
                          "fields": q, "index": i})
    seen = {}
    for it in items:
        first = seen.setdefault(it["id"], it["index"])
        if first != it["index"]:
            raise ValueError(f"{path}: item {it['index']}: id {it['id']!r} repeats item {first}")
    return items


def read_answer_file(args, items):
    """The rows of an AMBER or HallusionBench answer file to re-score, each checked to answer one
    of the questions."""
    if args.benchmark == "amber":
        rows = read_json_list(args.answers, ("id", "response"))
        ids = [str(r["id"]) for r in rows]
    else:
        rows = read_json_list(args.answers, (*HALLUSION_FIELDS, "model_prediction"))
        ids = [hallusion_key(r) for r in rows]
    known = {it["id"] for it in items}
    for i, qid in enumerate(ids):
        if qid not in known:
            raise ValueError(f"{args.answers}: item {i}: {qid} is not among the questions")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{args.answers}: an id is answered twice")
    return rows


def answer_file(benchmark, items, answered):
    """One sigma's answer file in the benchmark's official format, in question-file order.
    answered: {id: answers.jsonl row}."""
    if benchmark == "amber":  # a yes/no response is the normalised "answer"
        return [{"id": it["fields"]["id"],
                 "response": answered[it["id"]].get("answer", answered[it["id"]]["text"])}
                for it in items if it["id"] in answered]
    if benchmark == "hallusionbench":
        return [{**it["fields"], "model_prediction": answered[it["id"]]["text"]}
                for it in items if it["id"] in answered]
    texts = {qid: row["text"] for qid, row in answered.items()}
    return mmhal_responses([it["fields"] for it in items], texts)


def write_answer_files(benchmark, files, out):
    """Write each sigma's answer file (JSON, as the official scorers json.load it); returns
    {sigma: path}."""
    written = {}
    for sigma, rows in files.items():
        path = out / f"sigma{sigma:g}" / ANSWER_FILES[benchmark]
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(rows, indent=1))
        written[f"{sigma:g}"] = str(path)
    return written


def rows_by_sigma(jobs, path):
    """{sigma: {id: answers.jsonl row}} of the rows that answer these jobs."""
    wanted = {j["key"] for j in jobs}
    rows = {sigma: {} for _, sigma, _ in wanted}
    for r in continue_jsonl(path):
        key = (r["split"], float(r["sigma"]), str(r["question_id"]))
        if key in wanted:
            rows[key[1]][key[2]] = r
    return rows

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
                row = {"question_id": q["question_id"], "split": split, "sigma": sigma,
                       "image": q["image"]}
                jobs.append({"key": (split, sigma, str(q["question_id"])),
                             "where": f"{q['file']}:{q['line']}",
                             "prompt": q["text"] + suffix,
                             "path": q["path"],
                             "noise_key": q["image"],
                             "sigma": sigma,
                             "row": row})
    return jobs


def benchmark_jobs(args, items):
    """One generation job per benchmark item per sigma, its split the benchmark's name; every image
    checked to exist first (HallusionBench's text-only questions have none)."""
    folder = Path(args.images or Path(args.questions).parent / IMAGE_FOLDERS[args.benchmark])
    for it in items:
        it["path"] = None if it["image"] is None else folder / it["image"]
        if it["path"] is not None and not it["path"].is_file():
            raise FileNotFoundError(f"{args.questions}: item {it['index']}: image not found: "
                                    f"{it['path']}")
    jobs = []
    for sigma in args.noise_sigma:
        for it in items:
            row = {"question_id": it["id"], "split": args.benchmark, "sigma": sigma,
                   "image": it["image"]}
            jobs.append({"key": (args.benchmark, sigma, it["id"]),
                         "where": f"{args.questions}: item {it['index']}",
                         "prompt": it["prompt"],
                         "path": it["path"],
                         "noise_key": it["image"],
                         "sigma": sigma,
                         "open": it["open"],
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
                         "where": f"{args.describe}:{r['line']}",
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
    (the file is the checkpoint). jobs: dicts with key, where (the question's file and line),
    prompt, path (image file; None: none), noise_key, sigma and row (the fields to write);
    parse(text), when given, adds the parsed "answer". A row already there with another prompt or
    image for the same key stops the run: it answers another question (e.g. POPE's suffix joined
    by a space before LLaVA's newline, or other question files under the same split names)."""
    asked = {j["key"]: (j["prompt"], j["noise_key"]) for j in jobs}  # the image as written
    done = set()
    for r in continue_jsonl(out_path):
        key = (r.get("split"), float(r["sigma"]), str(r["question_id"]))
        done.add(key)
        if key not in asked:
            continue
        prompt, image = asked[key]
        was = (r.get("prompt", prompt), r.get("image", image))  # (older rows lack "image")
        if was != (prompt, image):
            fail(f"{out_path}: question_id {r['question_id']!r} was asked {was[0]!r} about "
                 f"{was[1]!r} there, not {prompt!r} about {image!r} (other question files "
                 f"under the same names?): use another --out")
    todo = [j for j in jobs if j["key"] not in done]
    if not todo:
        return
    model, processor = cached_model(args.model, args.device)
    record_args(args, Path(out_path).parent)  # the model loads: this run's answers are valid
    # a batch is all with an image or all without (HallusionBench's text-only questions)
    groups = [[j for j in todo if j["path"] is not None], [j for j in todo if j["path"] is None]]
    with open(out_path, "a", encoding="utf-8") as f, tqdm(total=len(todo), desc=desc) as bar:
        for group in groups:
            for i in range(0, len(group), args.batch_size):
                batch = group[i:i + args.batch_size]
                images = [noisy_image(j, args.seed) for j in batch if j["path"] is not None]
                texts = [chat_prompt(processor, j["prompt"], 1 if images else 0)
                         for j in batch]
                per_row = [[im] for im in images] or [[] for _ in batch]
                fits = prompt_problems(model, processor, texts, per_row,
                                       [max_new_tokens] * len(batch), "new tokens at most")
                for j, problem in zip(batch, fits):  # every question needs its answer
                    if problem:
                        fail(f"{j['where']}: {problem}")
                outputs = generate_greedy(model, processor, texts, images or None,
                                          max_new_tokens)
                for j, text in zip(batch, outputs):
                    row = {**j["row"], "prompt": j["prompt"], "text": text}
                    if parse:
                        row["answer"] = parse(text)
                    append_jsonl(f, row)
                bar.update(len(batch))


def noisy_image(job, seed):
    """A job's image as the model sees it (I_noise at the job's sigma); an unreadable file ends the
    run naming the question (every question needs its answer; those before it are kept)."""
    try:
        image = load_image(job["path"])
    except (OSError, ValueError) as e:
        fail(f"{job['where']}: unreadable image {job['path']}: {e}")
    return add_noise(image, job["sigma"], seed, job["noise_key"])


def check_resume(args, out):
    """Refuse to mix answers of different models or settings in one --out. Nothing is written:
    record_args does that once the model has loaded, so a run with a wrong --model leaves no
    args.json to refuse the corrected run."""
    old = read_args(args_path(out, folder=True))
    if not old.get("answers"):  # an earlier model run (a re-score holds no answers of its own)
        same_settings(old, vars(args), ANSWER_ARGS, f"{out} holds answers made with")


def record_args(args, out):
    """<out>/args.json: this run's arguments, which check_resume compares a rerun with."""
    write_args(args_path(out, folder=True), vars(args))


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


def print_benchmark(metrics):
    """AMBER's yes/no scores as AMBER prints them (percent), HallusionBench's approximate
    accuracies, and where each sigma's answer file is."""
    benchmark = metrics["benchmark"]
    for s, scores in metrics[benchmark].items():
        if benchmark == "amber":
            print(f"{'sigma':>5} {'AMBER':<10} {'acc':>6} {'prec':>6} {'rec':>6} {'F1':>6} "
                  f"{'n':>6}")
            for group, m in scores["discriminative"].items():
                print(f"{s:>5} {group:<10} {m['accuracy']:6.1f} {m['precision']:6.1f} "
                      f"{m['recall']:6.1f} {m['f1']:6.1f} {m['n']:6d}")
            print(f"{s:>5} {scores['generative_exported']} descriptions exported for AMBER's "
                  f"inference.py (CHAIR, Cover, Hal, Cog)")
        elif benchmark == "hallusionbench":
            print(f"{'sigma':>5} {'HallusionBench':<14} {'aAcc':>6} {'fAcc':>6} {'qAcc':>6} "
                  f"{'n':>6}   (rule-based: approximates the GPT-4-judged scores)")
            for group, m in scores["approximate"].items():
                print(f"{s:>5} {group:<14} {m['aAcc']:6.2f} {m['fAcc']:6.2f} {m['qAcc']:6.2f} "
                      f"{m['n']:6d}")
        else:
            print(f"{s:>5} MMHal-Bench: {scores['n']} answers; score them with LLaVA-RLHF's "
                  f"Eval/eval_gpt_mmhal.py (GPT-4)")
        if s in metrics["files"]:
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
    """The rows already in an output JSONL, after cutting a last line a crash left unfinished.
    Any other bad line ends the run, naming it."""
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
    """The image file, opened lazily (header only), behind PIL's decompression-bomb guard
    (Image.MAX_IMAGE_PIXELS, its warning made an error). OSError / ValueError naming the file."""
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
        fail(f"--model {path}: no image-text model and processor load from it "
             f"({type(e).__name__}: {reason})")
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
def fail(message):
    """End the run with one sentence: what is at fault, what to do (--debug: the traceback too)."""
    if "--debug" in sys.argv[1:] and sys.exc_info()[0] is not None:
        traceback.print_exc()
    raise SystemExit(message)


def exits_in_one_sentence(rerun):
    """From here on, Ctrl-C, a full disk or an unreadable file end the process in one sentence
    saying what is kept and what to do (`rerun`), not a traceback (--debug: the traceback)."""
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
    if not device or (device.type != "cpu" and (device.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text!r} is no device of this machine (cpu, or cuda:N "
                                         f"for N < {torch.cuda.device_count()})")
    return text
# ---- end shared ----


# ---- shared: lock ----
STAGE = Path(__file__).name  # recorded in each args.json: which stage wrote an output
LOCKS = {}  # lock file -> its open file: the kernel frees an flock when its process ends


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
    """Record a run's settings and which stage wrote them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"stage": STAGE, **{k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def same_settings(old, new, keys, what):
    """Refuse a rerun whose `keys` differ from what the earlier run recorded."""
    for k in keys:
        if k in old and old[k] != new.get(k):
            fail(f"{what} {k}={old[k]!r}, not {new.get(k)!r}: use another --out, or delete it to "
                 f"start over")


def claim_out(out, inputs, folder=False):
    """Before any model loads: `out` is no input ({flag: path}), of this stage's kind, written by this
    stage or not at all, and writable; then this process holds `<out>.lock` (an flock, freed when
    the process ends; the file stays) and a second run into `out` refuses, naming the holder."""
    out = Path(out)
    for flag, path in inputs.items():
        if path is not None and Path(path).resolve() == out.resolve():
            fail(f"--out {out} is also the input {flag} {path}: writing it would destroy the "
                 f"input; pass another --out")
    if out.exists() and out.is_dir() != folder:
        fail(f"--out {out} exists and is not a {'folder' if folder else 'file'}: this stage "
             f"writes a {'folder' if folder else 'file'} there")
    writer = read_args(args_path(out, folder)).get("stage", STAGE)
    if writer != STAGE:
        fail(f"--out {out} was written by {writer}, not {STAGE}: pass another --out")
    if folder and out.is_dir() and not args_path(out, folder).is_file() and any(
            p.is_file() and p.stat().st_size for p in out.rglob("*")):  # (empty files: a failed run's)
        fail(f"--out {out} is a folder this stage did not write (no args.json in it): pass a new "
             f"or empty folder")
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
        fail(f"{out} is in use by {f.read().strip() or 'another run'} (lock {lock}): wait for "
             f"that run to end, or pass another --out")
    except OSError as e:  # a filesystem without locks (some network mounts)
        print(f"warning: cannot lock {lock} ({e.strerror}): nothing stops a second run into {out}")
    LOCKS[lock] = f
    f.truncate(0)
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
    f.flush()
# ---- end shared ----


# ---- shared: context ----
def prompt_problems(model, processor, texts, images, extra, what):
    """For each row None, or why the model cannot take it: its text holds an image placeholder
    (the processor would count one image too many and fail the whole batch), or its tokens, image
    tokens included, + extra[r] more (`what`) run past max_position_embeddings, where a model
    gives garbage without an error. texts: R chat prompts; images: R lists of images."""
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

"""Stage 05's other benchmarks in their official formats: AMBER (scored by its own rules, hand-computed
here), HallusionBench (the approximate aAcc/fAcc/qAcc, every input field kept) and MMHal-Bench (the
template's order), on small synthetic files in each benchmark's layout, run through tiny random models."""
import json
import random
import shutil

import pytest
from PIL import Image, ImageDraw

from conftest import load_script, run_script

ev = load_script("05_eval_benchmarks.py")

COLOURS = [(220, 30, 30), (30, 180, 30), (30, 30, 220)]


def picture(path, i):
    """A small image of one coloured circle; JPEG or PNG by the file name, as each benchmark ships."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (64, 48), (255, 255, 255))
    ImageDraw.Draw(img).ellipse([8, 8, 40, 40], fill=COLOURS[i % 3])
    img.save(path)


# ---- AMBER ----
def test_amber_metrics_by_hand():
    """Six items, AMBER's inference.py rules computed by hand. "No" is the positive class; counts start at
    0.001 (data/metrics.txt); F1 comes from P and R already rounded; a lower-case "yes" is not "Yes"; the type
    "relation" (689 items in the real file) is scored as relation, like "discriminative-relation"."""
    rows = [("discriminative-hallucination", "no", "No"),      # existence, right, TP
            ("discriminative-hallucination", "no", "Yes"),     # existence, wrong
            ("discriminative-attribute-state", "yes", "yes"),  # state: wrong, exact match only
            ("discriminative-attribute-state", "no", "No"),    # state, right, TP
            ("discriminative-relation", "yes", "Yes"),         # relation, right
            ("relation", "no", "No")]                          # relation, right, TP
    m = ev.amber_metrics(rows)
    # overall: n 6, right 4, truth no 4, said No 3, TP 3
    # acc 4/6.001 = 66.66 -> 66.7; P 3/3.001 = 99.97 -> 100.0; R 3/4.001 = 74.98 -> 75.0;
    # F1 = 2 * 1.0 * 0.75 / (1.75 + 1e-4) = 85.71 -> 85.7
    assert m["overall"] == {"accuracy": 66.7, "precision": 100.0, "recall": 75.0, "f1": 85.7,
                            "n": 6, "correct": 4, "truth_no": 4, "said_no": 3, "tp": 3}
    # existence: acc 1/2.001 = 49.98 -> 50.0; P 1/1.001 -> 99.9; R 1/2.001 -> 50.0;
    # F1 = 2 * .999 * .5 / (.999 + .5 + 1e-3) = 66.6 (from the unrounded P, R it would be 66.7)
    assert [m["existence"][k] for k in ("accuracy", "precision", "recall", "f1", "n")] == \
        [50.0, 99.9, 50.0, 66.6, 2]
    # attribute = state + number + action, three counter sets: n 2.003, truth no 1.003, said No 1.003
    # acc 1/2.003 = 49.93 -> 49.9; P = R = 1/1.003 = 99.70 -> 99.7; F1 = 2 * .997 * .997 / (1.994 + 1e-4) -> 99.7
    assert [m["attribute"][k] for k in ("accuracy", "precision", "recall", "f1", "n")] == \
        [49.9, 99.7, 99.7, 99.7, 2]
    # state alone: acc 1/2.001 -> 50.0; P = R = 1/1.001 -> 99.9; F1 -> 99.9
    assert [m["state"][k] for k in ("accuracy", "precision", "recall", "f1")] == [50.0, 99.9, 99.9, 99.9]
    # an empty set scores 0.0 (0 / 0.001), not a crash
    assert [m["number"][k] for k in ("accuracy", "precision", "recall", "f1", "n")] == [0.0] * 4 + [0]
    # relation: both types; acc 2/2.001 = 99.95002 -> 100.0; P = R = 1/1.001 -> 99.9; F1 -> 99.9
    assert [m["relation"][k] for k in ("accuracy", "precision", "recall", "f1", "n")] == \
        [100.0, 99.9, 99.9, 99.9, 2]
    # existence's F1 adds 1e-3, the others 1e-4: the same four answers (truth no; No, No, Yes, Yes) give
    # P = 2/2.001 -> 100.0, R = 2/4.001 -> 50.0, F1 = 1/(1.5 + 1e-3) = 66.62 -> 66.6 as existence but
    # 1/(1.5 + 1e-4) = 66.66 -> 66.7 as relation
    answers = [("no", "No"), ("no", "No"), ("no", "Yes"), ("no", "Yes")]
    existence = ev.amber_metrics([("discriminative-hallucination", *a) for a in answers])["existence"]
    relation = ev.amber_metrics([("relation", *a) for a in answers])["relation"]
    assert (existence["precision"], existence["recall"], existence["f1"]) == (100.0, 50.0, 66.6)
    assert (relation["precision"], relation["recall"], relation["f1"]) == (100.0, 50.0, 66.7)


@pytest.mark.parametrize("text, response", [
    ("Yes", "Yes"), ("No", "No"), ("No.", "No"), ("Yes, there is a dog.", "Yes"), ("There is no dog.", "No"),
    ("no", "No"), ("NO", "Yes"), ("", "Yes")])  # the POPE parse: "NO" and "" read as yes
def test_amber_responses_are_exactly_yes_or_no(text, response):
    assert ev.amber_response(text) == response


@pytest.fixture(scope="module")
def amber(tmp_path_factory):
    """AMBER's layout: data/query/query_all.json, data/annotations.json (entry i has id i + 1), images apart.
    Ids 1-2 generative, 3-8 yes/no of every type, two typed "relation" as in the real file."""
    root = tmp_path_factory.mktemp("amber")
    for i in range(1, 4):
        picture(root / "image" / f"AMBER_{i}.jpg", i)
    kinds = [("generative", ["sky", "circle"]), ("generative", ["circle"]),
             ("discriminative-hallucination", "no"), ("discriminative-attribute-state", "yes"),
             ("discriminative-attribute-number", "no"), ("discriminative-attribute-action", "yes"),
             ("discriminative-relation", "yes"), ("relation", "no")]
    annotations = []
    queries = []
    for n, (kind, truth) in enumerate(kinds, 1):
        annotation = {"id": n, "type": kind, "truth": truth}
        if kind == "generative":
            annotation["hallu"] = ["dog"]
        annotations.append(annotation)
        query = "Describe this image." if kind == "generative" else "Is there a red circle in this image?"
        queries.append({"id": n, "image": f"AMBER_{1 + n % 3}.jpg", "query": query})
    (root / "data" / "query").mkdir(parents=True)
    (root / "data" / "annotations.json").write_text(json.dumps(annotations, indent=4))
    (root / "data" / "query" / "query_all.json").write_text(json.dumps(queries, indent=4))
    return root


@pytest.mark.slow
def test_amber_end_to_end_json_printed_every_relation_item_and_resume(amber, tiny_llava, tmp_path):
    out = tmp_path / "amber"
    args = ["--benchmark", "amber", "--model", tiny_llava, "--questions", amber / "data" / "query" / "query_all.json",
            "--images", amber / "image", "--out", out, "--noise-sigma", "0", "0.3", "--max-new-tokens", "4",
            "--open-max-new-tokens", "8", "--batch-size", "3"]
    proc = run_script("05_eval_benchmarks.py", *args)
    metrics = json.loads((out / "metrics.json").read_text())
    for s in ("0", "0.3"):
        path = out / f"sigma{s}" / "amber_responses.json"
        responses = json.loads(path.read_text())  # one JSON list, as inference.py json.loads it (not JSONL)
        assert isinstance(responses, list) and path.read_text().lstrip().startswith("[")
        assert [r["id"] for r in responses] == list(range(1, 9))  # ints, query order, none dropped
        assert all(r["response"] in ("Yes", "No") for r in responses[2:])
        assert metrics["files"][s] == str(path)
        scores = metrics["amber"][s]
        assert scores["generative_exported"] == 2
        d = scores["discriminative"]
        assert d["overall"]["n"] == 6 and d["relation"]["n"] == 2 and d["existence"]["n"] == 1
        assert d["attribute"]["n"] == 3 == d["state"]["n"] + d["number"]["n"] + d["action"]["n"]
        rows = [(k, t, r["response"]) for (k, t), r in zip(
            [("discriminative-hallucination", "no"), ("discriminative-attribute-state", "yes"),
             ("discriminative-attribute-number", "no"), ("discriminative-attribute-action", "yes"),
             ("discriminative-relation", "yes"), ("relation", "no")], responses[2:])]
        assert d == ev.amber_metrics(rows)
    # the result is printed, AMBER's way (percent, one decimal)
    overall = metrics["amber"]["0"]["discriminative"]["overall"]
    assert f"{'overall':<10} {overall['accuracy']:6.1f} {overall['precision']:6.1f}" in proc.stdout
    assert "relation" in proc.stdout and "inference.py" in proc.stdout
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 16 and all(a["split"] == "amber" for a in answers)
    assert {a["prompt"] for a in answers} == {"Describe this image.", "Is there a red circle in this image?"}

    # a crash mid-line: the rerun answers the rest and writes the same files and scores
    lines = (out / "answers.jsonl").read_text().splitlines(keepends=True)
    (out / "answers.jsonl").write_text("".join(lines[:5]) + lines[5][:15])
    first = (out / "sigma0.3" / "amber_responses.json").read_text()
    ev.main(list(map(str, args)))
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert (out / "sigma0.3" / "amber_responses.json").read_text() == first
    assert len((out / "answers.jsonl").read_text().splitlines()) == 16


def test_amber_annotation_must_sit_at_id_minus_one(amber, tmp_path):
    """inference.py reads an id's annotation at position id - 1: a file that breaks this is refused."""
    annotations = json.loads((amber / "data" / "annotations.json").read_text())
    (tmp_path / "annotations.json").write_text(json.dumps(annotations[1:]))
    with pytest.raises(ValueError, match=r"annotations.json: item 0 has id 2.*position id - 1"):
        ev.read_amber_annotations(tmp_path / "annotations.json", amber / "data" / "query" / "query_all.json")


# ---- HallusionBench ----
@pytest.mark.parametrize("text, verdict", [
    ("Yes", "Yes"), ("Yes, it is.", "Yes"), ("No.", "No"), ("NO", "No"), ("no, not at all", "No"),
    ("yes and no", "Unknown"), ("I cannot tell.", "Unknown"), ("Yes-no", "Unknown"),  # '-' becomes a space
    ("yes:", "Unknown"), ("**No**", "Unknown")])  # ':' and '*' are not in VLMEvalKit's list: the word stays whole
def test_yes_no_verdict_is_vlmevalkits_rule(text, verdict):
    assert ev.yes_no_verdict(text) == verdict


def hallusion_item(category, subcategory, set_id, figure_id, question_id, gt, prediction=None):
    item = {"category": category, "subcategory": subcategory, "visual_input": "0" if figure_id == "0" and
            category == "VS" else "1", "set_id": set_id, "figure_id": figure_id, "sample_note": "circle",
            "question_id": question_id, "question": "Is the circle red?", "gt_answer_details": "It is.",
            "gt_answer": gt, "filename": None if category == "VS" and figure_id == "0" else
            f"./{category}/{subcategory}/{set_id}_{figure_id}.png"}
    if prediction is not None:
        item["model_prediction"] = prediction
    return item


def test_hallusion_metrics_by_hand():
    """aAcc per question, fAcc per figure (VS figure 0 left out), qAcc per question pair (HallusionBench's
    utils.py); an "Unknown" is right only on a VS question without a figure."""
    rows = [hallusion_item("VD", "illusion", "0", "0", "0", "1", "Yes, it is."),  # right
            hallusion_item("VD", "illusion", "0", "1", "0", "0", "Yes"),          # wrong
            hallusion_item("VD", "illusion", "0", "1", "1", "0", "No."),          # right
            hallusion_item("VS", "chart", "0", "0", "0", "1", "I cannot tell"),   # Unknown, no figure: right
            hallusion_item("VS", "chart", "0", "1", "0", "1", "yes and no"),      # Unknown on a figure: wrong
            hallusion_item("VS", "chart", "0", "0", "1", "0", "no")]              # right
    m = ev.hallusion_metrics(rows)
    # figures: VD_0_0 [right], VD_0_1 [wrong, right], VS_0_1 [wrong] -> 1/3
    # pairs: VD q0 [right, wrong], VD q1 [right], VS q0 [right, wrong], VS q1 [right] -> 2/4
    assert m["overall"] == {"aAcc": pytest.approx(400 / 6), "fAcc": pytest.approx(100 / 3), "qAcc": 50.0, "n": 6}
    assert m["VD"] == {"aAcc": pytest.approx(200 / 3), "fAcc": 50.0, "qAcc": 50.0, "n": 3}
    assert m["VS"] == {"aAcc": pytest.approx(200 / 3), "fAcc": 0.0, "qAcc": 50.0, "n": 3}


@pytest.fixture(scope="module")
def hallusion(tmp_path_factory):
    """HallusionBench.json beside hallusion_bench/ (its README: unzip the images there); filename null for the
    text-only VS questions; fields in the file's own order and types (all strings)."""
    root = tmp_path_factory.mktemp("hallusion")
    items = [hallusion_item("VS", "chart", "0", "0", "0", "0"), hallusion_item("VS", "chart", "0", "1", "0", "1"),
             hallusion_item("VD", "illusion", "0", "0", "0", "1"), hallusion_item("VD", "illusion", "0", "1", "0", "0"),
             hallusion_item("VD", "illusion", "0", "1", "1", "0")]
    for i, item in enumerate(items):
        if item["filename"]:
            picture(root / "hallusion_bench" / item["filename"], i)
    (root / "HallusionBench.json").write_text(json.dumps(items))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_llava", "tiny_qwen"])
def test_hallusion_end_to_end_keeps_every_field(model, hallusion, tmp_path, request):
    out = tmp_path / "hb"
    ev.main(["--benchmark", "hallusionbench", "--model", str(request.getfixturevalue(model)),
             "--questions", str(hallusion / "HallusionBench.json"), "--out", str(out), "--noise-sigma", "0", "0.2",
             "--max-new-tokens", "4", "--batch-size", "2"])
    questions = json.loads((hallusion / "HallusionBench.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    for s in ("0", "0.2"):
        result = json.loads((out / f"sigma{s}" / "HallusionBench_result.json").read_text())
        assert [{k: v for k, v in r.items() if k != "model_prediction"} for r in result] == questions
        assert [list(r) for r in result] == [[*q, "model_prediction"] for q in questions]  # same order of keys too
        assert all(isinstance(r["model_prediction"], str) for r in result)
        assert metrics["hallusionbench"][s]["approximate"] == ev.hallusion_metrics(result)
        assert "not the official GPT-4 judge" in metrics["hallusionbench"][s]["note"]
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 10 and sum(a["question_id"] == "VS_chart_0_0_0" for a in answers) == 2  # no image


# ---- MMHal-Bench ----
def mmhal_template(n=8):
    """Items with the fields of MMHal-Bench's response_template.json (as its loaders read them); model_answer
    empty, image_src a URL whose file name is the image's name in images/."""
    return [{"question_type": ["attribute", "adversarial", "comparison", "counting", "relation", "environment",
                               "holistic", "other"][i % 8], "question_topic": "animal", "image_id": f"id{i}",
             "image_src": f"https://c{i}.staticflickr.com/1/{i}/{i}00_abc_o.jpg", "image_content": ["Circle"],
             "question": "What colour is the circle?", "gt_answer": "It is red.", "model_answer": ""}
            for i in range(n)]


def test_mmhal_order_is_the_templates_whatever_order_answers_arrive_in():
    template = mmhal_template()
    answers = {str(i): f"answer {i}" for i in random.Random(0).sample(range(8), 8)}  # shuffled
    assert list(answers) != [str(i) for i in range(8)]
    out = ev.mmhal_responses(template, answers)
    assert [r["model_answer"] for r in out] == [f"answer {i}" for i in range(8)]
    assert [{**r, "model_answer": ""} for r in out] == template
    del answers["3"]  # a --limit run: unanswered items are left out, the order kept
    assert [r["image_id"] for r in ev.mmhal_responses(template, answers)] == [f"id{i}" for i in range(8) if i != 3]


@pytest.mark.slow
def test_mmhal_end_to_end_in_template_order(tiny_llava, tmp_path):
    root = tmp_path / "MMHal-Bench"
    template = mmhal_template()
    for i, item in enumerate(template):
        picture(root / "images" / item["image_src"].rsplit("/", 1)[1], i)
    (root / "response_template.json").write_text(json.dumps(template, indent=2))
    out = tmp_path / "mmhal"
    args = ["--benchmark", "mmhal", "--model", str(tiny_llava), "--questions", str(root / "response_template.json"),
            "--out", str(out), "--open-max-new-tokens", "6", "--batch-size", "3"]
    metrics = ev.main(args)
    path = out / "sigma0" / "mmhal_responses.json"
    result = json.loads(path.read_text())
    assert [{**r, "model_answer": ""} for r in result] == template
    answers = {a["question_id"]: a["text"] for a in map(json.loads, (out / "answers.jsonl").read_text().splitlines())}
    assert [r["model_answer"] for r in result] == [answers[str(i)] for i in range(8)]
    assert metrics["mmhal"]["0"]["n"] == 8 and "eval_gpt_mmhal.py" in metrics["mmhal"]["0"]["note"]
    # answers.jsonl in another order (e.g. after resumes): the file is rebuilt in the template's order
    lines = (out / "answers.jsonl").read_text().splitlines(keepends=True)
    random.Random(1).shuffle(lines)
    (out / "answers.jsonl").write_text("".join(lines))
    path.unlink()
    ev.main(args)
    assert json.loads(path.read_text()) == result


def test_benchmark_needs_its_question_file_and_images(amber, tmp_path, capsys):
    with pytest.raises(SystemExit):
        ev.main(["--benchmark", "amber", "--out", str(tmp_path / "o")])
    assert "the following arguments are required: --questions" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"query_all.json: item 0: image not found: .*AMBER_2.jpg"):
        ev.main(["--benchmark", "amber", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o"),
                 "--questions", str(amber / "data" / "query" / "query_all.json")])  # images are elsewhere


# ---- flags checked together, every input field on its own item (each test failed before its fix) ----
@pytest.mark.parametrize("argv, why", [
    (["--benchmark", "hallusionbench", "--annotations", "a.json", "--open-max-new-tokens", "9"],
     "--annotations, --open-max-new-tokens would do nothing for --benchmark hallusionbench"),
    (["--benchmark", "mmhal", "--max-new-tokens", "9"], "--max-new-tokens would do nothing for --benchmark mmhal"),
    (["--benchmark", "amber", "--noise-sigma", "2"], "argument --noise-sigma: 2 is not a finite number in"),
    (["--benchmark", "pope"], "argument --benchmark: invalid choice: 'pope'")])
def test_flags_that_contradict_are_refused_naming_them(argv, why, capsys):
    """Before, --annotations and the length caps their benchmark did not use were ignored in silence."""
    with pytest.raises(SystemExit):
        ev.parse_args(argv + ["--questions", "q.json"])
    assert why in capsys.readouterr().err


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        ev.parse_args(["--help"])
    options = capsys.readouterr().out.split("options:")[1].split("\n  -")[2:]
    assert len(options) == 15 and all("(default:" in " ".join(o.split()) for o in options)


@pytest.mark.parametrize("file, item, field, value, why", [
    ("query", 3, "id", True, "id must be an integer >= 1"), ("query", 3, "id", "4", "id must be an integer"),
    ("query", 3, "image", 5, "image must be non-empty text"), ("query", 3, "query", None, "query must be"),
    ("annotations", 4, "truth", "Yes", "truth must be 'yes' or 'no', got 'Yes'"),
    ("annotations", 4, "type", 7, "type must be non-empty text")])
def test_each_amber_field_is_checked_on_its_item(amber, tmp_path, file, item, field, value, why):
    """Before: id true read annotation 1, an image number ended in a TypeError, a truth "Yes" scored every answer
    to it as wrong."""
    data = tmp_path / "data"
    shutil.copytree(amber / "data", data)
    path = data / "query" / "query_all.json" if file == "query" else data / "annotations.json"
    rows = json.loads(path.read_text())
    rows[item][field] = value
    path.write_text(json.dumps(rows))
    args = ["--benchmark", "amber", "--questions", str(data / "query" / "query_all.json"), "--images",
            str(amber / "image"), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=f"{path.name}: item {item}: {why}"):
        ev.main(args)


@pytest.mark.parametrize("field, value, why", [
    ("gt_answer", "2", "gt_answer must be '0' or '1'"), ("gt_answer", True, "gt_answer must be"),
    ("category", "vd", "category must be 'VD' or 'VS'"), ("filename", 3, "filename must be a path or null"),
    ("set_id", 1.5, "set_id must be text or an integer"), ("question", "", "question must be non-empty text")])
def test_each_hallusionbench_field_is_checked_on_its_item(hallusion, tmp_path, field, value, why):
    """Before: gt_answer "2" ended in a KeyError, a filename number in a TypeError, "vd" was left out of VD."""
    items = json.loads((hallusion / "HallusionBench.json").read_text())
    items[2][field] = value
    (tmp_path / "HallusionBench.json").write_text(json.dumps(items))
    with pytest.raises(SystemExit, match=f"HallusionBench.json: item 2: {why}"):
        ev.main(["--benchmark", "hallusionbench", "--questions", str(tmp_path / "HallusionBench.json"),
                 "--images", str(hallusion / "hallusion_bench"), "--out", str(tmp_path / "o")])


def test_mmhal_items_are_checked(tmp_path):
    """Before: an MMHal-Bench image_src null ended in a TypeError."""
    template = mmhal_template()
    template[5]["image_src"] = None
    (tmp_path / "response_template.json").write_text(json.dumps(template))
    with pytest.raises(SystemExit, match="response_template.json: item 5: image_src must be non-empty text"):
        ev.main(["--benchmark", "mmhal", "--questions", str(tmp_path / "response_template.json"),
                 "--out", str(tmp_path / "o")])


def test_a_pope_out_or_a_damaged_answer_is_one_sentence(amber, tiny_llava, tmp_path):
    """05_eval_pope.py's --out (or one whose args.json names no stage: 05 before the split) is refused; a row of
    answers.jsonl whose image is a number ended in a TypeError."""
    out = tmp_path / "o"
    out.mkdir()
    args = ["--benchmark", "amber", "--model", str(tiny_llava), "--questions",
            str(amber / "data" / "query" / "query_all.json"), "--images", str(amber / "image"), "--out", str(out)]
    for old, writer in (({"stage": "05_eval_pope.py"}, "05_eval_pope.py"),
                        ({"benchmark": "pope", "noise_sigma": [0.0]}, "an older version or another program")):
        (out / "args.json").write_text(json.dumps(old))
        with pytest.raises(SystemExit, match=f"was written by {writer}.*, not 05_eval_benchmarks.py"):
            ev.main(args)
    ev.write_args(ev.args_path(out, folder=True), {})  # a run of this script that recorded its settings
    row = {"question_id": "3", "split": "amber", "sigma": 0.0, "prompt": "p", "image": 3, "text": "No"}
    (out / "answers.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(SystemExit, match="answers.jsonl:1: image must be a path or null"):
        ev.main(args)

"""Stage 05 (POPE): the official parser and metrics (golden numbers), matching by id, the official files as
published, flags checked together and every input field on its own line, and end-to-end runs on tiny random LLaVA and
Qwen2.5-VL models (noise sweep, CHAIR, re-scoring, resume)."""
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import ROOT, load_script, run_script

ev = load_script("05_eval_pope.py")

OFFICIAL = ROOT / "data" / "pope_coco"  # the published files, carried in the repository
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220)}


@pytest.mark.parametrize("text, answer", [
    ("Yes", "yes"), ("No.", "no"), ("no", "no"), ("NO", "yes"), ("Nope", "yes"), ("", "yes"),
    ("Not really", "yes"), ("not really", "no"), ("There is a dog, not a cat.", "no"), ("yes, no", "no"),
    ("Yes. No", "yes"), ("No,", "no"), ("No\nthere is none", "yes")])  # only ' ' splits: "No\nthere" is one word
def test_parse_yes_no_is_the_official_rule(text, answer):
    assert ev.parse_yes_no(text) == answer


def test_pope_metrics_golden_llava15():
    """LLaVA-1.5-7B's published POPE confusion counts (TP 1183, FP 31, TN 1379, FN 317) and its rates."""
    preds = ["yes"] * 1183 + ["yes"] * 31 + ["no"] * 1379 + ["no"] * 317
    labels = ["yes"] * 1183 + ["no"] * 31 + ["no"] * 1379 + ["yes"] * 317
    m = ev.pope_metrics(preds, labels)
    assert (m["TP"], m["FP"], m["TN"], m["FN"], m["n"]) == (1183, 31, 1379, 317, 2910)
    assert m["accuracy"] == pytest.approx(0.8804123711, abs=1e-9)
    assert m["precision"] == pytest.approx(0.9744645799, abs=1e-9)
    assert m["recall"] == pytest.approx(0.7886666667, abs=1e-9)
    assert m["f1"] == pytest.approx(0.8717759764, abs=1e-9)
    assert m["yes_ratio"] == pytest.approx(1214 / 2910)


def test_pope_metrics_zero_division():
    m = ev.pope_metrics(["no"] * 4, ["yes", "no", "yes", "no"])
    assert (m["precision"], m["recall"], m["f1"], m["yes_ratio"], m["accuracy"]) == (0.0, 0.0, 0.0, 0.0, 0.5)
    assert ev.pope_metrics([], [])["accuracy"] == 0.0


def test_answers_matched_by_id_not_order():
    questions = [{"question_id": i, "label": lab} for i, lab in zip(range(1, 5), ["yes", "no", "yes", "no"])]
    answers = [(n, {"question_id": qid, "text": t}) for n, (qid, t) in
               enumerate([(3, "Yes"), (1, "Yes"), (4, "No"), (2, "No")], 1)]  # shuffled
    assert ev.match_by_id(questions, answers, "a.jsonl") == ["Yes", "No", "Yes", "No"]
    with pytest.raises(ValueError, match=r"a.jsonl.*no answer for question_id 2\b"):
        ev.match_by_id(questions, [a for a in answers if a[1]["question_id"] != 2], "a.jsonl")
    with pytest.raises(ValueError, match=r"a.jsonl.*question_id 4 answered twice \(lines 3, 5\)"):
        ev.match_by_id(questions, answers + [(5, {"question_id": 4, "text": "Yes"})], "a.jsonl")


def test_rescore_official_popular_file(tmp_path):
    """--answers on the published CRLF file: answers are the labels except every 7th question (flipped) and
    every 11th answered "NO" (which the official rule reads as yes); written shuffled, LLaVA's answer format."""
    assert b"\r\n" in (OFFICIAL / "coco_pope_popular.json").read_bytes()  # as published
    rows = [json.loads(line) for line in (OFFICIAL / "coco_pope_popular.json").read_text().splitlines()]
    assert len(rows) == 3000
    answers, preds = [], []
    for r in rows:
        qid, label = r["question_id"], r["label"]
        text, pred = ("Yes.", "yes") if label == "yes" else ("No, there is not.", "no")
        if qid % 7 == 0:
            text, pred = ("No" if label == "yes" else "Yes, there is."), ("no" if label == "yes" else "yes")
        elif qid % 11 == 0:
            text, pred = "NO", "yes"
        answers.append({"question_id": qid, "prompt": r["text"], "text": text, "model_id": "x"})
        preds.append(pred)
    np.random.default_rng(0).shuffle(answers)
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    ev.main(["--questions", str(OFFICIAL / "coco_pope_popular.json"),
             "--answers", str(tmp_path / "answers.jsonl"), "--out", str(tmp_path / "out")])
    got = json.loads((tmp_path / "out" / "metrics.json").read_text())
    expected = ev.pope_metrics(preds, [r["label"] for r in rows])
    assert expected["FP"] > 0 and expected["FN"] > 0 and expected["TP"] + expected["FP"] + expected["TN"] + \
        expected["FN"] == 3000
    assert got["pope"]["0"]["popular"] == expected
    assert got["mean"]["0"]["f1"] == pytest.approx(expected["f1"])
    # the same answers against the folder of all three splits cannot be told apart: ids repeat across files
    with pytest.raises(SystemExit, match=r"answers.jsonl:1: no 'split' field.*3 question files.*pass one question"):
        ev.main(["--questions", str(OFFICIAL), "--answers", str(tmp_path / "answers.jsonl"),
                 "--out", str(tmp_path / "out2")])


def test_reads_all_official_files():
    questions = ev.read_questions(OFFICIAL)
    assert sorted(questions) == ["adversarial", "popular", "random"]
    assert all(len(rows) == 3000 and sum(q["label"] == "yes" for q in rows) == 1500 for rows in questions.values())


@pytest.mark.parametrize("line, problem", [
    ('{"question_id": 2, "image": "a.png", "text": "Is', "bad JSON line"),
    ('{"question_id": 2, "image": "a.png", "text": "Is?"}', "missing field 'label'"),
    ('{"question_id": 2, "image": "a.png", "text": "Is?", "label": "maybe"}', "label must be 'yes' or 'no'"),
    ('{"question_id": 1, "image": "a.png", "text": "Is?", "label": "no"}', "question_id 1 repeats line 1")])
def test_bad_question_line_names_file_and_line(tmp_path, line, problem):
    good = '{"question_id": 1, "image": "a.png", "text": "Is there a red circle?", "label": "yes"}'
    (tmp_path / "random.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=f"random.jsonl:2: {problem}"):
        ev.read_questions(tmp_path)


def test_bad_input_exits_nonzero_with_file_and_line(tmp_path):
    good = '{"question_id": 1, "image": "gone.png", "text": "Is there a red circle?", "label": "no"}\n'
    (tmp_path / "random.jsonl").write_text(good + '{"question_id": 2, "image"\n')
    with pytest.raises(SystemExit, match="random.jsonl:2: bad JSON line"):
        ev.main(["--model", str(tmp_path / "m"), "--questions", str(tmp_path), "--out", str(tmp_path / "o")])
    (tmp_path / "random.jsonl").write_text(good)  # checked before any model is loaded
    with pytest.raises(SystemExit, match=r"random.jsonl:1: image not found: .*gone.png"):
        ev.main(["--model", str(tmp_path / "m"), "--questions", str(tmp_path), "--out", str(tmp_path / "o")])


def test_add_noise_deterministic_and_sigma0_identity():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(ev.add_noise(img, 0, 0, "a.png")), np.asarray(img))
    a, b = ev.add_noise(img, 0.3, 0, "a.png"), ev.add_noise(img, 0.3, 0, "a.png")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(ev.add_noise(img, 0.3, 0, "b.png")))
    assert not np.array_equal(np.asarray(a), np.asarray(img))


def test_chair_counts():
    vocab = {"red circle", "blue square", "green triangle"}
    objects = {"a": {"red circle"}, "b": {"blue square", "green triangle"}}
    descriptions = [("a", "there is a red circle , a blue square . a red circle"), ("b", "a blue squares ?")]
    c = ev.chair(descriptions, objects, vocab)  # "squares" is not the whole word "square"
    assert (c["mentions"], c["hallucinated"], c["n"]) == (2, 1, 2)
    assert (c["chair_i"], c["chair_s"], c["recall"]) == (0.5, 0.5, pytest.approx(1 / 3))


@pytest.fixture(scope="module")
def toy_pope(tmp_path_factory):
    """4 images of coloured shapes, 2 splits x 8 questions (ids repeat across splits, as in POPE), 4 description
    prompts, truth.jsonl and world.json one folder up from the describe file."""
    root = tmp_path_factory.mktemp("toy")
    (root / "pope" / "images").mkdir(parents=True)
    truth = []
    for i in range(4):
        img = Image.new("RGB", (64, 64), (255, 255, 255))
        colour = list(COLOURS)[i % 3]
        ImageDraw.Draw(img).ellipse([8, 8, 40, 40], fill=COLOURS[colour])
        img.save(root / "pope" / "images" / f"{i}.png")
        truth.append({"id": f"test_{i}", "image": f"pope/images/{i}.png", "split": "test",
                      "objects": [{"class": f"{colour} circle", "box": [8, 8, 40, 40]}]})
    (root / "truth.jsonl").write_text("".join(json.dumps(t) + "\n" for t in truth))
    classes = [f"{c} {s}" for c in COLOURS for s in ("circle", "square")]
    (root / "world.json").write_text(json.dumps({"classes": classes}))
    for split in ("random", "popular"):
        rows = [{"question_id": q, "image": f"images/{q % 4}.png", "label": ["yes", "no"][q % 2],
                 "text": f"is there a {list(COLOURS)[(q + (split == 'popular')) % 3]} circle in the image ?"}
                for q in range(1, 9)]
        (root / "pope" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    describe = root / "describe" / "describe.jsonl"
    describe.parent.mkdir()
    describe.write_text("".join(json.dumps({"question_id": i, "image": f"../pope/images/{i}.png",
                                            "text": "describe the image ."}) + "\n" for i in range(4)))
    shutil.copy(describe, root / "pope")  # as in the toy world's val/: not a split
    return root


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_llava", "tiny_qwen"])
def test_end_to_end_rescore_and_resume(model, toy_pope, tmp_path, request):
    model_dir = request.getfixturevalue(model)
    out = tmp_path / "eval"
    args = ["--model", model_dir, "--questions", toy_pope / "pope", "--out", out, "--noise-sigma", "0", "0.3",
            "--describe", toy_pope / "describe" / "describe.jsonl", "--max-new-tokens", "6",
            "--describe-max-new-tokens", "12", "--batch-size", "4"]
    proc = run_script("05_eval_pope.py", *args)
    metrics = json.loads((out / "metrics.json").read_text())
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 2 * 2 * 8 and {(a["split"], a["sigma"]) for a in answers} == \
        {("random", 0.0), ("random", 0.3), ("popular", 0.0), ("popular", 0.3)}
    assert all(a["answer"] == ev.parse_yes_no(a["text"]) for a in answers)
    assert all(a["prompt"].endswith(ev.SUFFIX) for a in answers)
    assert metrics["sigmas"] == [0.0, 0.3] and set(metrics["pope"]) == set(metrics["mean"]) == {"0", "0.3"}
    assert all(metrics["pope"][s][split]["n"] == 8 for s in ("0", "0.3") for split in ("random", "popular"))
    assert set(metrics["mean"]["0"]) >= {"accuracy", "f1", "yes_ratio"} and metrics["mean"]["0.3"]["n"] == 16
    assert set(metrics["chair"]) == {"0", "0.3"} and metrics["chair"]["0"]["n"] == 4
    assert len((out / "describe.jsonl").read_text().splitlines()) == 2 * 4
    assert json.loads((out / "args.json").read_text())["model"] == str(model_dir.resolve())
    assert "mean" in proc.stdout and "CHAIR_i" in proc.stdout

    # re-scoring the answers file without a model reproduces the run's POPE metrics
    rescored = ev.main(["--questions", str(toy_pope / "pope"), "--answers", str(out / "answers.jsonl"),
                        "--out", str(tmp_path / "rescored")])
    assert rescored["model"] is None and rescored["pope"] == metrics["pope"] and rescored["mean"] == metrics["mean"]

    # a crash after two batches, mid-line: the rerun drops the partial line, answers the rest, same metrics
    lines = (out / "answers.jsonl").read_text().splitlines(keepends=True)
    (out / "answers.jsonl").write_text("".join(lines[:8]) + lines[8][:20])
    (out / "metrics.json").unlink()
    run_script("05_eval_pope.py", *args)
    resumed = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(resumed) == 32 and resumed[:8] == answers[:8]
    assert json.loads((out / "metrics.json").read_text()) == metrics

    # resuming with another model (or settings that change the answers) is refused before anything is loaded
    other = request.getfixturevalue("tiny_qwen" if model == "tiny_llava" else "tiny_llava")
    with pytest.raises(SystemExit, match="holds answers made with model="):
        ev.main(list(map(str, [args[0], other, *args[2:]])))
    with pytest.raises(SystemExit, match="holds answers made with max_new_tokens=6, not 7"):
        ev.main(list(map(str, args + ["--max-new-tokens", "7"])))


def test_read_truth_finds_truth_one_folder_up_and_uses_world_classes(toy_pope):
    objects, vocabulary = ev.read_truth(toy_pope / "describe" / "describe.jsonl")
    assert vocabulary == {"red circle", "red square", "green circle", "green square", "blue circle", "blue square"}
    assert objects[(toy_pope / "pope" / "images" / "1.png").resolve()] == {"green circle"}


def test_pope_prompt_is_llava_15s_newline_join(toy_pope):
    """LLaVA-1.5's own POPE file (llava_pope_test.jsonl, first line) joins question and suffix with a newline."""
    llava_line = "Is there a snowboard in the image?\nAnswer the question using a single word or phrase."
    assert "Is there a snowboard in the image?" + ev.SUFFIX == llava_line
    args = ev.parse_args(["--questions", str(toy_pope / "pope")])
    jobs = ev.pope_jobs(args, ev.read_questions(args.questions))
    assert jobs[0]["prompt"] == "is there a blue circle in the image ?\nAnswer the question using a single word or phrase."
    args = ev.parse_args(["--questions", str(toy_pope / "pope"), "--no-suffix"])
    assert ev.pope_jobs(args, ev.read_questions(args.questions))[0]["prompt"] == "is there a blue circle in the image ?"


def test_resume_refuses_answers_asked_with_another_prompt(toy_pope, tmp_path, tiny_llava):
    """An --out written before the newline join (space-joined prompts) is not silently mixed with new answers."""
    out = tmp_path / "eval"
    out.mkdir()
    ev.write_args(ev.args_path(out, folder=True), {"stage": "05_eval_pope.py"})  # what that run recorded
    old = {"question_id": 1, "split": "popular", "sigma": 0.0, "text": "yes", "answer": "yes",
           "prompt": "is there a blue circle in the image ? Answer the question using a single word or phrase."}
    (out / "answers.jsonl").write_text(json.dumps(old) + "\n")
    with pytest.raises(SystemExit, match=r"question_id 1 was asked 'is there a blue circle in the image \? Answer"):
        ev.main(["--model", str(tiny_llava), "--questions", str(toy_pope / "pope"), "--out", str(out)])


# ---- flags checked together, every input field on its own line (each test failed before its fix) ----
@pytest.mark.parametrize("argv, why", [
    (["--answers", "a.jsonl", "--model", "m"], "--answers re-scores a file without a model: --model would do nothing"),
    (["--answers", "a.jsonl", "--describe", "d.jsonl", "--noise-sigma", "0.2"], "--noise-sigma, --describe would do"),
    (["--truth", "truth.jsonl"], "--truth and --describe-max-new-tokens only matter with --describe"),
    (["--noise-sigma", "0", "1.5"], "argument --noise-sigma: 1.5 is not a finite number in \\[0.0, 1.0\\]")])
def test_flags_that_contradict_are_refused_naming_them(argv, why, capsys):
    """Before, --answers ignored the model flags in silence and --noise-sigma took any value >= 0."""
    with pytest.raises(SystemExit):
        ev.parse_args(argv)
    assert re.search(why, capsys.readouterr().err)


def test_debug_and_max_image_pixels_exist_and_the_limit_applies(tiny_llava, tmp_path):
    """05's error texts name --debug and --max-image-pixels: before, 05 refused both as unknown arguments."""
    args = ev.parse_args(["--debug", "--max-image-pixels", "0"])
    assert args.debug and args.max_image_pixels == 0
    (tmp_path / "random.jsonl").write_text(json.dumps({"question_id": 1, "image": "a.png", "label": "no",
                                                       "text": "is there a red circle ?"}) + "\n")
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")  # 1200 pixels
    with pytest.raises(SystemExit, match=r"random.jsonl:1: unreadable image .*a\.png: .*\b1000\b"):
        ev.main(["--model", str(tiny_llava), "--questions", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--max-image-pixels", "1000", "--max-new-tokens", "1"])
    ev.main(["--model", str(tiny_llava), "--questions", str(tmp_path), "--out", str(tmp_path / "o"),
             "--max-new-tokens", "1"])  # PIL's limit is global: back to its default
    assert Image.MAX_IMAGE_PIXELS == 89_478_485


QUESTION = {"question_id": 2, "image": "a.png", "text": "is there a red circle ?", "label": "no"}


@pytest.mark.parametrize("field, value, why", [
    ("question_id", True, "question_id must be text or an integer"), ("question_id", 2.0, "question_id must be"),
    ("question_id", [2], "question_id must be"), ("image", 5, "image must be non-empty text"),
    ("image", None, "image must be"), ("text", 7, "text must be non-empty text"), ("text", " ", "text must be"),
    ("label", True, "label must be 'yes' or 'no'"), ("label", None, "missing field 'label'")])
def test_each_question_field_is_checked_on_its_line(tmp_path, field, value, why):
    """A bool or float id was taken as another id; an image or text of the wrong type ended in a TypeError."""
    line = {**QUESTION, field: value} if value is not None or field != "label" else \
        {k: v for k, v in QUESTION.items() if k != "label"}
    (tmp_path / "random.jsonl").write_text(json.dumps({**QUESTION, "question_id": 1}) + "\n" + json.dumps(line) + "\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=f"random.jsonl:2: {why}"):
        ev.read_questions(tmp_path)
    with pytest.raises(SystemExit, match=f"random.jsonl:2: {why}"):  # one sentence, never a traceback
        ev.main(["--model", str(tmp_path / "m"), "--questions", str(tmp_path), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("field, value, why", [
    ("text", 1, "text must be text"), ("text", None, "text must be text"), ("sigma", "0.2", "sigma must be a number"),
    ("sigma", True, "sigma must be a number"), ("sigma", float("nan"), "sigma must be a number in"),
    ("split", ["random"], "split must be non-empty text"), ("question_id", False, "question_id must be"),
    ("prompt", 3, "prompt must be text")])
def test_each_answer_field_is_checked_on_its_line(tmp_path, field, value, why):
    """Before: a number as text ended in an AttributeError, a list as split in a TypeError, "0.2" as sigma in a
    ValueError naming no file; a bool id answered question 0 or 1."""
    (tmp_path / "random.jsonl").write_text(json.dumps(QUESTION) + "\n")
    good = {"question_id": 2, "split": "random", "sigma": 0.0, "text": "No"}
    (tmp_path / "answers.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, field: value}) + "\n")
    with pytest.raises(SystemExit, match=f"answers.jsonl:2: {why}"):
        ev.main(["--questions", str(tmp_path / "random.jsonl"), "--answers", str(tmp_path / "answers.jsonl"),
                 "--out", str(tmp_path / "o")])


def test_truth_world_and_describe_lines_are_checked(toy_pope, tmp_path):
    """A truth line whose objects are not a list of {"class"} ended in an AttributeError, a broken world.json in a
    JSON error naming no file; a description id that repeats was described twice and counted twice."""
    (tmp_path / "describe.jsonl").write_text("")
    (tmp_path / "truth.jsonl").write_text(json.dumps({"image": "a.png", "objects": ["red circle"]}) + "\n")
    with pytest.raises(ValueError, match=r"truth.jsonl:1: objects must be a list of \{\"class\": text\}"):
        ev.read_truth(tmp_path / "describe.jsonl")
    (tmp_path / "truth.jsonl").write_text(json.dumps({"image": "a.png", "objects": [{"class": "red circle"}]}) + "\n")
    (tmp_path / "world.json").write_text("{broken")
    with pytest.raises(ValueError, match="world.json: expected a JSON object whose 'classes' lists class names"):
        ev.read_truth(tmp_path / "describe.jsonl")
    describe = toy_pope / "describe" / "describe.jsonl"
    twice = tmp_path / "describe_twice.jsonl"
    twice.write_text(describe.read_text() + describe.read_text().splitlines(keepends=True)[0])
    with pytest.raises(ValueError, match="describe_twice.jsonl:5: question_id 0 repeats line 1"):
        ev.read_rows(twice, ev.DESCRIBE)


def test_a_damaged_answer_in_the_out_or_another_programs_out_is_one_sentence(toy_pope, tiny_llava, tmp_path):
    """A row of answers.jsonl without its sigma ended in a KeyError; an --out holding another program's args.json
    (04's model folder, 05_eval_benchmarks.py's run) was written over."""
    out = tmp_path / "eval"
    out.mkdir()
    args = ["--model", str(tiny_llava), "--questions", str(toy_pope / "pope"), "--out", str(out)]
    ev.write_args(ev.args_path(out, folder=True), {})  # a run of 05 that recorded its settings
    (out / "answers.jsonl").write_text(json.dumps({"question_id": 1, "split": "random", "text": "yes"}) + "\n")
    with pytest.raises(SystemExit, match="answers.jsonl:1: missing field 'sigma'"):
        ev.main(args)
    (out / "answers.jsonl").unlink()
    for old, writer in (({"model": "m", "lr": 1e-5, "data": "train.jsonl"}, "an older version or another program"),
                        ({"stage": "05_eval_benchmarks.py"}, "05_eval_benchmarks.py"),
                        ({"stage": "04_train_calibrated_dpo.py"}, "04_train_calibrated_dpo.py")):
        (out / "args.json").write_text(json.dumps(old))
        with pytest.raises(SystemExit, match=f"was written by {writer}.*, not 05_eval_pope.py"):
            ev.main(args)
        assert json.loads((out / "args.json").read_text()) == old

"""What training changed in a model's answers, analysis/after_training.py, on hand-written inputs whose right
numbers are counted by hand below: the perception diagnostic's open answers per kind (accuracy by its
answer_correct rule, answer words), the words of clean descriptions and the wrong ones among them, and Delta pi(y_w)
under the reference and the trained model over the focus lines train.jsonl trains."""
import json
import re

import pytest

from conftest import load_script

after = load_script("analysis/after_training.py")

COLOURS = ("red", "green", "blue", "yellow", "purple")
SHAPES = ("circle", "square", "triangle", "cross")
# a.png: a red square and a blue circle; b.png: a green triangle; c.png: a yellow cross
WORLD = {"a": [{"class": "red square", "box": [10, 10, 30, 30]}, {"class": "blue circle", "box": [40, 40, 60, 60]}],
         "b": [{"class": "green triangle", "box": [0, 0, 20, 20]}],
         "c": [{"class": "yellow cross", "box": [5, 5, 25, 25]}]}
# the diagnostic's held-out questions: (kind, true word)
QUESTIONS = {"q_a": ("colour", "red"), "q_b": ("shape", "triangle"), "q_c": ("colour", "yellow"),
             "q_d": ("shape", "square")}
# each model's answers; the comments give each answer's rightness as answer_correct rules it
ANSWERS = {"base": {"q_a": "red square",  # right
                    "q_b": "green square",  # wrong shape
                    "q_c": "yellow red cross",  # names yellow and another colour: wrong
                    "q_d": "red square"},  # right
           "p2dpo": {"q_a": "red square",  # right
                     "q_b": "triangle",  # right
                     "q_c": "Yellow.",  # right (case and punctuation dropped)
                     # q_d unanswered: not counted
                     "q_z": "blue circle"}}  # no such question: not counted
# each model's 05 descriptions: (image, sigma, text)
DESCRIBE = {"base": [("a", 0.0, "there is a red square and a green circle and a green cross ."),
                     ("b", 0.0, "there is a green triangle ."),
                     ("c", 0.0, "there is a yellow cross , a yellow square ."),
                     ("a", 0.2, "there is a purple cross .")],  # noisy: ignored
            "p2dpo": [("a", 0.0, "there is a red square and a blue circle."),
                      ("b", 0.2, "there is a red square ."),  # noisy: ignored
                      ("b", 0.0, "There is a Green triangle .")]}


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_models(tmp_path):
    """tmp_path/world/truth.jsonl, tmp_path/perception/ (questions_truth.jsonl, <name>/crops.jsonl) and
    tmp_path/eval_<name>/describe.jsonl -> the arguments that name them (the images need not exist)."""
    write_jsonl(tmp_path / "world" / "truth.jsonl", [{"id": n, "image": f"images/{n}.png", "split": "test",
                                                      "objects": objects} for n, objects in WORLD.items()])
    write_jsonl(tmp_path / "perception" / "questions_truth.jsonl",
                [{"id": i, "kind": kind, "class": "", "box": [0, 0, 1, 1], "answer": word}
                 for i, (kind, word) in QUESTIONS.items()])
    argv = ["--world", str(tmp_path / "world"), "--perception", str(tmp_path / "perception")]
    for name, answers in ANSWERS.items():
        write_jsonl(tmp_path / "perception" / name / "crops.jsonl",
                    [{"id": i, "answer": a} for i, a in answers.items()])
        write_jsonl(tmp_path / f"eval_{name}" / "describe.jsonl",
                    [{"question_id": k, "sigma": sigma, "image": f"images/{image}.png",
                      "prompt": "describe the image .", "text": text}
                     for k, (image, sigma, text) in enumerate(DESCRIBE[name])])
        argv += ["--model", f"{name}={tmp_path / f'eval_{name}'}"]
    return argv


def run_after_training(tmp_path, argv):
    """after_training.main(argv + --out) -> its JSON."""
    out = tmp_path / "after.json"
    after.main(argv + ["--out", str(out)])
    return json.loads(out.read_text())


def word_counts(**counts):
    """Every colour and shape word, 0 unless given."""
    return {w: counts.get(w, 0) for w in COLOURS + SHAPES}


def test_open_answers_accuracy_and_words_per_kind(tmp_path):
    """Guards the open questions: per asked kind, the answered questions only, accuracy by the diagnostic's rule
    (the true word and no other of its kind), and each word counted once per answer."""
    rep = run_after_training(tmp_path, write_models(tmp_path))
    # base colour: q_a right, q_c wrong (two colours) -> 1 of 2; words of "red square", "yellow red cross"
    assert rep["base"]["open"]["colour"] == {"n": 2, "accuracy": 50.0,
                                             "words": word_counts(red=2, yellow=1, square=1, cross=1)}
    # base shape: q_b wrong, q_d right -> 1 of 2; words of "green square", "red square"
    assert rep["base"]["open"]["shape"] == {"n": 2, "accuracy": 50.0,
                                            "words": word_counts(green=1, red=1, square=2)}
    # p2dpo colour: q_a, q_c right; words of "red square", "Yellow."
    assert rep["p2dpo"]["open"]["colour"] == {"n": 2, "accuracy": 100.0,
                                              "words": word_counts(red=1, yellow=1, square=1)}
    # p2dpo shape: q_b only (q_d unanswered, q_z no question)
    assert rep["p2dpo"]["open"]["shape"] == {"n": 1, "accuracy": 100.0, "words": word_counts(triangle=1)}


def test_descriptions_count_each_word_once_per_text(tmp_path):
    """Guards the description words: clean (sigma 0) descriptions only, each word once per text however often
    it is said, case and trailing punctuation dropped."""
    rep = run_after_training(tmp_path, write_models(tmp_path))
    # base, a: red square green circle (green twice: once); b: green triangle; c: yellow cross square (yellow twice)
    assert rep["base"]["describe"]["n"] == 3
    assert rep["base"]["describe"]["words"] == word_counts(red=1, green=2, yellow=1, circle=1, square=2,
                                                           triangle=1, cross=2)
    # p2dpo, a: red square blue "circle."; b: "Green" triangle; its sigma-0.2 "red square" on b is not counted
    assert rep["p2dpo"]["describe"]["n"] == 2
    assert rep["p2dpo"]["describe"]["words"] == word_counts(red=1, blue=1, green=1, square=1, circle=1, triangle=1)


def test_descriptions_count_words_no_object_of_the_image_has(tmp_path):
    """Guards the wrong words: a word counts as wrong when no object of the described image has it (said minus
    true, once per text); true words, missed ones and noisy descriptions count nothing."""
    rep = run_after_training(tmp_path, write_models(tmp_path))
    # base, a (red square, blue circle): green (said twice) and cross are wrong, blue is missed, not wrong;
    # b: none; c (yellow cross): square; the sigma-0.2 "purple cross" on a is not counted
    assert rep["base"]["describe"]["wrong"] == word_counts(green=1, cross=1, square=1)
    # p2dpo: a and b described rightly; its sigma-0.2 "red square" on b (green triangle) is not counted
    assert rep["p2dpo"]["describe"]["wrong"] == word_counts()


def test_descriptions_without_perception(tmp_path):
    """Guards --model alone: the descriptions are counted, no open answers are reported."""
    argv = write_models(tmp_path)
    rep = run_after_training(tmp_path, [a for a in argv if "perception" not in a])
    assert "open" not in rep["base"]
    assert rep["base"]["describe"]["wrong"] == word_counts(green=1, cross=1, square=1)


def test_counts_are_integers_in_the_json(tmp_path):
    """Guards the JSON's types: word counts and n are numbers, not true/false."""
    rep = run_after_training(tmp_path, write_models(tmp_path))
    values = [v for name in ANSWERS for kind in ("colour", "shape") for v in rep[name]["open"][kind]["words"].values()]
    values += [v for name in ANSWERS for part in ("words", "wrong") for v in rep[name]["describe"][part].values()]
    assert values and all(type(v) is int for v in values), values


def line(i, aug, deg, keep_focus=True):
    """A train.jsonl / scored line: a focus pair, its keep flags, 03's "ref" log-probs of y_w."""
    return {"id": i, "focus": {"chosen": "red square", "rejected": "red circle"},
            "keep": {"focus": keep_focus, "robust": True}, "ref": {"calib_aug_w": aug, "calib_deg_w": deg}}


def write_train_scored(tmp_path):
    """train.jsonl (reference) and scored.jsonl (trained) -> the arguments that name them."""
    train = [line("t1", -2.0, -3.0),  # Delta pi 1.0
             line("t2", -1.0, -1.5),  # 0.5
             line("t3", 0.0, -4.0, keep_focus=False),  # 4.0, not trained on its focus pair: not counted
             line("t4", -1.0, -3.0),  # 2.0, not in the scored file: not counted
             line("t7", -1.0, -2.5),  # 1.5
             {"id": "t5", "focus": None, "keep": {"focus": False, "robust": True},  # a robust-only line
              "ref": {"calib_aug_w": None, "calib_deg_w": None}}]
    scored = [line("t1", -1.0, -4.0),  # 3.0: up
              line("t2", -2.0, -1.5, keep_focus=False),  # -0.5: down (the scored file's keep is not asked)
              line("t3", -5.0, 0.0),  # -5.0
              line("t6", 0.0, -10.0),  # 10.0, not in train.jsonl: not counted
              line("t7", -2.0, -2.0)]  # 0.0: down
    return ["--train", str(write_jsonl(tmp_path / "train.jsonl", train)),
            "--scored", str(write_jsonl(tmp_path / "scored.jsonl", scored))]


def test_delta_pi_over_kept_focus_lines_in_both_files(tmp_path):
    """Guards Delta pi(y_w) = calib_aug_w - calib_deg_w: over the lines train.jsonl keeps for focus and the scored
    file holds too, reference from train.jsonl, trained from the scored file, "down" where trained < reference."""
    rep = run_after_training(tmp_path, write_train_scored(tmp_path))
    # t1, t2, t7: reference (1.0 + 0.5 + 1.5) / 3, trained (3.0 - 0.5 + 0.0) / 3; down on t2 and t7, up on t1
    assert rep == {"delta_pi": {"n": 3, "reference_mean": pytest.approx(1.0), "trained_mean": pytest.approx(2.5 / 3),
                                "down": 2}}


def test_delta_pi_with_no_common_focus_line_stops(tmp_path):
    """Guards the empty case: no kept focus line in both files stops with a message naming both files."""
    train = write_jsonl(tmp_path / "train.jsonl", [line("t1", -1.0, -2.0), line("t3", 0.0, -4.0, False)])
    scored = write_jsonl(tmp_path / "scored.jsonl", [line("t2", -1.0, -2.0), line("t3", 0.0, -4.0)])
    with pytest.raises(SystemExit, match=re.escape(f"no focus line is in both {train} and {scored}")):
        after.main(["--train", str(train), "--scored", str(scored)])


@pytest.mark.parametrize("flag", ["--train", "--scored"])
def test_train_and_scored_go_together(tmp_path, capsys, flag):
    """Guards the arguments: --train without --scored (or the reverse) is an argparse error naming both flags."""
    with pytest.raises(SystemExit) as stop:
        after.main([flag, str(tmp_path / "train.jsonl")])
    assert stop.value.code == 2
    assert "--train and --scored go together" in capsys.readouterr().err


def test_nothing_to_do_is_an_argument_error(capsys):
    """Guards the arguments: neither --model nor --train is an argparse error naming the flags that give work."""
    with pytest.raises(SystemExit) as stop:
        after.main(["--perception", "perception"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "nothing to do" in err and "--model" in err and "--train" in err and "--scored" in err

"""The analyses that judge pairs against the toy world's truth, on hand-written worlds whose right numbers are
counted by hand below: analysis/pairs_vs_truth.py (open-question rightness, description mentions, the words DPO
pushes, DDW's r by crop), and the truth and its rephrasing of analysis/ips_on_vs_off_policy.py as
analysis/offpolicy_pairs.py uses them (an open question's trained reply is the object's name, "red square")."""
import json
import re

import pytest

from conftest import load_script

truth_vs = load_script("analysis/pairs_vs_truth.py")
ips = load_script("analysis/ips_on_vs_off_policy.py")
offpolicy = load_script("analysis/offpolicy_pairs.py")
toy = load_script("00_toy_world.py")

SHAPE_Q = "what shape is the red object ?"
COLOUR_Q = "what colour is the square ?"
DESCRIBE = "describe the image ."
# a.png: a red square (centre 20, 20) left of a blue circle; b.png: a green triangle (centre 10, 10);
# c.png: two red objects, so "what shape is the red object ?" has no unique answer there
A = [{"class": "red square", "box": [10, 10, 30, 30]}, {"class": "blue circle", "box": [40, 40, 60, 60]}]
B = [{"class": "green triangle", "box": [0, 0, 20, 20]}]
C = [{"class": "red circle", "box": [0, 0, 10, 10]}, {"class": "red square", "box": [50, 50, 60, 60]}]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_world(tmp_path):
    """tmp_path/world/truth.jsonl (the images need not exist: only their paths are resolved)."""
    rows = [{"id": n, "image": f"images/{n}.png", "split": "val", "objects": objects}
            for n, objects in (("a", A), ("b", B), ("c", C))]
    write_jsonl(tmp_path / "world" / "truth.jsonl", rows)
    return tmp_path / "world"


def pair(chosen, rejected):
    return {"chosen": chosen, "rejected": rejected}


# id: (image, prompt, focus pair, robust pair); the comments give each answer's rightness as the rule counts it
PAIRS = {
    "p1": ("a", SHAPE_Q, pair("red square", "red circle"),  # focus: y_w right, y_l wrong
           pair("square", "square")),  # robust: both right
    "p2": ("a", COLOUR_Q, pair("blue square", "red square"), None),  # y_w wrong, y_l right
    "p3": ("b", "what colour is the triangle ?", pair("green triangle", "yellow triangle"),  # y_w right only
           pair("no", "no")),  # both wrong
    "p4": ("a", DESCRIBE,
           # focus: y_w names both objects; y_l one true, one hallucinated (green cross)
           pair("there is a red square and a blue circle .", "there is a red square and a green cross ."),
           # robust: a bare "no" chosen; y_l says blue circle twice (one true mention) and a purple cross
           pair("no", "there is a blue circle , a blue circle and a purple cross .")),
    "p5": ("c", SHAPE_Q, pair("red circle", "red square"), None),  # no unique red object: not an open question
    "p6": ("b", "what shape is the green object ?", pair("triangle", "square"), None),  # y_w right only
}
# id: (keep, 01's bbox, r); p5 was dropped by 03. p1's crop holds the red square's centre (20, 20), p2's ends at
# x = y = 20 (exclusive), so it misses it; p3's r is None (CLIPScore(P, I) = 0); p4 is no open question
TRAIN = {
    "p1": ({"focus": True, "robust": False}, [0, 0, 32, 32], 1.5),
    "p2": ({"focus": True, "robust": False}, [0, 0, 20, 20], 0.75),
    "p3": ({"focus": False, "robust": True}, [0, 0, 20, 20], None),
    "p4": ({"focus": True, "robust": True}, [0, 0, 64, 64], 2.0),
    "p6": ({"focus": True, "robust": False}, [0, 0, 40, 40], 1.25),
}


def pairs_row(i):
    image, prompt, focus, robust = PAIRS[i]
    return {"id": i, "image": f"../world/images/{image}.png", "prompt": prompt, "focus": focus, "robust": robust}


def run_pairs_vs_truth(tmp_path, train=TRAIN):
    """pairs_vs_truth.main on PAIRS and `train` -> its JSON."""
    world = write_world(tmp_path)
    pairs = write_jsonl(tmp_path / "runs" / "pairs.jsonl", [pairs_row(i) for i in PAIRS])
    train_rows = [{**pairs_row(i), "keep": keep, "bbox": bbox, "clip": {"crop": 1.0, "image": 1.0, "ratio": r}}
                  for i, (keep, bbox, r) in train.items()]
    train_path = write_jsonl(tmp_path / "runs" / "train.jsonl", train_rows)
    out = tmp_path / "report.json"
    truth_vs.main(["--pairs", str(pairs), "--train", str(train_path), "--world", str(world), "--out", str(out)])
    return json.loads(out.read_text())


def counts(kind, n, w, l, w_only, l_only):
    return {f"{kind}_n": n, f"{kind}_w": w, f"{kind}_l": l, f"{kind}_w_only": w_only, f"{kind}_l_only": l_only}


def test_open_questions_count_right_answers_per_kind(tmp_path):
    """Guards the open-question rule: the queried object (unique, or no question), y_w / y_l right, only one right,
    per kind and over both."""
    rep = run_pairs_vs_truth(tmp_path)
    # focus, every pair: shape p1 (w), p6 (w); colour p2 (l), p3 (w); p5 has no unique answer
    assert rep["focus"]["all"]["open"] == {**counts("shape", 2, 2, 0, 2, 0), **counts("colour", 2, 1, 1, 1, 1),
                                           **counts("open", 4, 3, 1, 3, 1)}
    # robust, every pair: shape p1 (both right), colour p3 (both wrong)
    assert rep["robust"]["all"]["open"] == {**counts("shape", 1, 1, 1, 0, 0), **counts("colour", 1, 0, 0, 0, 0),
                                            **counts("open", 2, 1, 1, 0, 0)}


def test_descriptions_count_true_and_hallucinated_mentions(tmp_path):
    """Guards the CHAIR-rule mentions (whole class names, once each) and a chosen reply that is no description."""
    rep = run_pairs_vs_truth(tmp_path)
    assert rep["focus"]["all"]["describe"] == {"n": 1, "halluc_w": 0, "true_w": 2, "halluc_l": 1, "true_l": 1,
                                               "fewer_halluc_w": 1, "fewer_halluc_l": 0, "w_not_description": 0}
    assert rep["robust"]["all"]["describe"] == {"n": 1, "halluc_w": 0, "true_w": 0, "halluc_l": 1, "true_l": 1,
                                                "fewer_halluc_w": 1, "fewer_halluc_l": 0, "w_not_description": 1}


def test_words_are_chosen_minus_rejected_over_kept_pairs(tmp_path):
    """Guards the words DPO pushes: chosen counts minus rejected counts, over the kept pairs of each branch only."""
    rep = run_pairs_vs_truth(tmp_path)
    # focus kept p1, p2, p4, p6: p1 square +1 circle -1; p2 blue +1 red -1; p4 blue +1 circle +1 green -1 cross -1;
    # p6 triangle +1 square -1
    assert rep["focus"]["kept"]["words"] == {"red": -1, "green": -1, "blue": 2, "yellow": 0, "purple": 0,
                                             "circle": 0, "square": 0, "triangle": 1, "cross": -1}
    # robust kept p3 ("no" vs "no"), p4 ("no" vs two blue circles and a purple cross)
    assert rep["robust"]["kept"]["words"] == {"red": 0, "green": 0, "blue": -2, "yellow": 0, "purple": -1,
                                              "circle": -2, "square": 0, "triangle": 0, "cross": -1}


def test_ddw_r_is_split_by_whether_the_crop_holds_the_queried_object(tmp_path):
    """Guards DDW's r medians: open questions only, split by the bbox holding the object's box centre (x2, y2
    exclusive), a None r skipped."""
    rep = run_pairs_vs_truth(tmp_path)
    # holds: p1 1.5, p6 1.25 (p3's r is None); misses: p2 0.75 (its crop stops at the centre); p4 is a description
    assert rep["ddw_r"] == {"holds": {"n": 2, "median": 1.375}, "misses": {"n": 1, "median": 0.75}}


def test_kept_report_counts_only_the_kept_pairs(tmp_path):
    """Guards the kept report: a pair whose keep flag is off (p3's focus) is counted in "all" and not in "kept"."""
    rep = run_pairs_vs_truth(tmp_path)
    # focus kept p1, p2, p4, p6: p3's right-only colour answer is gone
    assert rep["focus"]["kept"]["open"] == {**counts("shape", 2, 2, 0, 2, 0), **counts("colour", 1, 0, 1, 0, 1),
                                            **counts("open", 3, 2, 1, 2, 1)}
    assert rep["focus"]["kept"]["open"] != rep["focus"]["all"]["open"]
    # with every flag on, kept = all (p5 is not in train.jsonl, so only p1 to p4 and p6 count)
    keep_all = {i: ({"focus": True, "robust": True}, bbox, r) for i, (_, bbox, r) in TRAIN.items()}
    rep = run_pairs_vs_truth(tmp_path, keep_all)
    assert rep["focus"]["kept"]["open"] == rep["focus"]["all"]["open"]


def test_counts_are_integers_in_the_json(tmp_path):
    """Guards the JSON's types: counts are numbers, not true/false (a Counter's first update keeps bools)."""
    rep = run_pairs_vs_truth(tmp_path)
    values = [v for b in ("focus", "robust") for part in ("open", "describe") for v in rep[b]["all"][part].values()]
    assert values and all(type(v) is int for v in values), values


def test_a_bad_json_line_names_its_file_and_line(tmp_path):
    """Guards read(): a line that is not JSON stops with `file:line: problem`; blank lines are skipped."""
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(pairs_row("p1")) + "\n\n" + '{"id": "p2", \n')
    with pytest.raises(SystemExit, match=rf"^{re.escape(str(path))}:3: not JSON"):
        truth_vs.read(path)


def test_an_empty_file_says_no_rows(tmp_path):
    """Guards read(): an empty file stops with `file: no rows`."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("")
    with pytest.raises(SystemExit, match=rf"^{re.escape(str(path))}: no rows$"):
        truth_vs.read(path)


# ---- analysis/ips_on_vs_off_policy.py and analysis/offpolicy_pairs.py ----
def test_truth_answer_is_the_objects_name():
    """Guards truth_answer: an open question's right answer is the object's name, as the toy model was trained."""
    assert ips.truth_answer(SHAPE_Q, A, toy.describe) == "red square"
    assert ips.truth_answer(COLOUR_Q, A, toy.describe) == "red square"
    assert ips.truth_answer("what colour is the circle ?", A, toy.describe) == "blue circle"
    assert ips.truth_answer(DESCRIBE, A, toy.describe) == "there is a red square and a blue circle ."


def test_truth_answer_is_none_without_a_unique_object():
    """Guards truth_answer: two objects of the asked colour (or none) give no answer."""
    assert ips.truth_answer(SHAPE_Q, C, toy.describe) is None
    assert ips.truth_answer("what colour is the cross ?", A, toy.describe) is None


def test_rephrase_a_shape_question_names_the_shape():
    """Guards rephrase: a shape question's truth in an annotator's words names the shape, not the colour."""
    assert ips.rephrase(SHAPE_Q, "red square", A) == "the shape of the object is a square ."


def test_rephrase_a_colour_question_names_the_colour():
    """Guards rephrase: a colour question's truth in an annotator's words names the colour, not the shape."""
    assert ips.rephrase(COLOUR_Q, "red square", A) == "the colour is red ."


def test_rephrase_a_description_lists_the_objects_right_to_left():
    """Guards rephrase: a description becomes "in the image : ..." with the objects right to left."""
    assert ips.rephrase(DESCRIBE, "there is a red square and a blue circle .", A) == \
        "in the image : a blue circle and a red square ."


def test_offpolicy_pairs_correct_only_the_wrong_answers(tmp_path):
    """Guards offpolicy_pairs: an instance whose own answer is the truth ("red square") is skipped, one without a
    unique answer too; a wrong one becomes chosen = the rephrased truth, rejected = the model's answer."""
    world = write_world(tmp_path)
    rows = [{"id": i, "image": f"../world/images/{image}.png", "prompt": prompt, "prompt_enh": prompt + " look.",
             "images": {"crop": f"crops/{i}.png"}, "answer": answer}
            for i, image, prompt, answer in (("right", "a", SHAPE_Q, "red square"),
                                             ("wrong", "a", COLOUR_Q, "blue square"),
                                             ("no_truth", "c", SHAPE_Q, "red circle"))]
    pairs = write_jsonl(tmp_path / "runs" / "pairs.jsonl", rows)
    out = tmp_path / "runs" / "offpolicy_pairs.jsonl"
    offpolicy.main(["--pairs", str(pairs), "--world", str(world), "--out", str(out)])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in written] == ["wrong"]
    assert written[0]["focus"] == {"chosen": "the colour is red .", "rejected": "blue square"}
    assert written[0]["robust"] is None
    assert {k: written[0][k] for k in ("image", "prompt", "prompt_enh", "images")} == \
        {k: rows[1][k] for k in ("image", "prompt", "prompt_enh", "images")}


def test_ips_without_a_focus_pair_to_score_says_so(tmp_path, monkeypatch):
    """Guards the IPS script's empty case: no focus pair, or only ones whose rejected response is the truth, ends
    in one sentence naming the pairs file (03 would fail on an empty file, with a traceback from the subprocess)."""
    world = write_world(tmp_path)
    rows = [{"id": "none", "image": "../world/images/a.png", "prompt": SHAPE_Q, "focus": None},
            {"id": "truth", "image": "../world/images/a.png", "prompt": SHAPE_Q, "focus": pair("blue", "red square")}]
    pairs = write_jsonl(tmp_path / "runs" / "pairs.jsonl", rows)
    monkeypatch.setattr("sys.argv", ["ips", "--pairs", str(pairs), "--world", str(world), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"pairs\.jsonl: no focus pair whose rejected response differs"):
        ips.main()

"""analysis/perception_diagnostic.py: the attention mass in a box through stage 01's grid -> pixels mapping, the
ratio to uniform attention, the focus subset fixed by the base model, the answer rule, the question set."""
import json

import numpy as np
import pytest
from transformers import CLIPImageProcessor

from conftest import load_script

pdiag = load_script("analysis/perception_diagnostic.py")
stage01 = load_script("01_attention_crop.py")
# the toy world's processor: 128 px images resized to 64 and centre-cropped to 64 (nothing cut), an 8 x 8 grid of
# 8-px patches, so each cell covers 16 x 16 original px
CLIP = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, do_center_crop=True)


def test_box_attention_counts_the_cells_inside_the_box():
    attn = np.zeros((8, 8))
    attn[1, 3] = 0.5  # row 1 (y 16-31 px), column 3 (x 48-63 px)
    attn[5, 0] = 0.5  # row 5 (y 80-95), column 0 (x 0-15)
    # a box wider than tall: x 40-63, y 16-31 holds the whole (1, 3) cell; read as (y, x) it would hold nothing
    mass, ratio = pdiag.box_attention(attn, (128, 128), [40, 16, 64, 32], CLIP, False, stage01)
    assert mass == pytest.approx(0.5) and ratio == pytest.approx(0.5 / (24 * 16 / 128 ** 2))
    # half of the (5, 0) cell's columns (x 0-7), all its rows: a quarter of the map
    mass, ratio = pdiag.box_attention(attn, (128, 128), [0, 80, 8, 96], CLIP, False, stage01)
    assert mass == pytest.approx(0.25) and ratio == pytest.approx(0.25 / (8 * 16 / 128 ** 2))
    # uniform attention: the ratio is 1 for any box
    mass, ratio = pdiag.box_attention(np.full((8, 8), 1 / 64), (128, 128), [5, 17, 40, 99], CLIP, False, stage01)
    assert mass == pytest.approx(35 * 82 / 128 ** 2) and ratio == pytest.approx(1.0)


def test_focus_subset_is_fixed_by_the_base_model():
    # question: (mass, ratio, correct); base looks at q1 and q3 (q3 exactly uniform: in), the other model at q2
    scores = {"base": {"q1": (0.2, 2.0, True), "q2": (0.05, 0.5, False), "q3": (0.1, 1.0, False)},
              "other": {"q1": (0.02, 0.2, False), "q2": (0.5, 5.0, True), "q3": (0.09, 0.9, False)}}
    m = pdiag.perception_metrics(scores, "base")
    assert m["base"]["n_focus"] == m["other"]["n_focus"] == 2
    assert m["base"]["p_acc"] == pytest.approx(50.0)  # q1 right, q3 wrong
    assert m["other"]["p_acc"] == pytest.approx(0.0)  # on q1, q3 (base's), not on q2 (its own focus)
    assert m["base"]["accuracy"] == pytest.approx(100 / 3) and m["other"]["accuracy"] == pytest.approx(100 / 3)
    assert m["base"]["afr"] == pytest.approx(100 * 0.35 / 3) and m["other"]["afr"] == pytest.approx(100 * 0.61 / 3)
    assert m["other"]["attention_ratio"] == pytest.approx(6.1 / 3)
    assert pdiag.perception_metrics(scores, "base", focus_ratio=1.5)["base"]["n_focus"] == 1
    # top half: base's ratios 2.0, 0.5, 1.0 have median 1.0, so q1 and q3 again (base's, not other's q2)
    assert m["base"]["median_ratio"] == pytest.approx(1.0) and m["other"]["n_top"] == 2
    assert m["base"]["p_acc_top"] == pytest.approx(50.0) and m["other"]["p_acc_top"] == pytest.approx(0.0)
    four = {name: {**s, "q4": (0.3, 3.0, name == "other")} for name, s in scores.items()}
    m4 = pdiag.perception_metrics(four, "base")  # base: 0.5, 1.0, 2.0, 3.0 -> median 1.5: q1, q4
    assert m4["base"]["n_top"] == 2 and m4["other"]["p_acc_top"] == pytest.approx(50.0)
    assert m4["base"]["p_acc_top"] == pytest.approx(50.0) and m4["base"]["n_focus"] == 3


def test_answer_rule_takes_the_first_word():
    assert pdiag.answer_correct("Red.", "red") and pdiag.answer_correct("red circle", "red")
    assert pdiag.answer_correct(" RED! ", "red")
    assert not pdiag.answer_correct("circle red", "red") and not pdiag.answer_correct("", "red")
    assert not pdiag.answer_correct("reddish", "red")


def test_questions_ask_only_about_unique_keys():
    prompts = {"colour": "what colour is the {shape} ?", "shape": "what shape is the {colour} object ?"}
    objects = [{"class": "red circle", "box": [0, 0, 10, 10]}, {"class": "blue circle", "box": [20, 0, 30, 10]},
               {"class": "red square", "box": [40, 0, 50, 10]}]
    got = {(k, p, a, o["class"]) for k, p, a, o in pdiag.question_candidates(objects, prompts)}
    # circle twice, red twice: only the square's colour and the blue object's shape are unique
    assert got == {("colour", "what colour is the square ?", "red", "red square"),
                   ("shape", "what shape is the blue object ?", "circle", "blue circle")}
    none = [{"class": c, "box": [0, 0, 1, 1]} for c in ("red circle", "red square", "blue circle", "blue square")]
    rows = [{"id": "a", "image": "a.png", "objects": objects}, {"id": "b", "image": "b.png", "objects": none}]
    qs = pdiag.build_questions(rows, prompts, seed=0)
    assert [q["id"] for q in qs] == ["q_a"] and qs == pdiag.build_questions(rows, prompts, seed=0)
    q = qs[0]
    assert q["box"] == next(o["box"] for o in objects if o["class"] == q["class"])
    assert q["answer"] == q["class"].split()[0 if q["kind"] == "colour" else 1]


def test_complete_crops_are_not_rerun(tmp_path, tiny_llava):
    """A model's crops.jsonl counts as done only with every question, from these questions and this model (the
    script itself runs in tests/test_pipeline.py, through pipeline.py --ablations)."""
    data = tmp_path / "questions.jsonl"
    data.write_text('{"id": "q1"}\n{"id": "q2"}\n')
    crops = tmp_path / "base" / "crops.jsonl"
    crops.parent.mkdir()
    crops.write_text('{"id": "q1"}\n{"id": "q2"}\n')
    made = {"data_identity": stage01.file_identity(data), "model_identity": stage01.model_identity(tiny_llava)}
    crops.with_suffix(".args.json").write_text(json.dumps(made))
    assert pdiag.complete(crops, data, tiny_llava, stage01)
    crops.write_text('{"id": "q1"}\n')  # a run cut short
    assert not pdiag.complete(crops, data, tiny_llava, stage01)
    crops.write_text('{"id": "q1"}\n{"id": "q2"}\n')
    data.write_text('{"id": "q1"}\n{"id": "q3"}\n')  # other questions
    assert not pdiag.complete(crops, data, tiny_llava, stage01)

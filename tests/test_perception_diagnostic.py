"""analysis/perception_diagnostic.py: the attention mass in a box through stage 01's grid -> pixels mapping, the
ratio to uniform attention, the subsets fixed by the base model's map under the true answer (the same for every
model) beside each model's own half, the answer rule, the question set."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
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


def test_subsets_are_the_same_whichever_model_is_evaluated():
    """P-Acc's subsets come from the fixed map alone: each model evaluated alone, or both in either order, gets
    the same questions and the same numbers; a model's own-map half is reported beside, apart."""
    fixed = {"q1": 2.0, "q2": 0.5, "q3": 1.0, "q4": 3.0}  # the base model under the true answers
    # question: (mass, ratio, correct, hold) under each model's OWN answer; the own-map halves differ from the fixed
    # one; hold: the model's own 01 crop holds the object
    base = {"q1": (0.03, 0.3, False, True), "q2": (0.5, 5.0, True, True), "q3": (0.02, 0.2, False, False),
            "q4": (0.4, 4.0, True, False)}
    other = {"q1": (0.01, 0.1, False, False), "q2": (0.6, 6.0, True, True), "q3": (0.4, 4.0, True, True),
             "q4": (0.02, 0.2, True, False)}
    # expectations from the fixed ratios alone: the top half is the 2 largest of 4, the focus subset ratio >= 1
    top = sorted(fixed, key=fixed.get)[2:]
    focus = [q for q in fixed if fixed[q] >= 1.0]
    assert sorted(top) == ["q1", "q4"] and sorted(focus) == ["q1", "q3", "q4"]
    runs = [pdiag.perception_metrics(s, fixed) for s in
            ({"base": base}, {"other": other}, {"base": base, "other": other}, {"other": other, "base": base})]
    for name, s in (("base", base), ("other", other)):
        got = [m[name] for m in runs if name in m]
        assert all(g == got[0] for g in got), (name, got)  # the same whichever model comes first, or alone
        m = got[0]
        assert m["n_top"] == 2 and m["n_focus"] == 3 and m["median_ratio"] == pytest.approx(1.5)
        assert m["p_acc_top"] == pytest.approx(100 * np.mean([s[q][2] for q in top]))
        assert m["p_acc"] == pytest.approx(100 * np.mean([s[q][2] for q in focus]))
        own_top = sorted(s, key=lambda q: s[q][1])[2:]  # the model's own better-focused half
        assert m["n_own_top"] == 2 and m["p_acc_own_top"] == pytest.approx(100 * np.mean([s[q][2] for q in own_top]))
        assert m["accuracy"] == pytest.approx(100 * np.mean([v[2] for v in s.values()]))
        assert m["afr"] == pytest.approx(100 * np.mean([v[0] for v in s.values()]))  # from the model's own map
        assert m["attention_ratio"] == pytest.approx(np.mean([v[1] for v in s.values()]))
    # the error split, counted by hand: base is wrong on q1 (its crop holds the object: processing) and q3 (misses
    # it: perception); other is wrong on q1 only, a perception failure
    assert [runs[0]["base"][k] for k in ("n_wrong", "processing", "processing_pct")] == [2, 1, 50.0]
    assert [runs[1]["other"][k] for k in ("n_wrong", "processing", "processing_pct")] == [1, 0, 0.0]
    # what makes the test bite: on its own half each model looks better than on the fixed one
    assert runs[0]["base"]["p_acc_own_top"] == 100.0 and runs[0]["base"]["p_acc_top"] == 50.0
    assert runs[1]["other"]["p_acc_own_top"] == 100.0 and runs[1]["other"]["p_acc_top"] == 50.0
    assert pdiag.perception_metrics({"base": base}, fixed, focus_ratio=2.5)["base"]["n_focus"] == 1


def test_fixed_map_is_the_base_models_map_under_the_true_answer(tmp_path, tiny_llava):
    """The fixed map is stage 01's map with y = the true answer, teacher-forced: the box mass equals the cells
    of 01's attention_maps on (I, P, y_true) inside the box, and another answer would give another map."""
    torch.set_num_threads(1)
    model, processor = stage01.load_model(tiny_llava, "cpu", attn_implementation="eager")
    model.requires_grad_(False)
    rng = np.random.default_rng(0)
    questions = []
    for i, (prompt, answer) in enumerate((("what colour is the square ?", "red"),
                                          ("what shape is the blue object ?", "circle"))):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        # the tiny model's processor: 32 px in, a 4 x 4 grid of 8-px cells; the box holds rows 0-1, columns 1-2
        questions.append({"id": f"q{i}", "image": f"{i}.png", "prompt": prompt, "answer": answer,
                          "box": [8, 0, 24, 16]})
    fixed = pdiag.fixed_map(model, processor, questions, tmp_path, [0], "attention", stage01)
    images = [Image.open(tmp_path / q["image"]).convert("RGB") for q in questions]
    prompts = [q["prompt"] for q in questions]
    truth, _ = stage01.attention_maps(model, processor, prompts, ["red", "circle"], images, [0], "attention")
    wrong, _ = stage01.attention_maps(model, processor, prompts, ["blue", "square"], images, [0], "attention")
    for q, t, w in zip(questions, truth, wrong):
        mass = t[0:2, 1:3].sum()
        assert fixed[q["id"]] == pytest.approx((mass, mass / (16 * 16 / 32 ** 2)), rel=1e-6)
        assert abs(w[0:2, 1:3].sum() - mass) > 1e-4  # the answer moves the map: the forced one is the true one


def test_answer_rule_names_the_true_word_of_the_asked_kind():
    colours, shapes = ["red", "blue"], ["circle", "square"]
    assert pdiag.answer_correct("Red.", "red", colours) and pdiag.answer_correct("red circle", "red", colours)
    assert pdiag.answer_correct(" RED! ", "red", colours)
    assert pdiag.answer_correct("red square", "square", shapes)  # the object's name: the shape is its 2nd word
    assert not pdiag.answer_correct("red circle", "square", shapes)  # the wrong shape
    assert not pdiag.answer_correct("red circle square", "square", shapes)  # two shapes named: not an answer
    assert not pdiag.answer_correct("blue red", "red", colours) and not pdiag.answer_correct("", "red", colours)
    assert not pdiag.answer_correct("reddish", "red", colours)
    assert not pdiag.answer_correct("circle", "red", colours)  # no colour named for a colour question


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

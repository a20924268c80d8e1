"""Stage 03: filter and IPS arithmetic on hand-made numbers, summed log-probs = one forward per response token (both
families), the robust pair judged in the context 02 decoded it in (the instruction included), a wrong input field a
line's error and contradicting flags refused before a model loads; marked slow, the stage run as a subprocess on tiny
LLaVA / Qwen2.5-VL with a tiny open_clip model, its train.jsonl driving one step of stage 04 at ln 2, re-filtering
without a model, kill -9 + resume = uninterrupted, --score-only; bad input lines listed while the others (L, RGBA, P,
I;16 images) are scored, every line failing exits non-zero."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, load_script, run_script, token_by_token_logprob

SCRIPT = "03_filter.py"
stage = load_script(SCRIPT)
ENH = "answer mainly based on the first image , refer to the cropping details of the second image if necessary : "
PROMPTS = ["describe the image .", "is there a red circle in the image ?", "what colour is the square ?"]
ANSWERS = ["there is a red circle", "there is a blue square and a green cross", "yes", "no", "blue", ""]
INSTRUCTION = "answer using a single word or phrase ."  # words of the tiny tokenizer: P' != P in tokens
WIDE = ("--max-ppl", 1e9, "--margin-low", -1e9, "--margin-high", 1e9)  # random tiny models: keep every pair


# ---- fixtures ----
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """An untrained tiny open_clip model saved the way 00's train_clip saves world/clip (local-dir format)."""
    import open_clip
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp("clip")
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                           "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {
        "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}}))
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def picture(rng, w=48, h=40, mode="RGB"):
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    return img.convert(mode) if mode != "P" else img.convert("P", palette=Image.Palette.ADAPTIVE)


def pair_row(folder, i, rng, mode="RGB", shape=None, instruction=None):
    """One pairs.jsonl line (stage 02's fields) with its images drawn under folder/img. shape: both, no_focus,
    no_robust, stitched (I_aug one image), none (both pairs null). instruction: the robust pair was decoded after
    it (stage 02's "prompt_robust"); None: an older pairs file without that field (and no "gen")."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    roles = ("image", "crop", "deg", "noise", "aug") if shape == "stitched" else ("image", "crop", "deg", "noise")
    for role in roles:
        picture(rng, 64 if role == "aug" else 48, 40, mode if role == "image" else "RGB").save(
            folder / "img" / f"{role}{i}.png")
    prompt, w, l = PROMPTS[i % 3], ANSWERS[i % 6], ANSWERS[(i + 1) % 6]
    return {"id": f"p{i}", "image": f"img/image{i}.png", "prompt": prompt, "prompt_enh": ENH + prompt,
            "images": {r: f"img/{r}{i}.png" for r in roles if r != "image"},
            "focus": None if shape in ("no_focus", "none") else {"chosen": w, "rejected": l},
            "robust": None if shape in ("no_robust", "none") else {"chosen": l, "rejected": w + " and a circle",
                                                                     "init": l},
            **({} if instruction is None else {"prompt_robust": f"{instruction} {prompt}".strip()})}


def write_pairs(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "pairs.jsonl", "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return folder / "pairs.jsonl"


def mixed_pairs(folder):
    rng = np.random.default_rng(0)
    shapes = ["both", "no_focus", "no_robust", "stitched", "none", "both"]
    return write_pairs(folder, [pair_row(folder, i, rng, shape=s) for i, s in enumerate(shapes)])


def jsonl(path):
    return [json.loads(line) for line in open(path)]


# ---- the equations, on hand-made numbers ----
def test_perplexity_margin_and_filter_by_hand():
    assert stage.perplexity(-2.0, 4) == pytest.approx(math.exp(0.5))
    assert stage.perplexity(0.0, 3) == 1.0 and stage.perplexity(-1e6, 1) == math.inf
    assert stage.mean_margin(-2.0, 4, -3.0, 5) == pytest.approx(-0.5 + 0.6)
    f = lambda w, l, m: stage.filter_reasons(w, l, m, 2.5, -0.174, 0.208)  # noqa: E731  the authors' thresholds
    assert f(1.6, 2.4, 0.1) == []
    assert f(2.5, 1.0, 0.0) == ["ppl chosen"]  # the PPL bound is strict
    assert f(1.0, 3.0, -0.174) == ["ppl rejected"] and f(1.0, 1.0, 0.208) == []  # the margin band is inclusive
    assert f(1.0, 1.0, -0.1741) == ["margin low"] and f(1.0, 1.0, 0.2081) == ["margin high"]
    assert f(9.0, 9.0, 5.0) == ["ppl chosen", "ppl rejected", "margin high"]
    assert f(math.nan, 1.0, math.nan) == ["ppl chosen", "margin low", "margin high"]


def test_ips_and_summary_by_hand():
    ips = stage.implicit_preference_strength([-1.0, -5.0, -2.0], [-2.0, -3.0, -2.0])
    np.testing.assert_allclose(ips, [1.0, -2.0, 0.0])
    s = stage.summary(ips)
    assert s["n"] == 3 and s["mean"] == pytest.approx(-1 / 3) and s["median"] == 0.0
    assert s["std"] == pytest.approx(math.sqrt(42 / 27))  # population std: ((4/3)^2 + (5/3)^2 + (1/3)^2) / 3
    assert s["negative"] == pytest.approx(1 / 3) and (s["min"], s["max"]) == (-2.0, 1.0)  # 0 is not negative
    assert stage.summary([]) == {"n": 0, "mean": None, "std": None, "min": None, "median": None, "max": None,
                                 "negative": None}


def test_clip_score_and_gain_ratio_by_hand():
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    image = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(stage.clip_score(text, image).numpy(), [2.5 / math.sqrt(2), 0.0, 0.0], atol=1e-6)
    assert stage.gain_ratio(1.0, 0.5) == 2.0 and stage.gain_ratio(0.3, 0.0) is None


def scored(id, w, nw, l, nl):
    """A scored focus-only line with summed log-probs w, l over nw, nl tokens."""
    ppl = {"focus_w": stage.perplexity(w, nw), "focus_l": stage.perplexity(l, nl), "robust_w": None, "robust_l": None}
    return {"id": id, "ref": {"focus_w": w, "focus_l": l}, "ppl": ppl, "clip": None,
            "margin": {"focus": stage.mean_margin(w, nw, l, nl), "robust": None}}


def test_filter_reads_each_response_in_its_own_context_or_the_dpo_one():
    """--filter-context own (default): PPL and M of focus y_w from (I_aug, P_enh), y_l from (I_deg, P); robust y_w
    from (I, P), y_l from (I_noise, P). dpo: both from (I, P) (focus) or (I_noise, P) (robust). Every term has its
    own log-prob here (n = 2 tokens each), so a wrong pick shows."""
    logp = {"focus_w": -0.2, "focus_l": -0.4, "calib_aug_w": -0.6, "calib_deg_w": -0.8, "calib_aug_l": -1.0,
            "calib_deg_l": -1.2, "robust_w": -1.4, "robust_l": -1.6, "robust_expert_w": -1.8, "robust_own_l": -2.0}
    assert set(logp) == set(stage.TERMS)
    line = {"id": "a", "ref": logp, "ntok": dict.fromkeys(logp, 2)}
    own = stage.with_ppl_and_margin(line, ("focus", "robust"), "own")
    assert own["ppl"]["focus_w"] == pytest.approx(math.exp(0.3))
    assert own["ppl"]["focus_l"] == pytest.approx(math.exp(0.6))
    # robust y_w under (I, P'), y_l under (I_noise, P'): P' = the instruction + P, where 02 decoded them
    assert own["ppl"]["robust_w"] == pytest.approx(math.exp(0.9))
    assert own["ppl"]["robust_l"] == pytest.approx(math.exp(1.0))
    assert own["margin"] == {"focus": pytest.approx(-0.3 + 0.6), "robust": pytest.approx(-0.9 + 1.0)}
    # a line decoded without an instruction (P' = P) has no robust_own_l: y_l's own context is robust_l's
    no_instruction = {"id": "c", "ref": {k: v for k, v in logp.items() if k != "robust_own_l"}, "ntok": line["ntok"]}
    x = stage.with_ppl_and_margin(no_instruction, ("focus", "robust"), "own")
    assert x["ppl"]["robust_l"] == pytest.approx(math.exp(0.8)) and x["margin"]["robust"] == pytest.approx(-0.9 + 0.8)
    dpo = stage.with_ppl_and_margin(line, ("focus", "robust"), "dpo")
    assert dpo["ppl"]["focus_w"] == pytest.approx(math.exp(0.1))
    assert dpo["ppl"]["focus_l"] == pytest.approx(math.exp(0.2))
    assert dpo["ppl"]["robust_w"] == pytest.approx(math.exp(0.7))
    assert dpo["ppl"]["robust_l"] == pytest.approx(math.exp(0.8))
    assert dpo["margin"] == {"focus": pytest.approx(-0.1 + 0.2), "robust": pytest.approx(-0.7 + 0.8)}
    assert (own["filter_context"], dpo["filter_context"]) == ("own", "dpo")
    no_robust = {"id": "b", "ref": {**logp, "robust_w": None, "robust_l": None, "robust_expert_w": None,
                                    "robust_own_l": None}, "ntok": line["ntok"]}
    x = stage.with_ppl_and_margin(no_robust, ("focus", "robust"), "own")
    assert x["margin"]["robust"] is None and x["ppl"]["robust_w"] is None


def test_filter_report_counts_by_hand():
    args = stage.parse_args([])
    lines = [scored("a", -2.0, 4, -2.4, 4),  # PPL 1.65, 1.82; M = 0.1: kept, IPS 0.4
             scored("b", -1.0, 4, -2.0, 4),  # M = 0.25: margin high, IPS 1.0
             scored("c", -8.0, 4, -1.0, 4),  # PPL(y_w) = e^2 = 7.4; M = -1.75: two reasons, IPS -7.0
             scored("d", -0.5, 5, -0.4, 4)]  # M = -0.1 - (-0.1) = 0: kept, IPS -0.1
    lines = [stage.apply_filter(x, ("focus", "robust"), args.max_ppl, args.margin_low, args.margin_high)
             for x in lines]
    assert [x["keep"]["focus"] for x in lines] == [True, False, False, True]
    assert lines[2]["why"]["focus"] == ["ppl chosen", "margin low"] and lines[0]["why"]["robust"] == ["no pair"]
    report = stage.filter_report(lines, ("focus", "robust"), args)
    f, r = report["branches"]["focus"], report["branches"]["robust"]
    assert (f["pairs"], f["kept"], f["dropped"]) == (4, 2, 2) and report["written"] == 2
    assert f["reasons"] == {"no pair": 0, "ppl chosen": 1, "ppl rejected": 0, "margin low": 1, "margin high": 1}
    assert f["ips_all"]["mean"] == pytest.approx((0.4 + 1.0 - 7.0 - 0.1) / 4)
    assert f["ips_all"]["negative"] == 0.5 and f["ips_kept"]["mean"] == pytest.approx(0.15)
    assert f["ips_kept"]["n"] == 2 and f["ips_kept"]["negative"] == 0.5
    assert (r["pairs"], r["kept"], r["dropped"], r["reasons"]["no pair"]) == (0, 0, 4, 4) and r["ips_all"]["n"] == 0


# ---- the scoring: the shared block, through this stage's grouping and chunking ----
def token_by_token(model, processor, prompt, response, images):
    """log pi(y | c) of one row, no padding, one plain forward per response-token prefix."""
    return token_by_token_logprob(model, processor, stage.chat_prompt(processor, prompt, len(images)), response, images)


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_summed_logprobs_equal_token_by_token(family, request, tmp_path):
    model, processor = stage.load_model(request.getfixturevalue(f"tiny_{family}"), "cpu")
    rng = np.random.default_rng(1)
    rows = [pair_row(tmp_path, 0, rng, instruction=INSTRUCTION), pair_row(tmp_path, 1, rng, shape="stitched")]
    lines = [stage.read_line({**r, "_file": str(tmp_path / "pairs.jsonl")}, False) for r in rows]
    todo = [r for line in lines for r in stage.scoring_rows(line, stage.TERMS)]
    assert len(todo) == 19 and {r[0] for r in todo} == set(stage.TERMS)  # robust_own_l: line 0 (P' != P) only
    scores = stage.score_rows(model, processor, [r[1:] for r in todo], batch_size=3)  # lines mix in chunks
    assert [len(r[3]) for r in todo if r[4] == "aug"] == [2, 2, 1, 1]  # I_aug = (I, I_crop), then stitched
    with torch.no_grad():
        for (term, prompt, response, images, context), (lp, n) in zip(todo, scores):
            expected, n_expected = token_by_token(model, processor, prompt, response, images)
            assert n == n_expected and lp == pytest.approx(expected, abs=1e-4), (term, lp, expected)


# ---- the robust pair, judged in the context 02 decoded it in ----
def test_robust_pair_is_filtered_in_its_decoding_context(tiny_llava, tmp_path):
    """02 decodes the robust pair after the authors' instruction (P' = instruction + " " + P): the filter must judge
    y_w under (I, P') and y_l under (I_noise, P'), P' read from "prompt_robust" or, in an older pairs file, rebuilt
    from gen.robust_instruction; 04's DPO_rob terms stay under (I_noise, P). Expected: one plain forward per token
    on the images read back from disk. Before, the filter scored both under plain P."""
    folder, rng = tmp_path / "data", np.random.default_rng(5)
    new = pair_row(folder, 0, rng, instruction=INSTRUCTION)  # stage 02's "prompt_robust"
    old = dict(pair_row(folder, 1, rng), gen={"robust_instruction": INSTRUCTION})  # an older pairs file
    plain = dict(pair_row(folder, 2, rng), gen={"robust_instruction": ""})  # the toy world's: P' = P
    data = write_pairs(folder, [new, old, plain])
    out = tmp_path / "out" / "train.jsonl"
    stage.main(["--model", str(tiny_llava), "--clip", "none", "--data", str(data), "--out", str(out), *map(str, WIDE)])
    model, processor = stage.load_model(tiny_llava, "cpu")
    lines = {x["id"]: x for x in jsonl(out)}
    with torch.no_grad():
        for row, decoded in ((new, f"{INSTRUCTION} {new['prompt']}"), (old, f"{INSTRUCTION} {old['prompt']}"),
                             (plain, plain["prompt"])):
            x = lines[row["id"]]
            image, noise = (Image.open(folder / p).convert("RGB") for p in (row["image"], row["images"]["noise"]))
            w, l = row["robust"]["chosen"], row["robust"]["rejected"]
            expert_w, n_w = token_by_token(model, processor, decoded, w, [image])
            own_l, n_l = token_by_token(model, processor, decoded, l, [noise])
            assert x["ref"]["robust_expert_w"] == pytest.approx(expert_w, abs=1e-4), row["id"]
            assert x["ref"].get("robust_own_l", x["ref"]["robust_l"]) == pytest.approx(own_l, abs=1e-4), row["id"]
            assert ("robust_own_l" in x["ref"]) == (row is not plain)  # P' = P: the same row as robust_l
            assert x["ppl"]["robust_w"] == pytest.approx(math.exp(-expert_w / n_w), rel=1e-4)
            assert x["ppl"]["robust_l"] == pytest.approx(math.exp(-own_l / n_l), rel=1e-4)
            assert x["margin"]["robust"] == pytest.approx(expert_w / n_w - own_l / n_l, abs=1e-4)
            for term, y in (("robust_w", w), ("robust_l", l)):  # what 04 trains on: (I_noise, P), as before
                assert x["ref"][term] == pytest.approx(token_by_token(model, processor, row["prompt"], y, [noise])[0],
                                                       abs=1e-4)
        # the instruction changes the log-probs here, so dropping it cannot pass unseen
        plain_p = token_by_token(model, processor, new["prompt"], new["robust"]["chosen"],
                                 [Image.open(folder / new["image"]).convert("RGB")])[0]
        assert abs(lines["p0"]["ref"]["robust_expert_w"] - plain_p) > 1e-3


# ---- a wrong input field or flag: that line's error, or a refusal before any model loads ----
BAD_FIELDS = [({"focus": "yes"}, "'focus' needs text fields"), ({"focus": False}, "'focus' needs text fields"),
              ({"focus": {}}, "'focus' needs text fields"),
              ({"robust": {"chosen": 1, "rejected": "no"}}, "'robust' needs"),
              ({"bbox": [1, 2, 3]}, "'bbox' must be 4 integers"), ({"bbox": [True, 0, 8, 8]}, "'bbox' must be"),
              ({"bbox": [0.5, 0, 8, 8]}, "'bbox' must be"), ({"images": "img/crop9.png"}, "'images' must be an object"),
              ({"images": {"crop": 5, "deg": "img/deg9.png", "noise": "img/noise9.png"}}, "images.crop must be"),
              ({"prompt_robust": 7}, "'prompt_robust' must be"), ({"prompt_robust": " "}, "'prompt_robust' must be"),
              ({"gen": "fast"}, "'gen' must hold"), ({"gen": {"robust_instruction": None}}, "'gen' must hold"),
              ({"prompt_enh": 5}, "prompt_enh")]


def test_a_field_of_the_wrong_type_is_that_lines_error(tiny_llava, tmp_path):
    """Each field 03 reads is checked on its line, never a traceback nor read as something else (before: "focus":
    false or {} was read as no pair, a bbox of bools passed, "prompt_robust" and "gen" were not read)."""
    folder, rng = tmp_path / "data", np.random.default_rng(4)
    good, base = pair_row(folder, 0, rng), pair_row(folder, 9, rng)
    for change, says in BAD_FIELDS:
        with pytest.raises(ValueError, match=re.escape(says)):
            stage.read_line({**base, **change, "_file": str(folder / "pairs.jsonl")}, False)
    bad = [dict(base, id=f"b{n}", **change) for n, (change, _) in enumerate(BAD_FIELDS)]
    data = write_pairs(folder, [good, *bad, dict(base, bbox=[0, 0, 8, 8])])
    out = tmp_path / "out" / "train.jsonl"
    stage.main(["--model", str(tiny_llava), "--clip", "none", "--data", str(data), "--out", str(out), *map(str, WIDE)])
    assert [x["id"] for x in jsonl(out)] == ["p0", "p9"]
    errors = jsonl(out.with_suffix(".errors.jsonl"))
    assert [e["line"] for e in errors] == list(range(2, 2 + len(BAD_FIELDS)))
    for e, (_, says) in zip(errors, BAD_FIELDS):
        assert says in e["error"], e


@pytest.mark.parametrize("flags, says", [(("--margin-low", "0.5", "--margin-high", "-0.5"),
                                          "--margin-low 0.5 is above --margin-high -0.5"),
                                         (("--max-ppl", "1"), "--max-ppl 1 keeps no pair"),
                                         (("--max-ppl", "0"), "--max-ppl 0 keeps no pair")])
def test_a_filter_that_keeps_nothing_is_refused_before_any_model_loads(flags, says, tmp_path, capsys):
    """Before, `--margin-low 0.5 --margin-high -0.5` scored every line, then said that no line was kept."""
    with pytest.raises(SystemExit):
        stage.main(["--model", str(tmp_path / "no_model"), "--data", str(tmp_path / "no.jsonl"), "--out",
                    str(tmp_path / "train.jsonl"), *flags])
    assert says in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written, no lock taken
    args = stage.parse_args(["--margin-low", "0.1", "--margin-high", "0.1", "--max-ppl", "1.01"])  # a band of one point
    assert (args.margin_low, args.margin_high, args.max_ppl) == (0.1, 0.1, 1.01)


# ---- the stage as a user runs it ----
@pytest.fixture(scope="module")
def llava_run(tiny_llava, tiny_clip, tmp_path_factory):
    """Three runs into one --out: the authors' thresholds (a random model keeps nothing: exit 1), another model
    (refused: the scores are the first model's), wide thresholds (every id is scored: only the filter re-runs)."""
    root = tmp_path_factory.mktemp("s03")
    data = mixed_pairs(root / "data")
    out = root / "out" / "train.jsonl"
    args = ("--clip", tiny_clip, "--data", data, "--out", out)
    procs = [run_script(SCRIPT, "--model", tiny_llava, *args, "--batch-size", 4, check=False)]
    procs.append({"dropped": jsonl(out.with_suffix(".dropped.jsonl")), "train": out.read_text(),
                  "report": json.loads(out.with_suffix(".report.json").read_text())})
    shutil.copytree(tiny_llava, root / "another_model")  # a model that loads, but another one
    procs.append(run_script(SCRIPT, "--model", root / "another_model", *args, *WIDE, check=False))
    procs.append(run_script(SCRIPT, "--model", tiny_llava, *args, *WIDE))
    return root, data, out, procs


@pytest.mark.slow
def test_authors_thresholds_drop_a_random_model_then_refilter(llava_run):
    root, data, out, (strict, files, other, wide) = llava_run
    assert strict.returncode != 0 and "no line keeps a branch" in strict.stderr, strict.stderr[-3000:]
    assert files["train"] == "" and len(files["dropped"]) == 6
    assert files["report"]["branches"]["focus"]["reasons"]["ppl chosen"] == 4  # PPL ~ vocabulary size
    assert other.returncode != 0 and "holds lines made with model=" in other.stderr, other.stderr[-3000:]
    assert "6 of 6 input lines written" in wide.stdout and "03 scoring: 0it" in wide.stderr  # nothing re-scored
    assert [x["id"] for x in jsonl(out)] == ["p0", "p1", "p2", "p3", "p5"]
    (dropped,) = jsonl(out.with_suffix(".dropped.jsonl"))
    assert dropped["id"] == "p4" and dropped["why"] == {"focus": ["no pair"], "robust": ["no pair"]}


def check_train_lines(out, tiny_clip):
    lines = {x["id"]: x for x in jsonl(out)}
    for x in lines.values():
        for path in [x["image"], *x["images"].values()]:  # paths relative to the output file
            assert not os.path.isabs(path) and (out.parent / path).is_file(), path
        assert "robust_own_l" not in x["ref"]  # no instruction: P' = P, y_l's own context is robust_l's
        for term, (branch, *_) in stage.TERMS.items():
            if term != "robust_own_l":
                assert (x["ref"][term] is None) == (x[branch] is None) == (x["ntok"][term] is None), (x["id"], term)
        assert x["keep"] == {"focus": x["focus"] is not None, "robust": x["robust"] is not None}
        # ppl and margin follow from ref and ntok, each response in the context that generated it: focus
        # y_w (I_aug, P_enh), y_l (I_deg, P); robust y_w (I, P) (contrastive amplification's expert), y_l (I_noise, P)
        own = {"focus": ("calib_aug_w", "calib_deg_l"), "robust": ("robust_expert_w", "robust_l")}
        assert x["filter_context"] == "own"
        for b in ("focus", "robust"):
            if x[b]:
                w, l = own[b]
                assert x["ppl"][f"{b}_w"] == pytest.approx(math.exp(-x["ref"][w] / x["ntok"][w]))
                assert x["ppl"][f"{b}_l"] == pytest.approx(math.exp(-x["ref"][l] / x["ntok"][l]))
                assert x["margin"][b] == pytest.approx(x["ref"][w] / x["ntok"][w] - x["ref"][l] / x["ntok"][l])
    assert lines["p1"]["clip"] is None and lines["p2"]["robust"] is None and lines["p3"]["images"]["aug"]
    assert lines["p0"]["ntok"]["focus_w"] == 6 and lines["p0"]["ntok"]["robust_l"] == 9  # words + EOS
    import open_clip  # CLIPScore of line p0, recomputed here from the model
    model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{tiny_clip}")
    x = lines["p0"]
    with torch.no_grad():
        t = model.encode_text(open_clip.get_tokenizer(f"local-dir:{tiny_clip}")([x["prompt"]]))
        for key, path in (("image", x["image"]), ("crop", x["images"]["crop"])):
            i = model.encode_image(preprocess(Image.open(out.parent / path).convert("RGB"))[None])
            assert x["clip"][key] == pytest.approx(2.5 * max(torch.cosine_similarity(t, i).item(), 0.0), abs=1e-5)
    if x["clip"]["image"] > 0:
        assert x["clip"]["ratio"] == pytest.approx(x["clip"]["crop"] / x["clip"]["image"])
    return lines


@pytest.mark.slow
def test_llava_lines_and_one_step_of_stage_04(llava_run, tiny_llava, tiny_clip):
    root, _, out, _ = llava_run
    check_train_lines(out, tiny_clip)
    run_script("04_train_calibrated_dpo.py", "--model", tiny_llava, "--data", out, "--out", root / "p2dpo",
               "--effective-batch", 4, "--batch-size", 2, "--stop-after", 1)
    (step,) = [json.loads(line) for line in open(root / "p2dpo" / "metrics.jsonl")]
    for k in ("dpo_focus", "calib", "dpo_robust"):  # the policy is the reference at step 0: 03's numbers are 04's
        assert step[k] == pytest.approx(math.log(2), abs=1e-6), (k, step)


@pytest.mark.slow
def test_qwen_end_to_end(tiny_qwen, tiny_clip, tmp_path):
    data = mixed_pairs(tmp_path / "data")
    out = tmp_path / "out" / "train.jsonl"
    proc = run_script(SCRIPT, "--model", tiny_qwen, "--clip", tiny_clip, "--data", data, "--out", out, *WIDE,
                      "--batch-size", 5)
    check_train_lines(out, tiny_clip)
    assert "focus: 4 pairs, 4 kept" in proc.stdout and "robust: 4 pairs, 4 kept" in proc.stdout, proc.stdout
    report = json.loads(out.with_suffix(".report.json").read_text())
    ips = [x["ref"]["robust_w"] - x["ref"]["robust_l"] for x in jsonl(out) if x["robust"]]
    assert report["branches"]["robust"]["ips_all"]["mean"] == pytest.approx(np.mean(ips))
    assert report["branches"]["robust"]["ips_all"]["std"] == pytest.approx(np.std(ips))


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tiny_llava, tmp_path):
    rng = np.random.default_rng(2)
    data = write_pairs(tmp_path / "data", [pair_row(tmp_path / "data", i, rng) for i in range(40)])
    args = ["--model", tiny_llava, "--clip", "none", "--data", data, "--batch-size", 1, *WIDE]
    out = tmp_path / "killed" / "train.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / SCRIPT), *map(str, args), "--out", str(out)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scores = out.with_suffix(".scores")
    while proc.poll() is None and not (scores.is_file() and scores.read_bytes().count(b"\n") >= 1):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_killed = scores.read_bytes().count(b"\n")
    assert proc.returncode == -signal.SIGKILL and 1 <= n_killed < 40, (proc.returncode, n_killed)
    assert not out.exists()
    stage.main([*map(str, args), "--out", str(out)])  # resumes: scores the other ids only
    stage.main([*map(str, args), "--out", str(tmp_path / "full" / "train.jsonl")])
    for name in ("train.jsonl", "train.scores"):
        resumed, full = (sorted(open(tmp_path / d / name).read().splitlines()) for d in ("killed", "full"))
        assert len(resumed) == 40 and resumed == full


def test_bad_lines_are_listed_and_odd_image_modes_scored(tiny_llava, tmp_path):
    folder, rng = tmp_path / "data", np.random.default_rng(3)
    good = [pair_row(folder, i, rng, mode=m) for i, m in enumerate(["L", "RGBA", "P", "I;16"])]
    assert [Image.open(folder / "img" / f"image{i}.png").mode for i in range(4)] == ["L", "RGBA", "P", "I;16"]
    (folder / "img" / "broken.png").write_bytes(b"not a png")
    whole = (folder / "img" / "image0.png").read_bytes()
    (folder / "img" / "truncated.png").write_bytes(whole[:len(whole) // 2])
    base = pair_row(folder, 9, rng)
    bad = [dict(base, id="b1", image="img/missing.png"),  # line 5
           "{not json",  # line 6
           {k: v for k, v in base.items() if k != "prompt"} | {"id": "b3"},  # line 7: missing field
           dict(base, id="b4", prompt="  "),  # line 8: empty prompt
           dict(base, id="b5", images=dict(base["images"], noise="img/broken.png")),  # line 9: unreadable image
           dict(base, id="b6", prompt_enh=None),  # line 10: a focus pair without P_enh
           dict(base, id="b7", robust={"chosen": "yes"}),  # line 11: a pair without a rejected answer
           dict(base, id="b8", image="img/truncated.png")]  # line 12: a PNG cut in half
    data = write_pairs(folder, good + bad)
    out = tmp_path / "out" / "train.jsonl"
    stage.main(["--model", str(tiny_llava), "--clip", "none", "--data", str(data), "--out", str(out), *map(str, WIDE)])
    assert [x["id"] for x in jsonl(out)] == ["p0", "p1", "p2", "p3"]
    errors = {e["line"]: e["error"] for e in jsonl(out.with_suffix(".errors.jsonl"))}
    expected = {5: "image not found", 6: "bad JSON", 7: "missing field 'prompt'", 8: "empty field 'prompt'",
                9: "unreadable image", 10: "prompt_enh", 11: "'robust' needs", 12: "truncated"}
    assert set(errors) == set(expected)
    for n, why in expected.items():
        assert f"pairs.jsonl:{n}:" in errors[n] and why in errors[n], errors[n]


def test_every_line_failing_exits_nonzero(tiny_llava, tmp_path):
    data = write_pairs(tmp_path, ["{broken", {"id": "a", "image": "nope.png", "prompt": "p", "focus": None}])
    with pytest.raises(SystemExit, match="every line failed"):
        stage.main(["--model", str(tiny_llava), "--clip", "none", "--data", str(data), "--out", str(tmp_path / "o")])


@pytest.mark.slow
def test_score_only_matches_the_dpo_context_scores(llava_run, tiny_llava):
    root, data, out, _ = llava_run
    rows = [r for r in jsonl(data) if r["focus"]]  # the focus pairs as an off-policy file: question, chosen, rejected
    prefs = [{"id": r["id"], "image": os.path.join("data", r["image"]), "question": r["prompt"], **r["focus"]}
             for r in rows]
    (root / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prefs))
    prefs_out = root / "prefs" / "ips.jsonl"
    stage.main(["--model", str(tiny_llava), "--clip", "none", "--data", str(root / "prefs.jsonl"), "--out",
                str(prefs_out), "--score-only"])
    assert not prefs_out.exists() and not prefs_out.with_suffix(".dropped.jsonl").exists()
    report = json.loads(prefs_out.with_suffix(".report.json").read_text())
    focus = {x["id"]: x["ref"] for x in jsonl(out.with_suffix(".scores"))}  # 03's own run: (I, P) = the same context
    pair = {x["id"]: x["ref"] for x in jsonl(prefs_out.with_suffix(".scores"))}
    assert set(pair) == {r["id"] for r in rows} and report["branches"]["pair"]["pairs"] == len(rows)
    for i, ref in pair.items():
        assert ref["pair_w"] == pytest.approx(focus[i]["focus_w"], abs=1e-5)
        assert ref["pair_l"] == pytest.approx(focus[i]["focus_l"], abs=1e-5)
    ips = [ref["pair_w"] - ref["pair_l"] for ref in pair.values()]
    assert report["branches"]["pair"]["ips_all"]["mean"] == pytest.approx(np.mean(ips))
    assert report["branches"]["pair"]["ips_all"]["negative"] == pytest.approx(np.mean(np.array(ips) < 0))

"""Stage 04: the P2-DPO loss (hand-computed values and limits), the shared log-prob block (batched = token by
token), LoRA merge, every field of a train.jsonl line checked on its own line (errors.jsonl, repeated ids),
flags refused together, and (slow) the trainer run as a subprocess on tiny LLaVA / Qwen2.5-VL models: step 0 =
ln 2, bad rows skipped, resume = uninterrupted, 2 processes (gloo) = 1 process, non-finite loss stops the run."""
import contextlib
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, load_script, run_script, run_torchrun, token_by_token_logprob

SCRIPT = "04_train_calibrated_dpo.py"
stage = load_script(SCRIPT)
LN2 = math.log(2.0)
ENH = "answer mainly based on the first image , refer to the cropping details of the second image if necessary : "
PAIRS = [("there is a red circle", "there is a blue square"), ("yes", "no"),
         ("a green triangle and a red cross", "a yellow circle"), ("blue", "red square")]
REF_TERMS = {  # ref key -> (branch, response, prompt key, images of the context)
    "focus_w": ("focus", "chosen", "prompt", lambda r: [r["image"]]),
    "focus_l": ("focus", "rejected", "prompt", lambda r: [r["image"]]),
    "calib_aug_w": ("focus", "chosen", "prompt_enh", lambda r: r["images"].get("aug") and [r["images"]["aug"]]
                    or [r["image"], r["images"]["crop"]]),
    "calib_deg_w": ("focus", "chosen", "prompt", lambda r: [r["images"]["deg"]]),
    "calib_aug_l": ("focus", "rejected", "prompt_enh", lambda r: r["images"].get("aug") and [r["images"]["aug"]]
                    or [r["image"], r["images"]["crop"]]),
    "calib_deg_l": ("focus", "rejected", "prompt", lambda r: [r["images"]["deg"]]),
    "robust_w": ("robust", "chosen", "prompt", lambda r: [r["images"]["noise"]]),
    "robust_l": ("robust", "rejected", "prompt", lambda r: [r["images"]["noise"]]),
}


def image(rng, w=48, h=48):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def write_data(folder, model_dir, n_good=9, bad=True):
    """train.jsonl with n_good usable lines of mixed shapes (both branches, focus only, robust only, no CLIP score,
    a stitched I_aug) whose ref log-probs come from the initial model via the shared block, plus bad lines."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, rows = np.random.default_rng(0), []
    for i in range(n_good):
        for role in ("image", "crop", "deg", "noise", "aug"):
            image(rng, 64 if role == "aug" else 48).save(folder / f"{role}{i}.png")
        w, l = PAIRS[i % len(PAIRS)]
        crop, full = float(rng.uniform(0.3, 0.9)), float(rng.uniform(0.3, 0.9))
        rows.append({"id": f"x{i}", "image": f"image{i}.png", "prompt": "describe the image .",
                     "prompt_enh": ENH + "describe the image .",
                     "images": {"crop": f"crop{i}.png", "deg": f"deg{i}.png", "noise": str(folder / f"noise{i}.png"),
                                **({"aug": f"aug{i}.png"} if i % 4 == 3 else {})},
                     "focus": {"chosen": w, "rejected": l} if i % 4 != 1 else None,
                     "robust": {"chosen": l + " and a circle", "rejected": w, "init": w},
                     "clip": {"crop": crop, "image": full, "ratio": crop / full} if i % 4 != 2 else None,
                     "keep": {"focus": True, "robust": i % 4 != 3}})
    model, processor = stage.load_model(model_dir, "cpu")
    for key, (branch, side, prompt, paths) in REF_TERMS.items():
        todo = [r for r in rows if r[branch]]
        inputs, mask = stage.build_batch(processor, [r[prompt] for r in todo], [r[branch][side] for r in todo],
                                         [[stage.load_image(folder / p) for p in paths(r)] for r in todo])
        with torch.no_grad():
            logp, ntok = stage.response_logprobs(model, inputs, mask)
        for r, v, t in zip(todo, logp.tolist(), ntok.tolist()):
            r.setdefault("ref", {})[key], r.setdefault("ntok", {})[key] = v, t
    if bad:
        rows.append(dict(rows[0], id="bad0", ref={k: v for k, v in rows[0]["ref"].items() if k != "robust_l"}))
        rows.append(dict(rows[0], id="bad1", image="no_such_file.png"))  # missing image
        rows.append(dict(rows[0], id="bad2", keep={"focus": False, "robust": False}))  # no usable branch
    with open(folder / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        if bad:
            f.write("{not json\n")
    return folder / "train.jsonl"


def metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def curve(out, keys=("loss", "dpo_focus", "calib", "dpo_robust", "grad_norm")):
    return np.array([[m[k] for k in keys] for m in metrics(out)], dtype=float)  # None (no line of a branch) -> nan


def torchrun(nproc, *args):
    return run_torchrun(ROOT / SCRIPT, nproc, *args)


# ---- the loss ----
def test_dpo_golden_value():
    losses, chosen, rejected = stage.dpo_loss(torch.tensor([-1.0]), torch.tensor([-1.5]), torch.tensor([-2.0]),
                                              torch.tensor([-2.0]), beta=0.1)  # logit difference h = 0.5
    assert losses.item() == pytest.approx(0.6684596, abs=1e-7)
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(0.05)


def test_policy_equal_reference_gives_ln2_everywhere():
    g = torch.Generator().manual_seed(0)
    pi = {k: -50 * torch.rand(6, generator=g) for k in stage.TERMS}
    has_f, has_r = torch.tensor([1, 1, 1, 0, 1, 1]).bool(), torch.tensor([1, 0, 1, 1, 1, 1]).bool()
    crop, full = torch.tensor([0.5, 0.7, math.nan, 0.4, 0.9, 0.2]), torch.tensor([0.6, 0.5, math.nan, 0.4, 0.3, 0.8])
    losses, d = stage.p2dpo_loss(pi, pi, has_f, has_r, crop, full, beta=0.1, lambda_calib=0.3)
    for k in ("dpo_focus", "calib", "dpo_robust"):
        assert torch.allclose(d[k], torch.full((6,), LN2))
    w_f, w_r = stage.ddw_weights(crop, full, 0.5, 0.2, 0.1)
    expected = torch.where(has_f & has_r, w_f * 1.3 * LN2 + w_r * LN2, 0.0)  # both branches: DDW
    expected[2] = 0.5 * 1.3 * LN2 + 0.5 * LN2  # no CLIP score: 0.5 / 0.5
    expected[1], expected[3] = 1.3 * LN2, LN2  # one branch: weight 1.0 on it
    assert torch.allclose(losses, expected)


def test_no_calib_no_ddw_is_plain_dpo():
    g = torch.Generator().manual_seed(1)
    pi, ref = ({k: -30 * torch.rand(5, generator=g) for k in stage.TERMS} for _ in range(2))
    ones, zeros, clip = torch.ones(5, dtype=torch.bool), torch.zeros(5, dtype=torch.bool), torch.rand(5, generator=g)
    plain_f = stage.dpo_loss(pi["focus_w"], pi["focus_l"], ref["focus_w"], ref["focus_l"], 0.1)[0]
    plain_r = stage.dpo_loss(pi["robust_w"], pi["robust_l"], ref["robust_w"], ref["robust_l"], 0.1)[0]
    focus_only, _ = stage.p2dpo_loss(pi, ref, ones, zeros, clip, clip * 2, lambda_calib=0.0, ddw=False)
    both, _ = stage.p2dpo_loss(pi, ref, ones, ones, clip, clip * 2, lambda_calib=0.0, ddw=False)
    assert torch.allclose(focus_only, plain_f)
    assert torch.allclose(both, 0.5 * plain_f + 0.5 * plain_r)
    with_calib, _ = stage.p2dpo_loss(pi, ref, ones, zeros, clip, clip, lambda_calib=0.3, ddw=False)
    calib = stage.calibration_loss(pi["aug"], pi["deg"], ref["aug"], ref["deg"], 0.1)
    assert torch.allclose(with_calib, plain_f + 0.3 * calib)


def test_ddw_weights_bounded_and_sum_to_twice_base():
    crop = torch.tensor([0.0, 0.0, 1e-9, 0.5, 0.5, 0.55, 2.5, 0.3])
    full = torch.tensor([0.0, 0.7, 0.0, 0.5, 2.5, 0.5, 1e-9, 0.6])
    w_f, w_r = stage.ddw_weights(crop, full, 0.5, 0.2, 0.1)
    assert torch.all(w_f >= 0.3 - 1e-7) and torch.all(w_f <= 0.7 + 1e-7) and torch.allclose(w_f + w_r, torch.ones(8))
    assert w_f[0] == pytest.approx(0.5) and w_f[3] == pytest.approx(0.5)  # r = 1 (also 0 / 0): no shift
    assert w_f[5] == pytest.approx(0.5 + 0.2 * math.tanh(0.1 / 0.1), abs=1e-6)  # r = 1.1
    assert w_f[6] == pytest.approx(0.7) and w_f[4] == pytest.approx(0.3)  # saturates at w_base +- alpha_max


def test_gradients_finite_at_extreme_gaps():
    for h in (1000.0, -1000.0):
        pi = {k: torch.zeros(2, requires_grad=True) for k in stage.TERMS}
        ref = {k: torch.zeros(2) for k in stage.TERMS}
        ref["focus_l"], ref["aug"], ref["robust_l"] = torch.full((2,), h), torch.full((2,), -h), torch.full((2,), h)
        losses, _ = stage.p2dpo_loss(pi, ref, torch.ones(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool),
                                     torch.tensor([0.9, 0.1]), torch.tensor([0.1, 0.9]))
        losses.sum().backward()
        assert torch.isfinite(losses).all() and all(torch.isfinite(p.grad).all() for p in pi.values())


def test_parse_line_uses_a_branch_only_when_paired_kept_and_on(tmp_path):
    for name in ("image.png", "crop.png", "deg.png", "noise.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    ref = {k: -1.0 for k in REF_TERMS}
    row = {"image": "image.png", "prompt": "p", "prompt_enh": "q", "ref": ref, "keep": {"focus": True, "robust": False},
           "images": {"crop": "crop.png", "deg": "deg.png", "noise": "noise.png"}, "clip": None,
           "focus": {"chosen": "a", "rejected": "b"}, "robust": {"chosen": "c", "rejected": "d", "init": "c"}}
    ex = stage.parse_line(row, str(tmp_path), stage.parse_args([]))
    assert ex["focus"] == ("a", "b") and ex["robust"] is None and math.isnan(ex["clip"][0])  # keep.robust False
    assert ex["images"]["aug"] == [str(tmp_path / "image.png"), str(tmp_path / "crop.png")]
    ref["calib_aug_w"] = -7.0
    assert stage.parse_line(row, str(tmp_path), stage.parse_args([]))["ref"]["aug"] == -7.0
    assert stage.parse_line(row, str(tmp_path), stage.parse_args(["--calib-ref", "lose"]))["ref"]["aug"] == -1.0
    with pytest.raises(ValueError, match="no usable branch"):
        stage.parse_line(row, str(tmp_path), stage.parse_args(["--no-focus"]))
    del ref["calib_deg_w"]  # needed by L_calib ...
    with pytest.raises(ValueError, match="'ref.calib_deg_w' must be a log-prob"):
        stage.parse_line(row, str(tmp_path), stage.parse_args([]))
    assert stage.parse_line(row, str(tmp_path), stage.parse_args(["--no-calib"]))["ref"]["deg"] == 0.0  # ... only
    row["keep"]["robust"], ref["robust_l"] = True, None
    with pytest.raises(ValueError, match="'ref.robust_l' must be a log-prob"):
        stage.parse_line(row, str(tmp_path), stage.parse_args(["--no-calib"]))


# ---- the shared logprobs block ----
@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_logprobs_equal_token_by_token(family, request):
    model, processor = stage.load_model(request.getfixturevalue(f"tiny_{family}"), "cpu")
    rng, tok = np.random.default_rng(0), processor.tokenizer
    a, b, c = image(rng, 48, 48), image(rng, 70, 42), image(rng, 30, 60)
    prompts = ["describe the image .", ENH + "is there a red circle ?", "what colour is the square ?"]
    responses = ["there is a red circle and a blue square", "no", ""]
    images = [[a], [b, c], [a]]  # mixed image counts and sizes, a repeated image
    inputs, mask = stage.build_batch(processor, prompts, responses, images)
    with torch.no_grad():
        logp, ntok = stage.response_logprobs(model, inputs, mask)
        for i in range(3):  # one row alone, no padding, one forward per response token
            text = stage.chat_prompt(processor, prompts[i], len(images[i]))
            total, n = token_by_token_logprob(model, processor, text, responses[i], images[i])
            assert ntok[i].item() == n
            assert logp[i].item() == pytest.approx(total, abs=1e-4)


def test_an_ignored_logits_to_keep_is_an_error(tiny_llava):
    """A transformers version that renames logits_to_keep (it was num_logits_to_keep before 4.50) swallows it in
    **kwargs and returns every position's logits; the gather would then read the wrong positions without a sound."""
    model, processor = stage.load_model(tiny_llava, "cpu")
    forward = model.forward
    model.forward = lambda **kwargs: forward(**{k: v for k, v in kwargs.items() if k != "logits_to_keep"})
    inputs, mask = stage.build_batch(processor, ["describe the image ."], ["a red circle"],
                                     [[image(np.random.default_rng(0))]])
    with torch.no_grad(), pytest.raises(AssertionError, match="logits_to_keep= was ignored"):
        stage.response_logprobs(model, inputs, mask)


def test_backward_per_group_equals_one_backward(tiny_llava, tmp_path):
    """micro_step backpropagates the focus, robust and calibration groups one after another (a third of the
    activations alive); the gradient and the losses equal one backward of p2dpo_loss over every term at once, on
    lines with both branches, one branch, no CLIP score, and a dummy line of weight 0."""
    data = write_data(tmp_path / "data", tiny_llava, n_good=6, bad=False)
    args = stage.parse_args(["--lora-rank", "4", "--lora-dropout", "0"])
    exs = [stage.parse_line(row, tmp_path / "data", args) for _, row in stage.read_jsonl(data)]
    mb = [(ex, 1.0) for ex in exs[:5]] + [(exs[5], 0.0)]
    model, processor = stage.load_model(tiny_llava, "cpu")
    torch.manual_seed(0)
    model = stage.prepare(model, args, 1)
    for m in model.modules():  # B = 0 at init: give A a gradient too
        if isinstance(m, stage.LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    ctx = contextlib.nullcontext()
    losses, _ = stage.micro_step(model, processor, mb, args, ctx, 0.25)
    per_group = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    tensor = lambda rows: torch.tensor(rows, dtype=torch.float32)  # noqa: E731
    pi = stage.policy_logps(model, stage.term_batches(processor, [ex for ex, _ in mb]), len(mb), ctx)  # one graph
    ref = {k: tensor([ex["ref"][k] for ex, _ in mb]) for k in stage.TERMS}
    clip = tensor([ex["clip"] for ex, _ in mb])
    has_f, has_r = (torch.tensor([ex[b] is not None for ex, _ in mb]) for b in ("focus", "robust"))
    assert not has_f.all() and not has_r.all() and clip.isnan().any(), (has_f, has_r, clip)  # mixed lines
    once, _ = stage.p2dpo_loss(pi, ref, has_f, has_r, clip[:, 0], clip[:, 1])
    ((once * tensor([w for _, w in mb])).sum() * 0.25).backward()
    torch.testing.assert_close(losses, once.detach())
    assert all(p.grad.abs().sum() > 0 for p in params)
    for p, g in zip(params, per_group):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)


# ---- LoRA ----
@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_merged_model_gives_the_lora_logits(family, request, tmp_path):
    from transformers import AutoModelForImageTextToText
    model, processor = stage.load_model(request.getfixturevalue(f"tiny_{family}"), "cpu")
    inputs, _ = stage.build_batch(processor, ["describe the image ."] * 2, ["a red circle", "no"],
                                  [[image(np.random.default_rng(0))]] * 2)
    with torch.no_grad():
        base = model(**inputs).logits
        stage.add_lora(model, 4, 8, 0.05)
        adapters = [name for name, m in model.named_modules() if isinstance(m, stage.LoRALinear)]
        assert adapters and all(name.startswith("model.language_model.") for name in adapters), adapters
        assert torch.allclose(model.eval()(**inputs).logits, base, atol=1e-6)  # B = 0: starts at the reference
        for name in adapters:
            torch.nn.init.normal_(model.get_submodule(name).lora_B, std=0.2)
        lora = model(**inputs).logits
        stage.merge_lora(model)
        model.save_pretrained(tmp_path)
        merged = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()(**inputs).logits
    assert not torch.allclose(lora, base, atol=1e-3)
    assert torch.allclose(merged, lora, atol=1e-5)


# ---- the trainer, as a user runs it ----
COMMON = ("--effective-batch", 4, "--batch-size", 2, "--epochs", 2, "--lr", 1e-3, "--save-every", 100)


@pytest.fixture(scope="module")
def llava_run(tiny_llava, tmp_path_factory):
    """One uninterrupted LoRA run on the tiny LLaVA (9 good lines, 4 bad ones)."""
    root = tmp_path_factory.mktemp("s04")
    data = write_data(root / "data", tiny_llava)
    proc = run_script(SCRIPT, "--model", tiny_llava, "--data", data, "--out", root / "full", *COMMON)
    return root, data, proc


@pytest.mark.slow
def test_step0_is_ln2_and_outputs_load(llava_run, tiny_llava):
    from transformers import AutoModelForImageTextToText
    root, data, proc = llava_run
    out = root / "full"
    rows = metrics(out)
    assert len(rows) == 6 and [r["step"] for r in rows] == list(range(1, 7))  # 9 lines / 4 per step, 2 epochs
    for k in ("dpo_focus", "calib", "dpo_robust"):
        assert rows[0][k] == pytest.approx(LN2, abs=1e-6), (k, rows[0])
    assert rows[0]["margin_focus"] == pytest.approx(0.0, abs=1e-6)  # (accuracy at step 0 is rounding noise)
    assert rows[-1]["loss"] < rows[0]["loss"]
    for k in ("loss", "acc_robust", "margin_robust", "w_focus", "delta_pi_w", "grad_norm", "lr", "examples_per_s"):
        assert k in rows[0]
    for n, why in ((10, "robust_l"), (11, "no_such_file.png"), (12, "no usable branch"), (13, "bad JSON")):
        assert f"train.jsonl:{n}:" in proc.stdout and why in proc.stdout, (n, proc.stdout[:2000])
    args = json.load(open(out / "args.json"))
    assert args["lines"] == 9 and args["skipped"] == 4 and args["grad_accum"] == 2 and args["total_steps"] == 6
    trained = AutoModelForImageTextToText.from_pretrained(out)
    base = AutoModelForImageTextToText.from_pretrained(tiny_llava)
    assert not any("lora" in k for k in trained.state_dict())
    diff = {k: (v - base.state_dict()[k]).abs().max().item() for k, v in trained.state_dict().items()}
    assert max(v for k, v in diff.items() if "language_model" in k) > 0
    assert max(v for k, v in diff.items() if "language_model" not in k) == 0  # vision, projector, lm_head frozen


@pytest.mark.slow
def test_resume_equals_uninterrupted_and_nonfinite_stops(llava_run, tiny_llava):
    root, data, _ = llava_run
    out = root / "resumed"
    run_script(SCRIPT, "--model", tiny_llava, "--data", data, "--out", out, *COMMON, "--stop-after", 2)
    assert len(metrics(out)) == 2 and not (out / "model.safetensors").exists()
    good = (out / "checkpoint.pt").read_bytes()
    poisoned = data.parent / "poisoned.jsonl"  # a ref log-prob that overflows fp32: the loss becomes inf
    poisoned.write_text(data.read_text().replace('"focus_l": -', '"focus_l": -1e300, "x": -'))
    poisoned_args = ["--model", tiny_llava, "--data", poisoned, *COMMON]
    with pytest.raises(SystemExit, match="data_identity"):  # --resume with other data: refused, nothing changed
        stage.main(list(map(str, [*poisoned_args, "--out", out, "--resume"])))
    assert (out / "checkpoint.pt").read_bytes() == good
    with pytest.raises(SystemExit, match="non-finite loss .* no checkpoint.pt was written yet"):  # (a fresh run)
        stage.main(list(map(str, [*poisoned_args, "--out", root / "poisoned"])))
    run_script(SCRIPT, "--model", tiny_llava, "--data", data, "--out", out, *COMMON, "--resume")
    np.testing.assert_allclose(curve(out), curve(root / "full"), atol=1e-6)
    from safetensors.torch import load_file
    a, b = load_file(out / "model.safetensors"), load_file(root / "full" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_file_with_no_usable_line_exits_nonzero(tmp_path, tiny_llava):
    (tmp_path / "train.jsonl").write_text('{"id": "a", "image": "x.png", "prompt": "p", "focus": null}\n')
    proc = run_script(SCRIPT, "--model", tiny_llava, "--data", tmp_path / "train.jsonl", "--out", tmp_path / "o",
                      check=False)
    assert proc.returncode != 0 and "no usable line" in proc.stderr


@pytest.mark.slow
def test_two_processes_equal_one_lora_ddp(llava_run, tiny_llava):
    root, data, _ = llava_run
    args = ("--model", tiny_llava, "--data", data, "--effective-batch", 4, "--epochs", 1, "--lr", 1e-3,
            "--lora-dropout", 0)
    run_script(SCRIPT, *args, "--out", root / "one", "--batch-size", 4)
    torchrun(2, *args, "--out", root / "two", "--batch-size", 2)  # the last step's 1 line: rank 1 gets dummy lines
    assert json.load(open(root / "two" / "args.json"))["world_size"] == 2 and len(metrics(root / "two")) == 3
    np.testing.assert_allclose(curve(root / "two"), curve(root / "one"), atol=1e-5)


@pytest.mark.slow
def test_qwen_full_finetune_ddp_two_processes_equal_one(tiny_qwen, tmp_path):
    data = write_data(tmp_path / "data", tiny_qwen, n_good=5, bad=False)
    args = ("--model", tiny_qwen, "--data", data, "--effective-batch", 4, "--epochs", 1, "--lr", 1e-4,
            "--lora-rank", 0, "--no-ddw", "--calib-ref", "lose")
    run_script(SCRIPT, *args, "--out", tmp_path / "one", "--batch-size", 4, "--grad-checkpointing")
    rows = metrics(tmp_path / "one")
    assert rows[0]["dpo_focus"] == pytest.approx(LN2, abs=1e-6)
    assert rows[0]["dpo_robust"] == pytest.approx(LN2, abs=1e-6)
    torchrun(2, *args, "--out", tmp_path / "two", "--batch-size", 2)  # DDP (no checkpointing: same numbers)
    assert json.load(open(tmp_path / "two" / "args.json"))["world_size"] == 2
    np.testing.assert_allclose(curve(tmp_path / "two"), curve(tmp_path / "one"), atol=1e-5)
    from transformers import AutoModelForImageTextToText
    AutoModelForImageTextToText.from_pretrained(tmp_path / "two")


def test_world_settings_toy_world_lr_else_paper(tmp_path):
    """world.json's "stages"["04"] beside a --model folder sets the flags left unset (toy world: lr 2e-4);
    a flag given wins; a model folder without world.json (a real model) keeps the paper's 1e-5."""
    import argparse
    (tmp_path / "model").mkdir()
    (tmp_path / "world.json").write_text(json.dumps({"stages": {"04": {"lr": 2e-4}, "03": {"x": 1}}}))
    args = argparse.Namespace(model=str(tmp_path / "model"), lr=None)
    line = stage.world_settings(args, "04", {"lr": 1e-5})
    assert args.lr == 2e-4 and "--lr 0.0002" in line and "world.json" in line
    args = argparse.Namespace(model=str(tmp_path / "model"), lr=3e-4)
    line = stage.world_settings(args, "04", {"lr": 1e-5})
    assert args.lr == 3e-4 and "none taken" in line
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "model").mkdir()
    args = argparse.Namespace(model=str(tmp_path / "real" / "model"), lr=None)
    line = stage.world_settings(args, "04", {"lr": 1e-5})
    assert args.lr == 1e-5 and "paper's defaults" in line
    args = argparse.Namespace(model="llava-hf/llava-1.5-7b-hf", lr=None)  # a name, not a folder
    assert stage.world_settings(args, "04", {"lr": 1e-5}) and args.lr == 1e-5


# ---- every field of a line checked on its own line; flags checked together ----
def good_row(folder, i=0):
    """A usable train.jsonl row with both branches, its images in folder (ref log-probs need not be the model's)."""
    for role in ("image", "crop", "deg", "noise"):
        if not (folder / f"{role}.png").exists():
            image(np.random.default_rng(len(role)), 32, 32).save(folder / f"{role}.png")
    return {"id": f"x{i}", "image": "image.png", "prompt": "describe the image .", "prompt_enh": ENH + "describe .",
            "images": {"crop": "crop.png", "deg": "deg.png", "noise": "noise.png"},
            "focus": {"chosen": "a red circle", "rejected": "a blue square"}, "robust": {"chosen": "yes", "rejected": "no"},
            "ref": {k: -20.0 - i for k in REF_TERMS}, "clip": {"crop": 0.6, "image": 0.5, "ratio": 1.2},
            "keep": {"focus": True, "robust": True}}


def with_field(row, path, value):
    row = json.loads(json.dumps(row))
    *parents, last = path.split(".")
    node = row
    for key in parents:
        node = node[key]
    node[last] = value
    return row


@pytest.mark.parametrize("path, value, why", [
    ("ref.focus_w", True, "'ref.focus_w' must be a log-prob"),  # was read as the log-prob 1.0
    ("ref.focus_l", "-3.5", "'ref.focus_l' must be a log-prob"),
    ("ref.robust_w", 0.5, "'ref.robust_w' must be a log-prob \\(<= 0\\)"),  # no probability is above 1
    ("ref.calib_deg_l", False, "'ref.calib_deg_l' must be a log-prob"),  # (a term --calib-ref win does not use)
    ("ref", [-1.0], "'ref' must be an object"),  # was an AttributeError
    ("clip.crop", "0.6", "'clip.crop' must be a CLIPScore"),  # strings were dropped in silence: no DDW
    ("clip.image", -0.5, "'clip.image' must be a CLIPScore \\(>= 0\\)"),
    ("clip", [0.6, 0.5], "'clip' must be an object or null"),  # was an AttributeError
    ("focus", "a red circle", "'focus' must be an object or null"),
    ("robust.rejected", 3, "'robust.rejected' must be text"),
    ("keep.robust", "yes", "'keep.robust' must be true or false"),
    ("keep", ["focus"], "'keep' must be an object"),  # was an AttributeError
    ("images", ["crop.png"], "'images' must be an object"),  # was an AttributeError
    ("images.deg", 7, "'images.deg' must be an image file's path"),
    ("prompt", 7, "'prompt' must be non-empty text"),
])
def test_a_field_of_the_wrong_type_or_range_is_its_lines_error(path, value, why, tmp_path):
    row = good_row(tmp_path)
    args = stage.parse_args([])
    ex = stage.parse_line(row, str(tmp_path), args)
    assert ex["ref"]["focus_w"] == -20.0 and ex["clip"] == [0.6, 0.5]
    with pytest.raises(ValueError, match=why):
        stage.parse_line(with_field(row, path, value), str(tmp_path), args)


def test_bad_lines_and_repeated_ids_go_to_errors_jsonl_and_the_run_goes_on(tiny_llava, tmp_path):
    rows = [good_row(tmp_path, 0), good_row(tmp_path, 1), good_row(tmp_path, 0),  # x0 again: line 3
            with_field(good_row(tmp_path, 2), "ref.focus_w", True), None, with_field(good_row(tmp_path, 3), "clip.crop", "0.6"),
            with_field(good_row(tmp_path, 4), "keep", ["focus"]), with_field(good_row(tmp_path, 5), "id", True),
            good_row(tmp_path, 6)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join("{broken\n" if r is None else json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "p2dpo"
    stage.main(list(map(str, ["--model", tiny_llava, "--data", data, "--out", out, "--effective-batch", 3,
                              "--batch-size", 3, "--lora-rank", 2, "--epochs", 1])))
    errors = [json.loads(line) for line in open(out / "errors.jsonl")]
    assert [(e["line"], e["id"]) for e in errors] == [(3, "x0"), (4, "x2"), (5, None), (6, "x3"), (7, "x4"), (8, True)]
    assert all(e["error"].startswith(f"{data}:{e['line']}: ") for e in errors)
    assert "id 'x0' repeats line 1" in errors[0]["error"] and "'ref.focus_w'" in errors[1]["error"]
    assert "'clip.crop'" in errors[3]["error"] and "'keep'" in errors[4]["error"] and "'id'" in errors[5]["error"]
    recorded = json.loads((out / "args.json").read_text())
    assert recorded["lines"] == 3 and recorded["skipped"] == 6 and (out / "model.safetensors").exists()


def test_an_effective_batch_the_batch_size_cannot_make_is_said(tiny_llava, tmp_path, capsys):
    """--effective-batch 3 with --batch-size 2 on one process trains with 2 x 2 = 4 lines a step: the run says so
    (it used to train with 4 silently), and args.json records the batch it used."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(good_row(tmp_path, i)) + "\n" for i in range(3)))
    out = tmp_path / "p2dpo"
    stage.main(list(map(str, ["--model", tiny_llava, "--data", data, "--out", out, "--effective-batch", 3,
                              "--batch-size", 2, "--lora-rank", 2, "--epochs", 1])))
    assert "--effective-batch 3 is not --batch-size 2 x 1 processes" in capsys.readouterr().out
    assert json.loads((out / "args.json").read_text())["global_batch"] == 4


def test_every_line_bad_ends_the_run_with_the_errors_kept_and_the_fix_runs(tiny_llava, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(with_field(good_row(tmp_path), "image", "moved.png")) + "\n")
    argv = list(map(str, ["--model", tiny_llava, "--data", data, "--out", tmp_path / "p2dpo", "--lora-rank", 2]))
    with pytest.raises(SystemExit, match="no usable line .*all 1 lines were left out"):
        stage.main(argv)
    assert "moved.png" in json.loads((tmp_path / "p2dpo" / "errors.jsonl").read_text())["error"]
    data.write_text(json.dumps(good_row(tmp_path)) + "\n")  # the image put back: the same command now trains
    stage.main(argv + ["--stop-after", "1"])
    assert (tmp_path / "p2dpo" / "errors.jsonl").read_text() == "" and (tmp_path / "p2dpo" / "checkpoint.pt").exists()


@pytest.mark.parametrize("flags, why", [
    (["--resume", "--overwrite"], "--resume continues the run in --out and --overwrite starts it over"),
    (["--no-focus", "--no-robust"], "--no-focus with --no-robust leaves nothing to train"),
    (["--beta", "0"], "--beta 0"), (["--lr", "0"], "--lr 0"), (["--lora-alpha", "0"], "--lora-alpha 0"),
    (["--max-grad-norm", "0"], "--max-grad-norm 0"), (["--w-base", "0"], "--w-base 0"),
    (["--alpha-max", "0.6"], "--alpha-max above --w-base gives a branch a negative weight"),
])
def test_flags_that_contradict_or_train_nothing_are_refused_before_anything_loads(flags, why, capsys):
    with pytest.raises(SystemExit):
        stage.parse_args(flags)
    assert why in capsys.readouterr().err
    for fine in (["--no-focus"], ["--lora-rank", "0", "--lora-alpha", "0"], ["--alpha-max", "0.6", "--no-ddw"]):
        stage.parse_args(fine)

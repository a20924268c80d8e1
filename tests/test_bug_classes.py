"""Guards against the bugs a forker is most likely to plant, each checked against an expectation computed
here, independently of the module's own helpers: the paper's formula in plain Python floats, a naive
token-by-token decoder written below, images rebuilt with numpy/PIL from the paper's definitions.

Classes (issue 17): the sign and direction of every loss term; L_total as a mean over the global batch;
the nucleus applied to the contrasted distribution; resume by id; which image and prompt each role of a
pair saw; the two CLIP scores read in order; the LoRA scale alpha / r in the forward and the merge.
dev/plant_bugs.py plants these bugs (and more) one at a time and runs this file.
"""
import json
import math
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_script, naive_sample

s02 = load_script("02_make_pairs.py")
s04 = load_script("04_train_calibrated_dpo.py")


def logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ---- the loss terms: golden values (unequal inputs, non-default hyperparameters) and gradient directions ----
PI_W, PI_L, REF_W, REF_L = [-12.5, -30.0, -7.25], [-14.0, -28.5, -9.0], [-13.0, -29.0, -8.0], [-13.5, -29.5, -8.5]


def test_dpo_loss_golden_beta_03():
    beta = 0.3
    losses, chosen, rejected = s04.dpo_loss(PI_W, PI_L, REF_W, REF_L, beta)
    for i in range(3):
        z = beta * ((PI_W[i] - REF_W[i]) - (PI_L[i] - REF_L[i]))
        assert losses[i].item() == pytest.approx(-logsig(z), abs=1e-6)
        assert chosen[i].item() == pytest.approx(beta * (PI_W[i] - REF_W[i]), abs=1e-6)
        assert rejected[i].item() == pytest.approx(beta * (PI_L[i] - REF_L[i]), abs=1e-6)
    assert losses[0].item() == pytest.approx(0.5543552, abs=1e-6)  # z = 0.3 * (0.5 + 0.5) = 0.3: log(1 + e^-0.3)


def test_dpo_loss_gradient_direction():
    """d DPO / d log pi(y_w) = -beta * sigmoid(-z) < 0 (raising y_w lowers the loss), d / d log pi(y_l) = -that."""
    beta = 0.25
    pi_w = torch.tensor(PI_W, requires_grad=True)
    pi_l = torch.tensor(PI_L, requires_grad=True)
    s04.dpo_loss(pi_w, pi_l, REF_W, REF_L, beta)[0].sum().backward()
    for i in range(3):
        z = beta * ((PI_W[i] - REF_W[i]) - (PI_L[i] - REF_L[i]))
        assert pi_w.grad[i].item() == pytest.approx(-beta * sigmoid(-z), abs=1e-6) and pi_w.grad[i] < 0
        assert pi_l.grad[i].item() == pytest.approx(beta * sigmoid(-z), abs=1e-6) and pi_l.grad[i] > 0


AUG, DEG, RAUG, RDEG = [-10.0, -20.0, -5.5], [-12.0, -19.0, -6.0], [-11.0, -21.0, -5.0], [-11.5, -20.0, -7.0]


def test_calibration_loss_golden_and_direction():
    """L_calib = -log sigmoid(beta * [(aug - deg) - (ref_aug - ref_deg)]): falls as log pi(y_w | I_aug, P_enh)
    rises and as log pi(y_w | I_deg, P) falls."""
    beta = 0.2
    aug = torch.tensor(AUG, requires_grad=True)
    deg = torch.tensor(DEG, requires_grad=True)
    loss = s04.calibration_loss(aug, deg, RAUG, RDEG, beta)
    loss.sum().backward()
    for i in range(3):
        z = beta * ((AUG[i] - DEG[i]) - (RAUG[i] - RDEG[i]))
        assert loss[i].item() == pytest.approx(-logsig(z), abs=1e-6), (i, loss[i].item(), -logsig(z))
        assert aug.grad[i].item() == pytest.approx(-beta * sigmoid(-z), abs=1e-6) and aug.grad[i] < 0
        assert deg.grad[i].item() == pytest.approx(beta * sigmoid(-z), abs=1e-6) and deg.grad[i] > 0
    assert loss[0].item() == pytest.approx(0.5543552, abs=1e-6)  # z = 0.2 * (2 - 0.5) = 0.3: log(1 + e^-0.3)


def test_ddw_weights_golden():
    """alpha = alpha_max * tanh((crop / image - 1) / tau): the focus branch gains when the crop scores higher."""
    w_f, w_r = s04.ddw_weights([0.6, 0.4, 0.5], [0.5, 0.5, 0.5], 0.4, 0.15, 0.2)
    for i, (c, im) in enumerate(((0.6, 0.5), (0.4, 0.5), (0.5, 0.5))):
        alpha = 0.15 * math.tanh((c / im - 1) / 0.2)
        assert w_f[i].item() == pytest.approx(0.4 + alpha, abs=1e-6)
        assert w_r[i].item() == pytest.approx(0.4 - alpha, abs=1e-6)
    assert w_f[0] > w_r[0] and w_f[1] < w_r[1]


def p2dpo_inputs():
    """4 lines: both branches + CLIP, both without CLIP, focus only, robust only (log-probs all unequal)."""
    pi = dict(focus_w=[-10.0, -11.0, -9.0, 0.0], focus_l=[-12.0, -10.5, -9.5, 0.0], aug=[-8.0, -9.0, -7.0, 0.0],
              deg=[-9.0, -8.5, -7.5, 0.0], robust_w=[-15.0, -14.0, 0.0, -13.0], robust_l=[-14.0, -16.0, 0.0, -12.0])
    ref = dict(focus_w=[-10.5, -11.5, -8.0, 0.0], focus_l=[-11.0, -11.0, -10.0, 0.0], aug=[-8.5, -8.0, -7.5, 0.0],
               deg=[-8.0, -8.0, -8.0, 0.0], robust_w=[-14.5, -15.0, 0.0, -13.5], robust_l=[-14.5, -15.5, 0.0, -12.5])
    has_f = [True, True, True, False]
    has_r = [True, True, False, True]
    clip = ([0.6, math.nan, 0.7, 0.2], [0.5, math.nan, 0.5, 0.4])
    return pi, ref, has_f, has_r, clip


def expected_p2dpo(pi, ref, has_f, has_r, clip, beta, lam, w_base, alpha_max, tau, ddw=True):
    out = []
    for i in range(4):
        dpo_f = -logsig(beta * ((pi["focus_w"][i] - ref["focus_w"][i]) - (pi["focus_l"][i] - ref["focus_l"][i])))
        calib = -logsig(beta * ((pi["aug"][i] - pi["deg"][i]) - (ref["aug"][i] - ref["deg"][i])))
        dpo_r = -logsig(beta * ((pi["robust_w"][i] - ref["robust_w"][i]) - (pi["robust_l"][i] - ref["robust_l"][i])))
        if has_f[i] and has_r[i]:
            if ddw and not math.isnan(clip[0][i]):
                alpha = alpha_max * math.tanh((clip[0][i] / clip[1][i] - 1) / tau)
            else:
                alpha = 0.0
            w_f, w_r = w_base + alpha, w_base - alpha
        else:
            w_f, w_r = float(has_f[i]), float(has_r[i])
        out.append(w_f * (dpo_f + lam * calib) * has_f[i] + w_r * dpo_r * has_r[i])
    return out


@pytest.mark.parametrize("ddw", [True, False])
def test_p2dpo_loss_golden_non_default(ddw):
    pi, ref, has_f, has_r, clip = p2dpo_inputs()
    hp = dict(beta=0.3, lambda_calib=0.7, w_base=0.45, alpha_max=0.15, tau=0.2)
    t = {k: torch.tensor(v) for k, v in pi.items()}
    r = {k: torch.tensor(v) for k, v in ref.items()}
    losses, d = s04.p2dpo_loss(t, r, torch.tensor(has_f), torch.tensor(has_r), torch.tensor(clip[0]),
                               torch.tensor(clip[1]), ddw=ddw, **hp)
    expected = expected_p2dpo(pi, ref, has_f, has_r, clip, hp["beta"], hp["lambda_calib"], hp["w_base"],
                              hp["alpha_max"], hp["tau"], ddw)
    np.testing.assert_allclose(losses.numpy(), expected, atol=1e-6, rtol=0)


def test_p2dpo_loss_gradient_direction_per_term():
    """Through the full loss: each log-prob it reads moves it the way the paper says."""
    pi, ref, has_f, has_r, clip = p2dpo_inputs()
    t = {k: torch.tensor(v, requires_grad=True) for k, v in pi.items()}
    r = {k: torch.tensor(v) for k, v in ref.items()}
    losses, _ = s04.p2dpo_loss(t, r, torch.tensor(has_f), torch.tensor(has_r), torch.tensor(clip[0]),
                               torch.tensor(clip[1]), beta=0.3, lambda_calib=0.7)
    losses.sum().backward()
    for k, sign in (("focus_w", -1), ("focus_l", 1), ("aug", -1), ("deg", 1), ("robust_w", -1), ("robust_l", 1)):
        present = has_r if k.startswith("robust") else has_f
        for i in range(4):
            g = t[k].grad[i].item()
            assert (g * sign > 0) if present[i] else g == 0.0, (k, i, g)


# ---- L_total: a mean over the global batch, whatever its size ----
def write_identical_lines(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for role in ("image", "crop", "deg", "noise"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{role}.png")
    ref = dict(focus_w=-20.0, focus_l=-21.0, calib_aug_w=-19.0, calib_deg_w=-22.0, robust_w=-18.0, robust_l=-23.0)
    row = {"image": "image.png", "prompt": "describe the image .", "prompt_enh": "mainly describe the image .",
           "images": {"crop": "crop.png", "deg": "deg.png", "noise": "noise.png"},
           "focus": {"chosen": "a red circle", "rejected": "a blue square"},
           "robust": {"chosen": "yes", "rejected": "no"}, "ref": ref,
           "clip": {"crop": 0.6, "image": 0.5}, "keep": {"focus": True, "robust": True}}
    with open(folder / "train.jsonl", "w") as f:
        f.writelines(json.dumps(dict(row, id=f"x{i}")) + "\n" for i in range(n))
    return folder / "train.jsonl"


def run_04_in_process(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["04_train_calibrated_dpo.py", *map(str, argv)])
    s04.main()


def test_total_loss_is_a_mean_over_the_global_batch(tiny_llava, tmp_path, monkeypatch):
    """The same line 4 times: a global batch of 4 (2 x 2 accumulation) has the gradient of a batch of 1, so the
    logged step-1 grad norm (before clipping) must agree. A sum over lines would give 4x, a mean per micro-batch
    2x. Dropout off: every line sees the same network."""
    data = write_identical_lines(tmp_path / "d", 4)
    common = ("--model", tiny_llava, "--data", data, "--lora-dropout", 0, "--stop-after", 1, "--device", "cpu")
    run_04_in_process(monkeypatch, *common, "--out", tmp_path / "one", "--effective-batch", 1, "--batch-size", 1)
    run_04_in_process(monkeypatch, *common, "--out", tmp_path / "four", "--effective-batch", 4, "--batch-size", 2)
    one, four = (json.loads(open(tmp_path / n / "metrics.jsonl").readline()) for n in ("one", "four"))
    assert one["grad_norm"] > 0
    assert four["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5), (one, four)
    assert four["loss"] == pytest.approx(one["loss"], abs=1e-6)


# ---- the two CLIP scores, read in order ----
def test_parse_line_reads_clip_crop_then_image(tmp_path):
    data = write_identical_lines(tmp_path, 1)
    row = json.loads(open(data).readline())
    row["clip"] = {"image": 0.3, "crop": 0.9, "ratio": 3.0}
    ex = s04.parse_line(row, str(tmp_path), s04.parse_args([]))
    assert ex["clip"] == [pytest.approx(0.9), pytest.approx(0.3)]  # (crop, image): DDW leans to focus (r = 3)
    calib = {"aug": "calib_aug_w", "deg": "calib_deg_w"}
    assert ex["ref"] == {k: row["ref"][calib.get(k, k)] for k in s04.TERMS}


# ---- LoRA: h = W x + (alpha / r) B A x, and the merge uses the same alpha / r ----
def test_lora_forward_and_merge_use_alpha_over_r():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    w0 = base.weight.detach().clone()
    layer = s04.LoRALinear(base, r=4, alpha=12, dropout=0.0)  # alpha / r = 3 (r / alpha = 1/3)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(5, 4))
    x = torch.randn(3, 6)
    a = layer.lora_A.detach().double()
    b = layer.lora_B.detach().double()
    expected = x.double() @ (w0.double() + 3.0 * b @ a).T + base.bias.detach().double()
    np.testing.assert_allclose(layer(x).detach().double().numpy(), expected.numpy(), atol=1e-5)
    holder = torch.nn.Sequential(layer)
    s04.merge_lora(holder)
    assert type(holder[0]) is torch.nn.Linear
    np.testing.assert_allclose(holder[0].weight.detach().double().numpy(), (w0.double() + 3.0 * b @ a).numpy(), atol=1e-6)


def test_add_lora_wraps_only_the_language_model_linears(tiny_llava):
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    s04.add_lora(model, 4, 8, 0.0)
    wrapped = {n for n, m in model.named_modules() if isinstance(m, s04.LoRALinear)}
    expected = {n.rsplit(".base", 1)[0] for n in linears if ".language_model." in f".{n}" and "lm_head" not in n}
    assert wrapped == expected and wrapped, (wrapped, expected)
    assert all(m.scale == 2.0 for n, m in model.named_modules() if isinstance(m, s04.LoRALinear))


# ---- stage 02: a naive decoder, written here, that every response must equal token for token ----
@torch.no_grad()
def naive_decode(model, processor, prompt, images, amateur, gen, n_new, temperature, top_p, lambda_ca,
                 beta_head=0.1, suppress=(4,), eos=(3,)):
    """No cache, no batch: one full forward per token of (expert, amateur) rows. Returns the token ids."""
    text = s02.chat_prompt(processor, prompt, len(images))
    ctx = [processor(text=[text], images=im, return_tensors="pt") for im in ([images] + ([amateur] if amateur else []))]
    new = []
    for _ in range(n_new):
        logits = []
        for enc in ctx:
            ids = torch.cat([enc["input_ids"], torch.tensor([new], dtype=torch.long)], 1)
            feed = dict(enc, input_ids=ids, attention_mask=torch.ones_like(ids))
            logits.append(model(**feed).logits[0, -1].float())
        ep = logits[0].clone()
        ep[list(suppress)] = float("-inf")
        if amateur:
            p = torch.softmax(ep, -1)
            ca = (1 + lambda_ca) * ep - lambda_ca * logits[1]
            ep = torch.where(p >= beta_head * p.max(), ca, torch.tensor(float("-inf")))
        u = torch.rand(1, generator=gen).item()
        tok = naive_sample(ep, u, temperature, top_p)
        if tok in eos:
            break
        new.append(tok)
    return new


def rand_image(seed, size=32):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def llava(tiny_llava):
    return s02.load_model(tiny_llava, "cpu")


def test_contrastive_decode_samples_the_nucleus_of_the_contrasted_logits(llava):
    """top_p on logits_CA (ours, as VCD), not on the expert's logits before the contrast; lambda_ca 3, T 1,
    top_p 0.5."""
    model, processor = llava
    images = [rand_image(1), rand_image(2)]
    noise = [rand_image(11), rand_image(12)]
    prompt = "describe the image ."
    text = s02.chat_prompt(processor, prompt)
    inputs = processor(text=[text, text] * 2, images=images + noise, padding=True, return_tensors="pt")
    gens = [torch.Generator().manual_seed(7 + i) for i in range(2)]
    got = s02.decode(model, dict(inputs), gens, {3}, 10, 1.0, 0.5, lambda_ca=3.0, beta_head=0.1, suppress_ids=[4])
    for i in range(2):
        want = naive_decode(model, processor, prompt, [images[i]], [noise[i]], torch.Generator().manual_seed(7 + i),
                            10, 1.0, 0.5, 3.0)
        assert got[i] == want, (i, got[i], want)


def paper_views(image, bbox, sigma, seed, key):
    """The paper's I_crop, I_deg, I_noise (as 02's header defines them) from numpy/PIL, not from the module."""
    a = np.asarray(image).astype(np.float64)
    deg = np.asarray(image).copy()
    x1, y1, x2, y2 = bbox
    deg[y1:y2, x1:x2] = np.round(a.reshape(-1, 3).mean(0)).astype(np.uint8)
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    x = np.asarray(image, dtype=np.float32) / 255.0
    noisy = np.clip(x + sigma * rng.standard_normal(x.shape, dtype=np.float32), 0, 1)
    return {"crop": image.crop(tuple(bbox)), "deg": Image.fromarray(deg),
            "noise": Image.fromarray(np.round(noisy * 255.0).astype(np.uint8))}


def test_each_role_of_a_pair_saw_its_own_images_and_prompt(llava, tmp_path):
    """make_pairs on two instances, then every response recomputed by the naive decoder from its
    (seed, id, role) generator and the images the paper says it sees; non-default lambda_ca, T and sigma so that each
    image matters. focus: y_w = M(I_aug = (I, I_crop), P_enh), y_l = M(I_deg, P); robust: y_w = CA of
    expert (I, P) over amateur (I_noise, P), y_l = M(I_noise, P), init = M(I, P)."""
    model, processor = llava
    folder = tmp_path / "d"
    folder.mkdir()
    rows = []
    for i in range(2):
        rand_image(20 + i, 40).save(folder / f"img{i}.png")
        rows.append({"id": f"k{i}", "image": f"img{i}.png", "prompt": "what colour is the object ?",
                     "bbox": [4, 6, 30, 28]})
    (folder / "crops.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = s02.parse_args(["--out", str(folder / "pairs.jsonl"), "--seed", "3", "--sigma", "0.5", "--lambda-ca",
                           "3", "--temperature", "1", "--max-new-tokens", "6",
                           "--focus-temperature", "1", "--focus-max-new-tokens", "6"])
    args.robust_instruction = s02.ROBUST_INSTRUCTION  # main() resolves it: a real model's default
    batch, errors = s02.read_instances(folder / "crops.jsonl", ("image", "prompt", "bbox"))
    out = s02.make_pairs(model, processor, args, batch)
    tok = processor.tokenizer
    for row, res in zip(rows, out):
        assert isinstance(res, dict), res
        key = row["id"]
        image = Image.open(folder / row["image"]).convert("RGB")
        views = paper_views(image, row["bbox"], 0.5, 3, key)
        for name, view in views.items():  # the files written are the paper's images
            assert np.array_equal(np.asarray(Image.open(folder / res["images"][name])), np.asarray(view)), name
        p, p_enh = row["prompt"], s02.ENH_TEMPLATE.format(question=row["prompt"])
        assert res["prompt_enh"] == p_enh
        p_rob = f"{s02.ROBUST_INSTRUCTION} {p}"  # the authors' instruction before P, robust branch only
        assert res["prompt_robust"] == p_rob  # recorded, for 03 to score the pair in its own context
        roles = {"focus_w": (p_enh, [image, views["crop"]], None), "focus_l": (p, [views["deg"]], None),
                 "robust_w": (p_rob, [image], [views["noise"]]), "robust_l": (p_rob, [views["noise"]], None),
                 "init": (p_rob, [image], None)}
        said = {}
        for role, (prompt, images, amateur) in roles.items():
            gen = torch.Generator().manual_seed(zlib.crc32(f"3/{key}/{role}".encode()))
            ids = naive_decode(model, processor, prompt, images, amateur, gen, 6, 1.0, 0.9, 3.0)
            said[role] = tok.decode(ids, skip_special_tokens=True).strip()
        assert res["focus"] == {"chosen": said["focus_w"], "rejected": said["focus_l"]}, (key, res["focus"], said)
        assert res["robust"] == {"chosen": said["robust_w"], "rejected": said["robust_l"], "init": said["init"]}, \
            (key, res["robust"], said)


# ---- resume: rows already written are skipped by id, never by count ----
@pytest.mark.parametrize("script", ["01_attention_crop.py", "02_make_pairs.py", "03_filter.py"])
def test_run_rows_resumes_by_id(script, tmp_path):
    """A crashed 2-process run leaves its parts holding ids b and d (not a prefix of the input): a resumed run
    must decode exactly a, c, e and write every id once, in input order."""
    mod = load_script(script)
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.rank0").write_text(json.dumps({"id": "b", "v": "old"}) + "\n")
    (tmp_path / "out.jsonl.rank1").write_text(json.dumps({"id": "d", "v": "old"}) + "\n{\"id\": \"tr")  # torn
    rows = [{"id": k, "_file": "in.jsonl", "_line": n} for n, k in enumerate("abcde", 1)]
    seen = []

    def work(batch):
        seen.extend(r["id"] for r in batch)
        return [{"id": r["id"], "v": "new"} for r in batch]
    result = mod.run_rows(rows, [], work, out, 2)
    assert seen == ["a", "c", "e"], seen
    assert [(r["id"], r["v"]) for r in result] == [("a", "new"), ("b", "old"), ("c", "new"), ("d", "old"),
                                                   ("e", "new")]
    written = [json.loads(line)["id"] for line in open(out)]
    assert written == list("abcde"), written


# ---- stage 04: which context each loss term is scored in ----
def test_term_batches_score_each_term_in_its_context(llava, tmp_path):
    """The paper: DPO_focus on (I, P), L_calib on (I_aug = (I, I_crop), P_enh) and (I_deg, P) with y_w, DPO_rob on
    (I_noise, P). Checked on the pixels and the text of every row the trainer feeds the policy."""
    model, processor = llava
    data = write_identical_lines(tmp_path, 1)
    row = json.loads(open(data).readline())
    ex = s04.parse_line(row, str(tmp_path), s04.parse_args([]))
    pil = {k: Image.open(tmp_path / f"{k}.png").convert("RGB") for k in ("image", "crop", "deg", "noise")}
    f, r = row["focus"], row["robust"]
    expected = {("focus_w", "focus_l"): ([pil["image"]] * 2, row["prompt"], [f["chosen"], f["rejected"]]),
                ("robust_w", "robust_l"): ([pil["noise"]] * 2, row["prompt"], [r["chosen"], r["rejected"]]),
                ("aug",): ([pil["image"], pil["crop"]], row["prompt_enh"], [f["chosen"]]),
                ("deg",): ([pil["deg"]], row["prompt"], [f["chosen"]])}
    tok = processor.tokenizer
    for shared in (False, True):  # a row per response (benchmarks); the default: a pair's two responses in one row
        got = {keys: batch for keys, idx, score, batch in s04.term_batches(processor, [ex], shared_prefix=shared)}
        assert set(got) == set(expected), got.keys()
        for keys, (images, prompt, responses) in expected.items():
            inputs, mask = got[keys]  # mask: bool (a row per response) or 0 / 1 / 2 (prompt / y_w / y_l)
            packed = shared and len(keys) == 2
            rows = [(0, 1), (0, 2)] if packed else [(i, True) for i in range(len(responses))]
            images = images[:1] if packed else images  # a pair's image once, in its one row
            pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
            assert torch.equal(inputs["pixel_values"], pixels), (shared, keys)
            for (i, part), response in zip(rows, responses):
                ids = inputs["input_ids"][i]
                assert tok.decode(ids[mask[i] == part], skip_special_tokens=True).strip() == response, keys
                text = tok.decode(ids[mask[i] == 0], skip_special_tokens=True)
                assert prompt in text and (prompt == row["prompt_enh"] or "mainly" not in text), (keys, text)


# ---- stage 04: sharding a global batch over ranks ----
def test_micro_batches_give_every_line_of_the_global_batch_once():
    lines = [{"id": i, "focus": i % 3 != 0, "robust": i % 2 == 0} for i in range(10)]
    batch = [7, 2, 9, 0, 4, 1, 8, 3]
    for world, bs, accum in ((1, 4, 2), (2, 2, 2), (4, 1, 2), (2, 4, 1)):
        seen = []
        for rank in range(world):
            for mb in s04.micro_batches(lines, batch, rank, world, bs, accum):
                assert len([w for _, w in mb if w > 0]) <= bs
                seen += [ex["id"] for ex, w in mb if w > 0]
        assert sorted(seen) == sorted(batch), (world, bs, accum, seen)


# ---- stage 03: the two CLIP scores, stored under their names ----
def test_clip_scores_crop_and_image_in_order():
    """A fake CLIP whose image embedding is the mean (R, G) colour and whose text embedding is (1, 0):
    CLIPScore(red crop) = 2.5, CLIPScore(yellow image) = 2.5 cos 45 deg."""
    s03 = load_script("03_filter.py")

    class Clip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def encode_text(self, tokens):
            return torch.tensor([[1.0, 0.0]]).expand(len(tokens), 2)

        def encode_image(self, pixels):
            return pixels.mean((2, 3))[:, :2]
    preprocess = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)
    tokenizer = lambda prompts: torch.zeros(len(prompts), 3, dtype=torch.long)
    image = Image.new("RGB", (8, 8), (255, 255, 0))
    crop = Image.new("RGB", (8, 8), (255, 0, 0))  # (preprocess resizes; this one does not)
    [got] = s03.clip_scores((Clip(), preprocess, tokenizer), ["p"], [image], [crop])
    assert got["crop"] == pytest.approx(2.5, abs=1e-6)
    assert got["image"] == pytest.approx(2.5 / math.sqrt(2), abs=1e-6)
    assert got["ratio"] == pytest.approx(math.sqrt(2), abs=1e-6)


# ---- stage 02: a null pair; stage 03: the filter's band is closed ----
def test_identical_responses_make_a_null_pair_and_the_line_stays():
    said = {"focus_w": "a red circle", "focus_l": "a red circle", "robust_w": "yes", "robust_l": "no", "init": "yes"}
    focus, robust = s02.preference_pairs(said)
    assert focus is None and robust == {"chosen": "yes", "rejected": "no", "init": "yes"}
    focus, robust = s02.preference_pairs(dict(said, focus_l="a blue square", robust_l="yes"))
    assert focus == {"chosen": "a red circle", "rejected": "a blue square"} and robust is None


def test_filter_keeps_the_band_ends_and_drops_outside():
    """The authors' filter: kept when PPL < max_ppl and theta_low <= M <= theta_high (closed band, open PPL bound)."""
    s03 = load_script("03_filter.py")
    assert s03.filter_reasons(2.0, 2.0, 0.25, 2.5, -0.5, 0.25) == []
    assert s03.filter_reasons(2.0, 2.0, -0.5, 2.5, -0.5, 0.25) == []
    assert s03.filter_reasons(2.5, 1.0, 0.3, 2.5, -0.5, 0.25) == ["ppl chosen", "margin high"]
    assert s03.filter_reasons(1.0, 2.5, -0.75, 2.5, -0.5, 0.25) == ["ppl rejected", "margin low"]
    assert s03.mean_margin(-6.0, 3, -10.0, 4) == pytest.approx(-2.0 + 2.5)
    assert s03.perplexity(-6.0, 3) == pytest.approx(math.exp(2.0))


def test_next_token_equals_the_naive_sampler_at_several_temperatures():
    """softmax(logits / T) on the top-p nucleus, inverse CDF: the module's batched sampler against naive_sample
    above (T 0.5 and 2 make a forgotten or misplaced temperature show; the stage tests run at T 1)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 30, generator=g) * 2
    uniforms = torch.rand(6, generator=g)
    for temperature, top_p in ((0.5, 0.8), (2.0, 0.6), (1.0, 1.0)):
        got = s02.next_token(logits, uniforms, temperature, top_p).tolist()
        want = [naive_sample(logits[i], uniforms[i].item(), temperature, top_p) for i in range(6)]
        assert got == want, (temperature, top_p, got, want)

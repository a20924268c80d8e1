"""Bugs a forker of one stage makes that passed every earlier test (issue 24), and the classes behind them.

Each test checks a stage's behaviour, through its functions or the files it writes, against an expectation
computed here: a closed form, a naive reference written below, pixels rebuilt with numpy. Classes:
  04  the learning rate applied at every optimizer step (linear warm-up, then transformers' cosine); clipping
      on the accumulated gradient (= one big batch's); zero_grad between steps; merge = the eval-mode forward;
      every ref key read as stage 03 writes it (fixtures made by stage 03 itself).
  02  each branch's decoding settings, in pairs.jsonl's "gen", in the decode calls and in the tokens; the
      images each call was fed, against the views rebuilt with numpy.
  05  each sigma of the noise sweep, in POPE and in the benchmarks' script (f05b_): the image fed (rebuilt
      with numpy noise), its answer and its label; HallusionBench's question pairs.
  01  the grid cell of every pixel by its centre; a tie in the crop score goes to the first ratio.
  joins  a bad line placed before good ones: 03's scores, 02's results, 05's answers, run_rows' output.
  shared  a repeated id in any type; append_jsonl on disk at once.
Test names carry their stage (f01_ ... f05_, fsh_ for the shared blocks): dev/plant_bugs.py runs a stage's own.
"""
import inspect
import json
import math
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, load_script, naive_sample, token_by_token_logprob

torch.set_num_threads(1)
s01 = load_script("01_attention_crop.py")
s02 = load_script("02_make_pairs.py")
s03 = load_script("03_filter.py")
s04 = load_script("04_train_calibrated_dpo.py")
s05 = load_script("05_eval_pope.py")


def benchmarks_05():
    """05's benchmark code: 05_eval_benchmarks.py where the stage is split, else 05_eval_pope.py."""
    if (ROOT / "05_eval_benchmarks.py").exists():
        return load_script("05_eval_benchmarks.py")
    return s05


def rand_image(seed, w=40, h=32):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def numpy_noise(image, sigma, seed, key):
    """I_noise = clip(I + sigma * eps, 0, 1) in [0, 1] pixels, eps ~ N(0, 1) from numpy seeded by (seed,
    crc32(key)) (the paper's I_noise; the seeding is the stages' documented choice)."""
    if sigma == 0:
        return image.copy()
    rng = np.random.default_rng([seed, zlib.crc32(str(key).encode())])
    x = np.asarray(image, dtype=np.float32) / 255.0
    noisy = np.clip(x + sigma * rng.standard_normal(x.shape, dtype=np.float32), 0, 1)
    return Image.fromarray(np.round(noisy * 255.0).astype(np.uint8))


def pixels(processor, images):
    """The processor's pixel_values of images, one (C, H, W) tensor each (LLaVA: one row per image)."""
    return list(processor.image_processor(images=images, return_tensors="pt")["pixel_values"])


def same_multiset(got, want):
    """Every tensor of `want` appears in `got` exactly (as many times), whatever the order."""
    left = list(want)
    for g in got:
        k = next((i for i, w in enumerate(left) if w.shape == g.shape and torch.equal(w, g)), None)
        if k is None:
            return False
        left.pop(k)
    return not left


@pytest.fixture(scope="module")
def llava(tiny_llava):
    return s02.load_model(tiny_llava, "cpu")


# ==== 01: pixels -> grid cells by their centres; the crop's tie rule ====
def centre_cells(n, resized, frame, grid):
    """The cell of each of n original pixels along one axis, with exact fractions: pixel i's centre i + 1/2
    scaled onto the resized side, less the centre crop's offset; -1 where it falls outside the frame."""
    offset = (resized - frame) // 2
    out = []
    for i in range(n):
        u = Fraction(2 * i + 1, 2) * resized / n - offset
        out.append(math.floor(u * grid / frame) if 0 <= u < frame else -1)
    return out


@pytest.mark.parametrize("X, Y", [(30, 30), (60, 30), (30, 45), (55, 30), (30, 55)])
def test_f01_pixel_cells_map_pixel_centres(X, Y):
    """CLIP's shortest edge 32 (the long side truncated), centre crop 32x32, a 4x4 grid: a side of 30 puts a
    cell boundary at 7.5 px, so a half-pixel shift (corners for centres) moves pixel 7 to another cell."""
    from transformers import CLIPImageProcessor
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    short = min(X, Y)
    rx, ry = (32 * X // short, 32 * Y // short)
    cols, rows, _ = s01.pixel_cells(ip, (X, Y), (4, 4), stretch=False)
    assert cols.tolist() == centre_cells(X, rx, 32, 4), (X, Y)
    assert rows.tolist() == centre_cells(Y, ry, 32, 4), (X, Y)
    # Qwen2.5-VL: the whole image stretched onto a 3 x 4 grid
    cols, rows, _ = s01.pixel_cells(None, (X, Y), (3, 4), stretch=True)
    assert cols.tolist() == centre_cells(X, X, X, 4) and rows.tolist() == centre_cells(Y, Y, Y, 3), (X, Y)


@pytest.mark.parametrize("fill", [1.0, 0.0])
def test_f01_a_tie_between_ratios_goes_to_the_first(fill):
    """A flat map: every window of every ratio scores exactly 0 (its mass less its neighbours', over its
    area), so the first ratio wins; its window sits at the middle of the tied positions."""
    X, Y, base = 100, 80, 40
    attn = np.full((Y, X), fill)
    bbox, kind, r = s01.adaptive_crop(attn, (X, Y), base, [1.0, 1.2, 1.5], step=4)
    assert (kind, r) == ("window", 1.0), (kind, r, bbox)
    assert bbox == [30, 20, 70, 60], bbox  # positions x 0..60, y 0..40: their middle


# ==== 02: each branch's decoding settings and images ====
@torch.no_grad()
def naive_decode(model, processor, prompt, images, amateur, gen, n_new, temperature, top_p, lambda_ca,
                 beta_head, suppress=(4,), eos=(3,)):
    """One full forward per token, no cache, no batch; expert (and amateur) logits -> the paper's logits_CA on
    V_head -> softmax(/ T) on the top-p nucleus -> inverse CDF of one uniform per step (T 0: argmax)."""
    text = s02.chat_prompt(processor, prompt, len(images))
    ctx = [processor(text=[text], images=im, return_tensors="pt") for im in [images] + ([amateur] if amateur else [])]
    new = []
    for _ in range(n_new):
        logits = []
        for enc in ctx:
            ids = torch.cat([enc["input_ids"], torch.tensor([new], dtype=torch.long)], 1)
            logits.append(model(**dict(enc, input_ids=ids, attention_mask=torch.ones_like(ids))).logits[0, -1].float())
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


def crops_file(folder, n, bad_first=False):
    folder.mkdir(parents=True, exist_ok=True)
    rows = [] if not bad_first else [{"id": "bad", "image": "img0.png", "prompt": "what colour is the object ?",
                                      "bbox": [30, 6, 4, 28]}]  # x2 < x1: that line's error
    for i in range(n):
        rand_image(30 + i).save(folder / f"img{i}.png")
        rows.append({"id": f"k{i}", "image": f"img{i}.png", "prompt": ["what colour is the object ?",
                                                                      "describe the image ."][i % 2],
                     "bbox": [4 + i, 6, 30, 28]})
    (folder / "crops.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "crops.jsonl", rows


SETTINGS_02 = dict(seed=4, sigma=0.3, lambda_ca=2.0, beta_head=0.2, temperature=0.7, top_p=0.8, max_new_tokens=5,
                   focus_temperature=0.0, focus_max_new_tokens=3)


def args_02(out, **kw):
    s = dict(SETTINGS_02, **kw)
    argv = ["--out", str(out)]
    for k, v in s.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    args = s02.parse_args(argv)
    args.robust_instruction = s02.ROBUST_INSTRUCTION  # main() resolves it: a real model's default
    return args


def test_f02_each_branch_decodes_with_its_own_settings_and_images(llava, tmp_path, monkeypatch):
    """Focus greedy (T 0) for 3 tokens, robustness at T 0.7, top-p 0.8, for 5 tokens, contrastive
    amplification at lambda_ca 2, beta_head 0.2 (none of them a default, no two alike): (1) pairs.jsonl's
    "gen" records them, "prompt_robust" the instructed P; (2) each decode call got its branch's settings and was fed exactly its branch's images
    (rebuilt with numpy: I, I_crop, I_deg, I_noise at sigma 0.3, seed 4); (3) every response equals the naive
    decoder at its branch's settings."""
    model, processor = llava
    data, rows = crops_file(tmp_path / "d", 2)
    args = args_02(tmp_path / "d" / "pairs.jsonl")
    calls = []
    decode = s02.decode

    def recording_decode(*a, **kw):
        bound = inspect.signature(decode).bind(*a, **kw)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        return decode(*a, **kw)
    monkeypatch.setattr(s02, "decode", recording_decode)
    batch, _ = s02.read_instances(data, ("image", "prompt", "bbox"))
    out = s02.make_pairs(model, processor, args, batch)
    # (1) the settings each line records
    for row, res in zip(rows, out):
        for k, v in SETTINGS_02.items():
            assert res["gen"][k] == v, (k, res["gen"])
        assert res["prompt_robust"] == f"{s02.ROBUST_INSTRUCTION} {row['prompt']}", res["prompt_robust"]
    # (2) each call: its settings, and its images
    views = {}
    for row in rows:
        image = Image.open(tmp_path / "d" / row["image"]).convert("RGB")
        x1, y1, x2, y2 = row["bbox"]
        deg = np.asarray(image).copy()
        deg[y1:y2, x1:x2] = np.round(np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(0)).astype(np.uint8)
        views[row["id"]] = dict(image=image, crop=image.crop((x1, y1, x2, y2)), deg=Image.fromarray(deg),
                                noise=numpy_noise(image, 0.3, 4, row["id"]))
    v = list(views.values())
    expected = {  # branch -> (images fed, temperature, max_new_tokens); robust: a plain and a contrastive call
        "focus": ([im for x in v for im in (x["image"], x["crop"])] + [x["deg"] for x in v], 0.0, 3),
        "robust": ([x["noise"] for x in v] + [x["image"] for x in v], 0.7, 5)}
    seen = []
    for call in calls:
        fed = list(call["inputs"]["pixel_values"])
        branch = next((b for b, (ims, *_) in expected.items() if same_multiset(fed, pixels(processor, ims))), None)
        assert branch is not None, "a decode call was fed images no branch shows"
        seen.append((branch, call["lambda_ca"]))
        _, temperature, max_new = expected[branch]
        assert (call["temperature"], call["max_new_tokens"]) == (temperature, max_new), (branch, call)
        assert call["top_p"] == 0.8 and (call["lambda_ca"] is None or call["beta_head"] == 0.2), (branch, call)
    assert sorted(seen, key=str) == [("focus", None), ("robust", 2.0), ("robust", None)], seen
    # (3) the tokens
    tok = processor.tokenizer
    for row, res in zip(rows, out):
        x = views[row["id"]]
        p = row["prompt"]
        p_rob = f"{s02.ROBUST_INSTRUCTION} {p}"
        roles = {"focus_w": (s02.ENH_TEMPLATE.format(question=p), [x["image"], x["crop"]], None, 0.0, 3),
                 "focus_l": (p, [x["deg"]], None, 0.0, 3),
                 "robust_w": (p_rob, [x["image"]], [x["noise"]], 0.7, 5),
                 "robust_l": (p_rob, [x["noise"]], None, 0.7, 5),
                 "init": (p_rob, [x["image"]], None, 0.7, 5)}
        said = {}
        for role, (prompt, images, amateur, temperature, n_new) in roles.items():
            gen = torch.Generator().manual_seed(zlib.crc32(f"4/{row['id']}/{role}".encode()))
            ids = naive_decode(model, processor, prompt, images, amateur, gen, n_new, temperature, 0.8, 2.0, 0.2)
            said[role] = tok.decode(ids, skip_special_tokens=True).strip()
        focus = None if said["focus_w"] == said["focus_l"] else {"chosen": said["focus_w"],
                                                                 "rejected": said["focus_l"]}
        robust = None if said["robust_w"] == said["robust_l"] else {
            "chosen": said["robust_w"], "rejected": said["robust_l"], "init": said["init"]}
        assert (res["focus"], res["robust"]) == (focus, robust), (row["id"], res["focus"], res["robust"], said)


def test_f02_a_bad_line_before_good_ones_keeps_each_id_with_its_pairs(llava, tmp_path):
    """[a bad bbox, k0, k1] in one batch: the first result is the bad line's error and k0, k1 get the lines
    each gets when decoded alone (a response depends on its own (seed, id, role) only)."""
    model, processor = llava
    data, _ = crops_file(tmp_path / "d", 2, bad_first=True)
    args = args_02(tmp_path / "d" / "pairs.jsonl", max_new_tokens=3)
    batch, errors = s02.read_instances(data, ("image", "prompt", "bbox"))
    assert [r["id"] for r in batch] == ["bad", "k0", "k1"] and not errors
    together = s02.make_pairs(model, processor, args, batch)
    assert isinstance(together[0], str) and "bbox" in together[0], together[0]
    for i in (1, 2):
        [alone] = s02.make_pairs(model, processor, args, [batch[i]])
        assert together[i]["id"] == batch[i]["id"]
        assert (together[i]["focus"], together[i]["robust"]) == (alone["focus"], alone["robust"]), batch[i]["id"]
        assert together[i]["images"] == alone["images"]


# ==== 03: every ref term in its own context; a bad line first (fixtures for 04 made here too) ====
ENH = "answer mainly based on the first image , refer to the cropping details of the second image if necessary : "
CONTEXT_03 = {  # ref key -> (branch, response, prompt key, the context's images)
    "focus_w": ("focus", "chosen", "prompt", ("image",)),
    "focus_l": ("focus", "rejected", "prompt", ("image",)),
    "calib_aug_w": ("focus", "chosen", "prompt_enh", ("image", "crop")),
    "calib_deg_w": ("focus", "chosen", "prompt", ("deg",)),
    "calib_aug_l": ("focus", "rejected", "prompt_enh", ("image", "crop")),
    "calib_deg_l": ("focus", "rejected", "prompt", ("deg",)),
    "robust_w": ("robust", "chosen", "prompt", ("noise",)),
    "robust_l": ("robust", "rejected", "prompt", ("noise",)),
    # the filter's: each robust response where 02 decoded it, after P' (prompt_robust)
    "robust_expert_w": ("robust", "chosen", "prompt_robust", ("image",)),
    "robust_own_l": ("robust", "rejected", "prompt_robust", ("noise",)),
}


def pairs_row(folder, i):
    for role, seed in (("image", 0), ("crop", 1), ("deg", 2), ("noise", 3)):
        rand_image(100 * i + seed, 36 if role != "crop" else 20, 30).save(folder / f"{role}{i}.png")
    prompt = ["describe the image .", "is there a red circle in the image ?"][i % 2]
    return {"id": f"p{i}", "image": f"image{i}.png", "prompt": prompt, "prompt_enh": ENH + prompt,
            "prompt_robust": "answer this question : " + prompt,
            "images": {"crop": f"crop{i}.png", "deg": f"deg{i}.png", "noise": f"noise{i}.png"},
            "focus": {"chosen": ["there is a red circle", "blue"][i % 2], "rejected": ["a square", "yes no"][i % 2]},
            "robust": {"chosen": ["yes", "a green cross"][i % 2], "rejected": ["no", "red"][i % 2], "init": "no"}}


@pytest.fixture(scope="module")
def stage03(tiny_llava, tmp_path_factory):
    """pairs.jsonl = [a line whose I_deg is missing, p0, p1] scored by stage 03 (main, no CLIP, a filter that
    keeps everything): (folder, train.jsonl's lines by id, errors, the pairs rows by id)."""
    folder = tmp_path_factory.mktemp("s03")
    rows = [pairs_row(folder, i) for i in range(2)]
    bad = dict(rows[0], id="bad", images=dict(rows[0]["images"], deg="missing.png"))
    with open(folder / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in [bad, *rows])
    out = folder / "out" / "train.jsonl"
    s03.main(["--model", str(tiny_llava), "--clip", "none", "--data", str(folder / "pairs.jsonl"), "--out", str(out),
              "--batch-size", "8", "--max-ppl", "1e9", "--margin-low=-1e9", "--margin-high", "1e9"])
    lines = {x["id"]: x for x in map(json.loads, open(out))}
    errors = [json.loads(x) for x in open(out.with_suffix(".errors.jsonl"))]
    return folder, out, lines, errors, {r["id"]: r for r in rows}


@pytest.fixture(scope="module")
def naive_refs(stage03, llava):
    """log pi_ref(y | c) of every ref key of p0 and p1, one plain forward per response token (conftest)."""
    model, processor = llava
    folder, _, _, _, rows = stage03
    refs = {}
    for key, row in rows.items():
        files = {"image": row["image"], **row["images"]}
        refs[key] = {}
        for term, (branch, side, prompt, roles) in CONTEXT_03.items():
            images = [Image.open(folder / files[r]).convert("RGB") for r in roles]
            text = s02.chat_prompt(processor, row[prompt], len(images))
            refs[key][term] = token_by_token_logprob(model, processor, text, row[branch][side], images)
    return refs


def test_f03_every_ref_term_is_scored_in_its_own_context(stage03, naive_refs):
    """ref and ntok of each term against the naive log-prob of its response under its context (calib_aug_l:
    y_l under (I_aug, P_enh), the --calib-ref lose variant; robust_expert_w: y_w under the expert's (I, P'))."""
    _, _, lines, _, _ = stage03
    for key, want in naive_refs.items():
        for term, (logp, ntok) in want.items():
            assert lines[key]["ntok"][term] == ntok, (key, term)
            assert lines[key]["ref"][term] == pytest.approx(logp, abs=1e-4), (key, term, lines[key]["ref"][term], logp)


def test_f03_a_bad_line_before_good_ones_keeps_ids_and_scores_together(stage03, naive_refs):
    """The bad line (its I_deg missing) is listed as line 1; p0 and p1 carry their own scores, not each
    other's (scores stored at a line's index among the good lines would shift them)."""
    _, out, lines, errors, rows = stage03
    assert set(lines) == {"p0", "p1"}, lines.keys()
    assert [(e["line"], e["id"]) for e in errors] == [(1, "bad")], errors
    for key in ("p0", "p1"):
        assert lines[key]["prompt"] == rows[key]["prompt"] and lines[key]["focus"] == rows[key]["focus"]
        assert lines[key]["ref"]["focus_w"] == pytest.approx(naive_refs[key]["focus_w"][0], abs=1e-4), key


# ==== 04: every ref read from stage 03's own keys ====
@pytest.mark.parametrize("calib_ref", ["win", "lose"])
def test_f04_reads_every_ref_from_the_key_stage_03_writes(stage03, naive_refs, calib_ref):
    """parse_line on lines stage 03 wrote (they hold robust_expert_w and the _l calibration terms, which
    hand-made fixtures lack): each loss term's reference is log pi_ref of its response in its context."""
    folder, out, lines, _, _ = stage03
    args = s04.parse_args(["--calib-ref", calib_ref])
    side = calib_ref[0]
    term_key = {"focus_w": "focus_w", "focus_l": "focus_l", "aug": f"calib_aug_{side}", "deg": f"calib_deg_{side}",
                "robust_w": "robust_w", "robust_l": "robust_l"}
    for key, line in lines.items():
        ex = s04.parse_line(line, str(out.parent), args)
        for term, ref_key in term_key.items():
            assert ex["ref"][term] == pytest.approx(naive_refs[key][ref_key][0], abs=1e-4), (key, term, ref_key)


# ==== 04: the optimizer, step by step ====
def train_lines(folder, n, same=False):
    """n usable train.jsonl lines (both branches, a CLIP score), distinct unless `same`; made-up refs."""
    folder.mkdir(parents=True, exist_ok=True)
    for role in ("image", "crop", "deg", "noise"):
        rand_image(len(role), 32, 32).save(folder / f"{role}.png")
    texts = ["there is a red circle", "a blue square", "yes", "no", "a green cross", "red", "blue", "purple"]
    rows = []
    for i in range(n):
        j = 0 if same else i
        rows.append({"id": f"x{i}", "image": "image.png", "prompt": "describe the image .",
                     "prompt_enh": "mainly describe the image .",
                     "images": {"crop": "crop.png", "deg": "deg.png", "noise": "noise.png"},
                     "focus": {"chosen": texts[j % 8], "rejected": texts[(j + 3) % 8]},
                     "robust": {"chosen": texts[(j + 1) % 8], "rejected": texts[(j + 5) % 8]},
                     "ref": {"focus_w": -20.0 - j, "focus_l": -21.0, "calib_aug_w": -19.0, "calib_deg_w": -22.0 + j,
                             "robust_w": -18.0, "robust_l": -23.0 - j},
                     "clip": {"crop": 0.6, "image": 0.5 + 0.01 * j}, "keep": {"focus": True, "robust": True}})
    with open(folder / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return folder / "train.jsonl"


def run_04(*argv):
    s04.main(list(map(str, argv)))


def metrics_04(out):
    return [json.loads(x) for x in open(Path(out) / "metrics.jsonl")]


def test_f04_lr_at_every_step_is_warmup_then_cosine(tiny_llava, tmp_path, monkeypatch):
    """5 lines, 2 per step, 3 epochs: 3 steps an epoch (the last one short), 9 in all, warm-up ceil(0.25 * 9)
    = 3 steps. The lr each optimizer.step ran with: peak * (k + 1) / (w + 1) in warm-up (ours: it starts above
    0), then transformers' get_cosine_schedule_with_warmup: the peak at step w, above 0 at the last step."""
    from transformers import get_cosine_schedule_with_warmup
    applied = []
    step = torch.optim.AdamW.step

    def recording_step(self, *a, **kw):
        applied.append(self.param_groups[0]["lr"])
        return step(self, *a, **kw)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    data = train_lines(tmp_path / "d", 5)
    peak = 2e-3
    run_04("--model", tiny_llava, "--data", data, "--out", tmp_path / "o", "--lr", peak, "--epochs", 3,
           "--effective-batch", 2, "--batch-size", 1, "--warmup-ratio", 0.25, "--lora-dropout", 0, "--device", "cpu")
    total = 3 * math.ceil(5 / 2)
    warmup = math.ceil(0.25 * total)
    hf = get_cosine_schedule_with_warmup(torch.optim.SGD([torch.zeros(1)], lr=peak), warmup, total)
    reference = []
    for k in range(total):
        reference.append(peak * (k + 1) / (warmup + 1) if k < warmup else peak * hf.lr_lambdas[0](k))
    assert reference[warmup] == pytest.approx(peak) and reference[-1] > 0
    assert applied == pytest.approx(reference, rel=1e-9, abs=1e-15), (applied, reference)
    assert [m["lr"] for m in metrics_04(tmp_path / "o")] == pytest.approx(reference, rel=1e-9)
    for k in range(total):  # the function alone
        assert s04.lr_at(k, peak, warmup, total) == pytest.approx(reference[k], rel=1e-9), k


def test_f04_each_step_starts_from_a_zero_gradient(tiny_llava, tmp_path):
    """lr 1e-12 (nothing moves to the precision compared), the same line every step, no dropout: every step
    has the same gradient, so the same pre-clipping norm; a gradient left over from the step before adds up."""
    data = train_lines(tmp_path / "d", 3, same=True)
    run_04("--model", tiny_llava, "--data", data, "--out", tmp_path / "o", "--lr", 1e-12, "--epochs", 1,
           "--effective-batch", 1, "--batch-size", 1, "--lora-dropout", 0, "--max-grad-norm", 1e-3,
           "--device", "cpu")
    norms = [m["grad_norm"] for m in metrics_04(tmp_path / "o")]
    assert len(norms) == 3 and norms[0] > 1e-3
    assert norms == pytest.approx([norms[0]] * 3, rel=1e-5), norms


def test_f04_clipping_acts_on_the_accumulated_gradient(tiny_llava, tmp_path):
    """4 different lines, one step, clipping active (max norm 1e-4): 2 micro-batches of 2 must give the
    gradient norm and the clipped gradient (AdamW's first moment, (1 - beta1) g, in checkpoint.pt) of one batch
    of 4; the clipped gradient's norm is max_norm (a closed form)."""
    data = train_lines(tmp_path / "d", 4)
    common = ("--model", tiny_llava, "--data", data, "--lr", 1e-3, "--epochs", 1, "--effective-batch", 4,
              "--lora-dropout", 0, "--max-grad-norm", 1e-4, "--stop-after", 1, "--device", "cpu")
    run_04(*common, "--out", tmp_path / "accum", "--batch-size", 2)
    run_04(*common, "--out", tmp_path / "big", "--batch-size", 4)
    accum, big = (metrics_04(tmp_path / n)[0] for n in ("accum", "big"))
    assert big["grad_norm"] > 1e-3, big  # clipping acts
    assert accum["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-4), (accum, big)
    moments = {}
    for name in ("accum", "big"):
        state = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["optim"]["state"]
        moments[name] = {k: v["exp_avg"] for k, v in state.items()}
    assert moments["accum"].keys() == moments["big"].keys() and moments["big"]
    norm = math.sqrt(sum(float(m.double().pow(2).sum()) for m in moments["big"].values()))
    assert norm == pytest.approx(0.1 * 1e-4, rel=1e-3), norm
    for k in moments["big"]:
        torch.testing.assert_close(moments["accum"][k], moments["big"][k], rtol=1e-3, atol=1e-10)


def test_f04_merge_equals_the_eval_mode_forward(tiny_llava, llava):
    """LoRA with dropout 0.5, merged while the model is in train mode (as main() merges after training): the
    merged model's logits are the LoRA model's in eval mode (dropout off), W + (alpha / r) B A."""
    from transformers import AutoModelForImageTextToText
    _, processor = llava
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava)
    s04.add_lora(model, 4, 8, 0.5)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, s04.LoRALinear):
                m.lora_B.normal_(0, 0.5)
    text = s02.chat_prompt(processor, "describe the image .") + "there is a red circle"
    inputs = processor(text=[text], images=[rand_image(5, 32, 32)], return_tensors="pt")
    with torch.no_grad():
        want = model.eval()(**inputs).logits
        model.train()
        s04.merge_lora(model)
        assert not any(isinstance(m, s04.LoRALinear) for m in model.modules())
        got = model.eval()(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ==== 05: each sigma of the noise sweep; HallusionBench's pairs; answers joined by id ====
@torch.no_grad()
def naive_greedy(model, processor, prompt, image, n_new, eos=3):
    text = s05.chat_prompt(processor, prompt, 1)
    enc = processor(text=[text], images=[image], return_tensors="pt")
    new = []
    for _ in range(n_new):
        ids = torch.cat([enc["input_ids"], torch.tensor([new], dtype=torch.long)], 1)
        tok = int(model(**dict(enc, input_ids=ids, attention_mask=torch.ones_like(ids))).logits[0, -1].argmax())
        if tok == eos:
            break
        new.append(tok)
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_f05_each_sigma_answers_on_its_own_noisy_image(tiny_llava, tmp_path, monkeypatch):
    """Sigmas 0 and 0.6, seed 3, two questions, one per batch: the k-th image the model was fed is the k-th
    answer row's image with numpy noise at that row's sigma (keyed by the path as written); each row's text is
    the naive greedy answer on it; each sigma's metrics come from its own rows. A second run for sigma 0.6
    alone, into the same --out (sigma 0's rows first in answers.jsonl), scores its own rows only."""
    model, processor = s05.load_model(tiny_llava, "cpu")
    fed = []
    model.model.vision_tower.register_forward_pre_hook(  # (transformers 5 encodes images before forward)
        lambda mod, a, kw: fed.append(a[0] if a else kw["pixel_values"]), with_kwargs=True)
    monkeypatch.setattr(s05, "load_model", lambda *a, **k: (model, processor))
    if hasattr(s05, "cached_model"):
        s05.cached_model.cache_clear()
    folder = tmp_path / "pope"
    (folder / "images").mkdir(parents=True)
    for i in range(2):
        rand_image(60 + i, 36, 30).save(folder / "images" / f"{i}.png")
    questions = [{"question_id": q, "image": f"images/{q % 2}.png", "label": ["yes", "no"][q % 2],
                  "text": f"is there a {['red', 'blue'][q % 2]} circle in the image ?"} for q in (1, 2)]
    (folder / "random.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    out = tmp_path / "out"
    args = ["--model", str(tiny_llava), "--questions", str(folder), "--out", str(out), "--seed", "3",
            "--batch-size", "1", "--max-new-tokens", "3"]
    metrics = s05.main(args + ["--noise-sigma", "0", "0.6"])
    rows = [json.loads(x) for x in open(out / "answers.jsonl")]
    assert sorted((r["sigma"], r["question_id"]) for r in rows) == [(0.0, 1), (0.0, 2), (0.6, 1), (0.6, 2)]
    assert len(fed) == len(rows), (len(fed), len(rows))
    by_id = {q["question_id"]: q for q in questions}
    for r, pv in zip(rows, fed):
        q = by_id[r["question_id"]]
        image = numpy_noise(Image.open(folder / q["image"]).convert("RGB"), r["sigma"], 3, q["image"])
        assert r["image"] == q["image"] and torch.equal(pv[0], pixels(processor, [image])[0]), r
        assert r["text"] == naive_greedy(model, processor, q["text"] + s05.SUFFIX, image, 3), r
    for sigma in ("0", "0.6"):
        mine = {r["question_id"]: s05.parse_yes_no(r["text"]) for r in rows if f"{r['sigma']:g}" == sigma}
        tp = sum(mine[q["question_id"]] == "yes" and q["label"] == "yes" for q in questions)
        fp = sum(mine[q["question_id"]] == "yes" and q["label"] == "no" for q in questions)
        assert (metrics["pope"][sigma]["random"]["TP"], metrics["pope"][sigma]["random"]["FP"]) == (tp, fp), sigma
    again = s05.main(args + ["--noise-sigma", "0.6"])
    assert list(again["pope"]) == ["0.6"] and again["pope"]["0.6"] == metrics["pope"]["0.6"]


def test_f05_score_pope_joins_answers_by_split_sigma_and_id():
    """Answers of two splits and two sigmas, shuffled, the ids repeating across splits (as POPE's do): each
    (sigma, split) is scored on its own answers, by question_id (naive counts here)."""
    questions = {s: [{"question_id": q, "image": f"{q}.png", "text": f"q{q}", "label": ["yes", "no"][q % 2]}
                     for q in range(1, 5)] for s in ("random", "popular")}
    said = {}
    for sigma in (0.0, 0.3):
        for split in questions:
            for q in range(1, 5):
                said[(sigma, split, q)] = ["Yes", "No", "No, not", "yes"][(q + len(split) + int(10 * sigma)) % 4]
    keys = sorted(said, key=lambda k: zlib.crc32(repr(k).encode()))  # a fixed shuffle
    answers = [(n, {"question_id": q, "split": split, "sigma": sigma, "text": said[(sigma, split, q)],
                    "prompt": f"q{q}", "image": f"{q}.png"}) for n, (sigma, split, q) in enumerate(keys, 1)]
    got = s05.score_pope(questions, answers, "answers.jsonl")
    assert sorted(got) == [0.0, 0.3]
    for sigma in (0.0, 0.3):
        for split, rows in questions.items():
            pred = {q["question_id"]: "no" if {"No", "not", "no"} & set(said[(sigma, split, q["question_id"])]
                                                                          .split(".")[0].replace(",", "").split(" "))
                    else "yes" for q in rows}
            counts = {"TP": sum(pred[q["question_id"]] == "yes" == q["label"] for q in rows),
                      "FP": sum(pred[q["question_id"]] == "yes" != q["label"] for q in rows),
                      "TN": sum(pred[q["question_id"]] == "no" == q["label"] for q in rows),
                      "FN": sum(pred[q["question_id"]] == "no" != q["label"] for q in rows)}
            assert {k: got[sigma][split][k] for k in counts} == counts, (sigma, split)


def hallusion_row(category, set_id, figure_id, question_id, gt, prediction):
    return {"category": category, "subcategory": "chart", "set_id": set_id, "figure_id": figure_id,
            "question_id": question_id, "question": "Is it red?", "gt_answer": gt, "model_prediction": prediction,
            "filename": None if category == "VS" and figure_id == "0" else f"./{category}/{set_id}_{figure_id}.png"}


def naive_hallusion(rows):
    """aAcc, fAcc, qAcc in percent (HallusionBench's utils.py, a yes/no verdict in place of its judge): a
    question pair is (category, subcategory, set_id, question_id) across figures; a figure is
    (..., figure_id); a VS question without a figure (figure 0) joins no figure and is right on 'Unknown'."""
    verdict = benchmarks_05().yes_no_verdict  # (the string rule is tested on its own elsewhere)
    right, figures, pairs = [], {}, {}
    for r in rows:
        no_figure = r["category"] == "VS" and r["figure_id"] == "0"
        v = verdict(r["model_prediction"])
        ok = v == {"1": "Yes", "0": "No"}[r["gt_answer"]] or (v == "Unknown" and no_figure)
        right.append(ok)
        if not no_figure:
            figures.setdefault((r["category"], r["subcategory"], r["set_id"], r["figure_id"]), []).append(ok)
        pairs.setdefault((r["category"], r["subcategory"], r["set_id"], r["question_id"]), []).append(ok)
    pct = lambda groups: 100 * sum(map(all, groups)) / len(groups)  # noqa: E731
    return {"aAcc": 100 * sum(right) / len(right), "fAcc": pct(figures.values()), "qAcc": pct(pairs.values()),
            "n": len(right)}


def test_f05b_hallusion_pairs_a_question_across_figures():
    """VD set 0: question 0 right on both figures, question 1 wrong on both: by question one pair of the two
    holds (grouped by figure none would); 'Unknown' on a figure (VD set 2) is wrong. VS: a question without a
    figure answered 'Unknown' is right and joins no figure."""
    ev = benchmarks_05()
    rows = [hallusion_row("VD", "0", "0", "0", "1", "Yes"), hallusion_row("VD", "0", "1", "0", "0", "No"),
            hallusion_row("VD", "0", "0", "1", "1", "No"), hallusion_row("VD", "0", "1", "1", "0", "Yes"),
            hallusion_row("VS", "1", "0", "0", "1", "I cannot tell"), hallusion_row("VS", "1", "1", "0", "1", "Yes"),
            hallusion_row("VS", "1", "0", "1", "0", "Yes"), hallusion_row("VS", "1", "1", "1", "0", "No"),
            hallusion_row("VD", "2", "0", "0", "1", "I cannot tell")]  # 'Unknown' on a figure: wrong
    got = ev.hallusion_metrics(rows)
    for group in ("overall", "VD", "VS"):
        mine = [r for r in rows if group in ("overall", r["category"])]
        want = naive_hallusion(mine)
        assert got[group] == pytest.approx(want), (group, got[group], want)
    assert got["VD"]["qAcc"] == pytest.approx(100 / 3) and got["VD"]["fAcc"] == 0.0 and got["VS"]["fAcc"] == 100.0


def test_f05b_each_sigma_answers_a_benchmark_on_its_own_noisy_image(tiny_llava, tmp_path, monkeypatch):
    """HallusionBench with sigmas 0 and 0.6, seed 3, one question per batch: the k-th image fed is the k-th
    answer row with an image, with numpy noise at that row's sigma (keyed by the filename as written); each
    row's text is the naive greedy answer, and each sigma's HallusionBench_result.json holds its own rows'."""
    ev = benchmarks_05()
    model, processor = ev.load_model(tiny_llava, "cpu")
    fed = []
    model.model.vision_tower.register_forward_pre_hook(
        lambda mod, a, kw: fed.append(a[0] if a else kw["pixel_values"]), with_kwargs=True)
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: (model, processor))
    if hasattr(ev, "cached_model"):
        ev.cached_model.cache_clear()
    items = [hallusion_row("VD", "0", f, "0", "1", None) for f in ("0", "1")] + [
        hallusion_row("VS", "1", "0", "0", "0", None)]  # the last one text only
    for i, it in enumerate(items):
        del it["model_prediction"]
        if it["filename"]:
            path = tmp_path / "hallusion_bench" / it["filename"]
            path.parent.mkdir(parents=True, exist_ok=True)
            rand_image(70 + i, 36, 30).save(path)
    (tmp_path / "HallusionBench.json").write_text(json.dumps(items))
    out = tmp_path / "out"
    ev.main(["--benchmark", "hallusionbench", "--model", str(tiny_llava), "--questions",
             str(tmp_path / "HallusionBench.json"), "--out", str(out), "--noise-sigma", "0", "0.6", "--seed", "3",
             "--batch-size", "1", "--max-new-tokens", "3"])
    rows = [json.loads(x) for x in open(out / "answers.jsonl")]
    assert sorted(r["sigma"] for r in rows) == [0.0] * 3 + [0.6] * 3
    with_image = [r for r in rows if r["image"] is not None]
    assert len(fed) == len(with_image) == 4, (len(fed), len(with_image))
    for r, pv in zip(with_image, fed):
        image = numpy_noise(Image.open(tmp_path / "hallusion_bench" / r["image"]).convert("RGB"), r["sigma"], 3,
                            r["image"])
        assert torch.equal(pv[0], pixels(processor, [image])[0]), r
        assert r["text"] == naive_greedy(model, processor, r["prompt"], image, 3), r
    for sigma in ("0", "0.6"):
        result = json.loads((out / f"sigma{sigma}" / "HallusionBench_result.json").read_text())
        mine = {r["question_id"]: r["text"] for r in rows if f"{r['sigma']:g}" == sigma}
        assert [x["model_prediction"] for x in result] == [mine[ev.hallusion_key(x)] for x in result], sigma


# ==== joins: run_rows with a bad line first; the shared blocks' guarantees ====
STAGES = [p.name for p in sorted(ROOT.glob("0[0-5]_*.py"))]


def scripts_with(name):
    return [s for s in STAGES if f"\ndef {name}(" in (ROOT / s).read_text()]


@pytest.mark.parametrize("script", scripts_with("run_rows"))
def test_fsh_run_rows_a_bad_line_first_then_good_ones(script, tmp_path):
    """work() fails the first row: the output holds b, c, d, each with its own value, and the errors file names
    the first row's line and id."""
    mod = load_script(script)
    out = tmp_path / "out.jsonl"
    rows = [{"id": k, "_file": "in.jsonl", "_line": n} for n, k in enumerate("abcd", 1)]
    work = lambda batch: ["no" if r["id"] == "a" else {"id": r["id"], "v": r["id"] * 2} for r in batch]  # noqa
    result = mod.run_rows(rows, [], work, out, 4)
    assert [(r["id"], r["v"]) for r in result] == [("b", "bb"), ("c", "cc"), ("d", "dd")]
    assert [(json.loads(x)["id"], json.loads(x)["v"]) for x in open(out)] == [("b", "bb"), ("c", "cc"), ("d", "dd")]
    errors = [json.loads(x) for x in open(out.with_suffix(".errors.jsonl"))]
    assert [(e["line"], e["id"]) for e in errors] == [(1, "a")], errors


@pytest.mark.parametrize("script", scripts_with("read_instances"))
def test_fsh_a_repeated_id_is_an_error_whatever_its_type(script, tmp_path):
    """ids 7, 7, "7", 8: the second 7 and the "7" repeat line 1 (an id is compared as text)."""
    mod = load_script(script)
    Image.new("RGB", (8, 8)).save(tmp_path / "i.png")
    ids = [7, 7, "7", 8]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": k, "image": "i.png", "prompt": "p"}) + "\n"
                                               for k in ids))
    rows, errors = mod.read_instances(tmp_path / "in.jsonl", ("image", "prompt"))
    assert [r["id"] for r in rows] == [7, 8], rows
    assert [e["line"] for e in errors] == [2, 3] and all("repeats line 1" in e["error"] for e in errors), errors


@pytest.mark.parametrize("script", scripts_with("append_jsonl"))
def test_fsh_append_jsonl_is_on_disk_before_the_file_closes(script, tmp_path):
    """Three rows appended, the file still open: another reader sees all three (a kill loses none)."""
    mod = load_script(script)
    path = tmp_path / "rows.jsonl"
    with open(path, "a", encoding="utf-8") as f:
        for i in range(3):
            mod.append_jsonl(f, {"id": i})
        assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == [0, 1, 2]

"""Stage 01: the attention map (hand-computed A = A_tok (x) A_img with and without our A_dir;
--map paper = A_tok @ A_img indexed from output_attentions=True; hooks = output_attentions=True; batched = one by
one), --focus-prompt in both forward passes but not in the output, a blank one refused before a model loads, the
processor geometry (hand-computed and read back from real pixel_values: centre crop, pad to square,
Qwen's smart resize), the adaptive crop (integral image = brute force, full / clamped windows), and (marked slow)
the stage run as a subprocess on tiny LLaVA / Qwen2.5-VL models: fields, defaults, bad lines, resume after SIGKILL,
2 processes (gloo) = 1 process."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, load_script, run_script, run_torchrun

SCRIPT = "01_attention_crop.py"
stage = load_script(SCRIPT)
PROMPTS = ["what colour is the circle ?", "is there a red square in the image ?", "describe the image .",
           "what shape is the blue object ?"]
SIZES = [(48, 40), (40, 64), (96, 48), (56, 56)]  # (X, Y): landscape, portrait, 2:1, square


def write_instances(folder, n, sizes=SIZES):
    """instances.jsonl with n lines over len(sizes) random images (paths relative to the file)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (x, y) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (y, x, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    with open(folder / "instances.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "image": f"im{i % len(sizes)}.png", "prompt": PROMPTS[i % 4],
                                "extra": i}) + "\n")
    return folder / "instances.jsonl"


def lines(path):
    return {r["id"]: r for r in map(json.loads, open(path))}


def torchrun(nproc, *args):
    return run_torchrun(ROOT / SCRIPT, nproc, *args)


# ---- the equations ----
def test_relevance_hand_computed():
    """Positions [img0, img1, txt, ans, ans]: A_tok = A[ans, txt], A_img = A[txt, img], A_dir = A[ans, img].
    Row 3: 0.4 * [0.2, 0.6] + [0.1, 0.3] = [0.18, 0.54]; row 4: 0.1 * [0.2, 0.6] + [0.2, 0.2] = [0.22, 0.26]
    (its 0.3 on the other answer token is no path to the image); mean [0.20, 0.40]."""
    A = torch.tensor([[1.0, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0], [0.2, 0.6, 0.2, 0, 0], [0.1, 0.3, 0.4, 0.2, 0],
                      [0.2, 0.2, 0.1, 0.3, 0.2]])[None]
    ans, txt, img = (torch.tensor([m]) for m in ([0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [1, 1, 0, 0, 0]))
    out = stage.relevance(A, ans.bool(), txt.bool(), img.bool())
    assert torch.allclose(out, torch.tensor([[0.20, 0.40, 0, 0, 0]]), atol=1e-7)
    one = stage.relevance(A, torch.tensor([[0, 0, 0, 1, 0]]).bool(), txt.bool(), img.bool())  # row 3 alone
    assert torch.allclose(one, torch.tensor([[0.18, 0.54, 0, 0, 0]]), atol=1e-7)


def test_relevance_paper_map_has_no_direct_term():
    """--map paper: A_tok @ A_img alone. Same A as above: row 3: 0.4 * [0.2, 0.6] = [0.08, 0.24]; row 4:
    0.1 * [0.2, 0.6] = [0.02, 0.06]; mean [0.05, 0.15] (A_dir's [0.15, 0.25] must not leak in)."""
    A = torch.tensor([[1.0, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0], [0.2, 0.6, 0.2, 0, 0], [0.1, 0.3, 0.4, 0.2, 0],
                      [0.2, 0.2, 0.1, 0.3, 0.2]])[None]
    ans, txt, img = (torch.tensor([m]).bool() for m in ([0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [1, 1, 0, 0, 0]))
    out = stage.relevance(A, ans, txt, img, direct=False)
    assert torch.allclose(out, torch.tensor([[0.05, 0.15, 0, 0, 0]]), atol=1e-7)


def brute_crop(attn, X, Y, base, ratios, step):
    """adaptive_crop written with loops (no integral image); maps without ties only."""
    best = None
    for r in ratios:
        w, h = min(round(r * base), X), min(round(r * base), Y)
        if w == X and h == Y:
            continue
        S = np.array([[attn[y:y + h, x:x + w].sum() for x in range(X - w + 1)] for y in range(Y - h + 1)])
        y, x = np.unravel_index(np.argmax(S), S.shape)
        nbrs = {(y, min(x + step, S.shape[1] - 1)), (y, max(x - step, 0)), (min(y + step, S.shape[0] - 1), x),
                (max(y - step, 0), x)} - {(y, x)}
        score = (S[y, x] - np.mean([S[p] for p in nbrs])) / (w * h)
        if best is None or score > best[0]:
            best = (score, [int(x), int(y), int(x) + w, int(y) + h], r)
    return best[1], best[2]


@pytest.mark.parametrize("X, Y, base", [(30, 20, 8), (25, 25, 10), (40, 12, 9)])
def test_adaptive_crop_equals_brute_force(X, Y, base):
    rng = np.random.default_rng(X * Y)
    for _ in range(5):
        attn = rng.random((Y, X)) ** 4  # peaky, no ties
        bbox, kind, r = stage.adaptive_crop(attn, (X, Y), base, [1.0, 1.2, 1.5, 2.0], step=3)
        assert kind == "window" and (bbox, r) == brute_crop(attn, X, Y, base, [1.0, 1.2, 1.5, 2.0], 3)
        assert 0 <= bbox[0] < bbox[2] <= X and 0 <= bbox[1] < bbox[3] <= Y


def test_adaptive_crop_full_clamped_and_centred():
    assert stage.adaptive_crop(np.ones((30, 40)), (40, 30), 48, [1.0, 2.0]) == ([0, 0, 40, 30], "full", 1.0)
    assert stage.adaptive_crop(np.ones((60, 60)), (60, 60), 40, [1.5, 2.0])[1] == "full"  # smallest window covers it
    attn = np.zeros((128, 128))
    attn[30:40, 60:70] = 1.0  # a lone blob: every window holding it ties; the tie nearest their mean wins
    bbox, kind, r = stage.adaptive_crop(attn, (128, 128), 48, [1.0, 1.2, 2.0], step=16)
    assert (bbox, kind) == ([41, 15, 89, 63], "window")  # x in [22, 60] -> 41; y in [0, 30] -> 15
    bbox, kind, _ = stage.adaptive_crop(np.random.default_rng(0).random((40, 100)), (100, 40), 48, [1.0])
    assert kind == "window" and bbox[1] == 0 and bbox[3] == 40 and bbox[2] - bbox[0] == 48  # clamped to the height
    t = time.time()
    big = np.random.default_rng(1).random((1500, 2000)).astype(np.float32)
    bbox, _, _ = stage.adaptive_crop(big, (2000, 1500), 336, [1.0, 1.2, 1.4, 1.6, 1.8, 2.0], step=14)
    assert time.time() - t < 20 and 0 <= bbox[0] and bbox[2] <= 2000 and bbox[3] <= 1500


# ---- the geometry: grid cell of every original pixel ----
def clip_processor(pad):
    from transformers import CLIPImageProcessor, LlavaImageProcessor
    cls = LlavaImageProcessor if pad else CLIPImageProcessor
    return cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, **({"do_pad": True} if pad else {}))


def test_pixel_cells_hand_computed():
    """96x48 -> resize 64x32 -> centre crop 32 from x = 16: original x 24..71 seen, 12 px per cell. With pad to
    square: 96x96 (rows 24 px down) -> 32x32: every column seen, rows only in cells 1 and 2, 24 px per cell."""
    cols, rows, cell = stage.pixel_cells(clip_processor(False), (96, 48), (4, 4), stretch=False)
    assert cols.tolist() == [-1] * 24 + [0] * 12 + [1] * 12 + [2] * 12 + [3] * 12 + [-1] * 24
    assert rows.tolist() == [0] * 12 + [1] * 12 + [2] * 12 + [3] * 12 and cell == 12
    cols, rows, cell = stage.pixel_cells(clip_processor(False), (48, 96), (4, 4), stretch=False)  # portrait
    assert rows.tolist() == [-1] * 24 + [0] * 12 + [1] * 12 + [2] * 12 + [3] * 12 + [-1] * 24
    cols, rows, cell = stage.pixel_cells(clip_processor(True), (96, 48), (4, 4), stretch=False)
    assert cols.tolist() == [0] * 24 + [1] * 24 + [2] * 24 + [3] * 24
    assert rows.tolist() == [1] * 24 + [2] * 24 and cell == 24
    cols, rows, cell = stage.pixel_cells(None, (90, 40), (2, 3), stretch=True)  # Qwen: the grid covers the image
    assert cols.tolist() == [0] * 30 + [1] * 30 + [2] * 30 and rows.tolist() == [0] * 20 + [1] * 20 and cell == 25


def brightest_cell(image_processor, image):
    """The grid cell where the processor put a white marker on a black image, read back from pixel_values (less
    those of the plain black image: padding has its own colour): ((row, col), grid, stretch, the cell's gain)."""
    enc = image_processor(images=[image], return_tensors="pt")
    pv = enc["pixel_values"].float() - image_processor(images=[Image.new("RGB", image.size)],
                                                       return_tensors="pt")["pixel_values"].float()
    if "image_grid_thw" in enc:  # rows of pixel_values: patches, merged cell by merged cell (the image tokens' order)
        m = image_processor.merge_size
        _, gh, gw = enc["image_grid_thw"][0].tolist()
        grid, stretch = (gh // m, gw // m), True
        cells = pv.reshape(grid[0] * grid[1], -1).mean(1)
    else:  # (1, 3, 32, 32): 8 px patches
        cells = pv[0].mean(0).unfold(0, 8, 8).unfold(1, 8, 8).mean((-1, -2)).reshape(-1)
        grid, stretch = (4, 4), False
    return divmod(int(cells.argmax()), grid[1]), grid, stretch, float(cells.max())


@pytest.mark.parametrize("family", ["llava", "llava_pad", "qwen"])
def test_pixel_cells_match_what_the_processor_made(family, tiny_qwen):
    """A white 6x6 marker on a black non-square image, wherever pixel_cells puts all of it in one cell: the
    processor's brightest cell is that cell. A marker on a side the centre crop cuts away reaches no cell."""
    from transformers import AutoProcessor
    ip = AutoProcessor.from_pretrained(tiny_qwen).image_processor if family == "qwen" else \
        clip_processor(family == "llava_pad")
    checked = 0
    for X, Y in [(96, 48), (50, 110)]:
        grid = brightest_cell(ip, Image.new("RGB", (X, Y)))[1]
        cols, rows, _ = stage.pixel_cells(ip, (X, Y), grid, family == "qwen")
        for x in range(3, X - 3, 7):
            for y in range(3, Y - 3, 9):
                cell = {(int(r), int(c)) for r in rows[y - 3:y + 3] for c in cols[x - 3:x + 3]}
                if len(cell) != 1 or -1 in cell.pop():
                    continue
                a = np.zeros((Y, X, 3), np.uint8)
                a[y - 3:y + 3, x - 3:x + 3] = 255
                got, _, _, contrast = brightest_cell(ip, Image.fromarray(a))
                assert got == (rows[y], cols[x]) and contrast > 0.1, (family, X, Y, x, y, grid)
                checked += 1
    assert checked >= 20
    if family == "llava":  # 96x48 shows only x in [24, 72): a marker at x = 5..10 is cut away
        a = np.zeros((48, 96, 3), np.uint8)
        a[17:23, 5:11] = 255
        assert brightest_cell(ip, Image.fromarray(a))[3] < 1e-3
        assert stage.pixel_cells(ip, (96, 48), (4, 4), False)[0][8] == -1


def test_pixel_heat_keeps_each_cells_mass():
    grid = np.arange(1.0, 17.0).reshape(4, 4)
    grid /= grid.sum()
    cols, rows, _ = stage.pixel_cells(clip_processor(False), (96, 48), (4, 4), stretch=False)
    heat = stage.pixel_heat(grid, cols, rows)
    assert heat.shape == (48, 96) and heat.sum() == pytest.approx(1.0)
    assert heat[:, :24].sum() == 0 and heat[:, 72:].sum() == 0  # the sides the centre crop cut away
    assert heat[12:24, 36:48].sum() == pytest.approx(grid[1, 1])  # cell (1, 1): rows 12..23, columns 36..47


# ---- the map: hooks = output_attentions=True; batched = one by one ----
def reference_maps(model, processor, prompts, answers, images, layers):
    """The same maps the naive way: every layer's attentions from output_attentions=True."""
    inputs, resp = stage.build_batch(processor, prompts, answers, [[im] for im in images])
    img = inputs["input_ids"] == model.config.image_token_id
    txt, ans = inputs["attention_mask"].bool() & ~img & ~resp, resp.clone()
    ans[:, -1] &= resp.sum(1) == 1
    with torch.no_grad():
        out = model(**inputs, use_cache=False, output_attentions=True)
    rel = torch.stack([stage.relevance(out.attentions[i].float().mean(1), ans, txt, img) for i in layers]).mean(0)
    return [(v / v.sum()).numpy() for v in (rel[b][img[b]] for b in range(len(prompts)))]


def assert_same_map(a, b):
    """Equal to 1e-3 of b's spread: a random tiny model's map is near uniform, so a plain rtol would say little."""
    a, b = np.ravel(a), np.ravel(b)
    assert np.abs(a - b).max() <= 1e-3 * (b.max() - b.min()) + 1e-9, (a, b)


@pytest.fixture(scope="module", params=["llava", "qwen"])
def loaded(request):
    model, processor = stage.load_model(request.getfixturevalue(f"tiny_{request.param}"), "cpu", "eager")
    model.requires_grad_(False)
    return model, processor


def test_hooks_equal_output_attentions_and_batch_equals_single(loaded):
    model, processor = loaded
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (y, x, 3), dtype=np.uint8)) for x, y in SIZES[:3]]
    prompts, answers = PROMPTS[:3], ["red circle", "", "yes there is a blue square"]  # "" : the EOS position
    maps, stretch = stage.attention_maps(model, processor, prompts, answers, images, [0, 1])
    ref = reference_maps(model, processor, prompts, answers, images, [0, 1])
    for m, r in zip(maps, ref):
        assert m.sum() == pytest.approx(1.0) and np.isfinite(m).all()
        assert_same_map(m, r)
    for i in range(3):  # one by one: other padding, same maps
        single, _ = stage.attention_maps(model, processor, prompts[i:i + 1], answers[i:i + 1], images[i:i + 1],
                                         [0, 1])
        assert_same_map(single[0], maps[i])
    assert stretch == ("qwen" in type(model).__name__.lower())
    if not stretch:
        assert all(m.shape == (4, 4) for m in maps)  # 32 px input, 8 px patches


def test_paper_map_is_A_tok_at_A_img(loaded):
    """--map paper on a real forward: per row, mean over answer rows of A_bar[ans, txt] @ A_bar[txt, img], taken
    from output_attentions=True by plain indexing (layers 0 and 1 averaged), then normalised. The default map
    (+ A_dir) must differ from it by far more than the tolerance, so a leaked A_dir fails."""
    model, processor = loaded
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (y, x, 3), dtype=np.uint8)) for x, y in SIZES[:2]]
    prompts, answers = PROMPTS[:2], ["red circle", "yes"]
    paper, _ = stage.attention_maps(model, processor, prompts, answers, images, [0, 1], direct=False)
    ours, _ = stage.attention_maps(model, processor, prompts, answers, images, [0, 1])
    inputs, resp = stage.build_batch(processor, prompts, answers, [[im] for im in images])
    with torch.no_grad():
        att = model(**inputs, use_cache=False, output_attentions=True).attentions
    img = inputs["input_ids"] == model.config.image_token_id
    txt = inputs["attention_mask"].bool() & ~img & ~resp
    for b in range(2):
        ans = resp[b].clone()
        ans[-1] = False  # the closing EOS is not an answer position (both answers are non-empty)
        per_layer = []
        for layer in (0, 1):
            A = att[layer][b].double().mean(0)  # (T, T)
            A_tok, A_img = A[ans][:, txt[b]], A[txt[b]][:, img[b]]  # (T_y, T_p), (T_p, N)
            per_layer.append((A_tok @ A_img).mean(0))
        v = torch.stack(per_layer).mean(0).numpy()
        v = v[-paper[b].size:]  # LLaVA's CLS token is no grid cell
        assert_same_map(paper[b], v / v.sum())
        assert np.abs(ours[b] - paper[b]).max() > 100 * 1e-3 * (v.max() - v.min()) / v.sum()


@pytest.mark.parametrize("choice", ["paper", "ours"])
def test_crop_batch_computes_the_map_chosen(loaded, choice, tmp_path):
    """crop_batch's "attn" is attention_maps' map for the --map chosen, on the answer it wrote."""
    model, processor = loaded
    data = write_instances(tmp_path / "data", 2)
    rows, _ = stage.read_instances(data, ("image", "prompt"))
    args = stage.parse_args(["--data", str(data), "--out", str(tmp_path / "c.jsonl"), "--map", choice,
                             "--max-new-tokens", "3"])
    args.layers, args.crop_base = [0, 1], 16
    out = stage.crop_batch(model, processor, args, rows)
    images = [Image.open(r["_image"]).convert("RGB") for r in rows]
    for direct in (True, False):
        maps, _ = stage.attention_maps(model, processor, [r["prompt"] for r in rows], [r["answer"] for r in out],
                                       images, [0, 1], direct=direct)
        same = all(np.array_equal(np.round(m, 4), np.array(r["attn"])) for m, r in zip(maps, out))
        assert same == (direct == (choice == "ours")), (choice, direct)


def test_focus_prompt_reaches_the_forward_passes_and_output_keeps_p(loaded, tmp_path):
    """--focus-prompt: every forward that sees the image (the greedy answer's prefill and the map's pass) reads
    the focusing words right before P; the output row's "prompt" is still P."""
    model, processor = loaded
    data = write_instances(tmp_path / "data", 2)
    rows, errors = stage.read_instances(data, ("image", "prompt"))
    focus = "answer the question based on the image"
    args = stage.parse_args(["--data", str(data), "--out", str(tmp_path / "crops.jsonl"), "--focus-prompt", focus,
                             "--max-new-tokens", "3"])
    args.layers, args.crop_base = [0], 16
    seen = []

    def spy(module, a, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and (ids == model.config.image_token_id).any():
            seen.extend(processor.tokenizer.batch_decode(ids, skip_special_tokens=True))
    handle = model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        out = stage.crop_batch(model, processor, args, rows)
    finally:
        handle.remove()
    assert len(seen) == 4, seen  # 2 rows x (the answer's prefill, the map's forward)
    for text, row in zip(seen, rows + rows):
        assert f"{focus} {row['prompt']}" in " ".join(text.split()), (text, row["prompt"])
    assert [r["prompt"] for r in out] == [r["prompt"] for r in rows] == PROMPTS[:2]
    args.focus_prompt = None
    seen.clear()
    handle = model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        stage.crop_batch(model, processor, args, rows)
    finally:
        handle.remove()
    assert seen and not any(focus in text for text in seen)


# ---- flags ----
def test_blank_focus_prompt_refused_before_a_model_loads(tmp_path, capsys):
    data = write_instances(tmp_path, 1)
    out = tmp_path / "crops.jsonl"
    with pytest.raises(SystemExit) as e:  # --model names no folder: a refusal about it would come later
        stage.main(["--model", str(tmp_path / "no_model"), "--data", str(data), "--out", str(out),
                    "--focus-prompt", "   "])
    assert e.value.code == 2 and "--focus-prompt is blank" in capsys.readouterr().err
    assert not out.exists()


def test_window_under_one_pixel_refused(tiny_llava, tmp_path):
    data = write_instances(tmp_path, 1)
    with pytest.raises(SystemExit, match="--ratios 0.01 x crop_base 20 px"):
        stage.main(["--model", str(tiny_llava), "--data", str(data), "--out", str(tmp_path / "c.jsonl"),
                    "--crop-base", "20", "--ratios", "0.01", "1"])


# ---- the stage as a user runs it (subprocesses: the slow tier) ----
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_stage_writes_its_fields(family, request, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}")
    data = write_instances(tmp_path / "data", 6)
    out = tmp_path / "out" / "crops.jsonl"
    run_script(SCRIPT, "--model", model, "--data", data, "--out", out, "--batch-size", 4,
               "--max-new-tokens", 6)
    rows, args = lines(out), json.loads(out.with_suffix(".args.json").read_text())
    assert list(rows) == [f"q{i}" for i in range(6)]
    assert args["layers"] == [1] and args["crop_base"] == (32 if family == "llava" else 336)  # defaults, no world
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(model)
    for i, r in rows.items():
        k = int(i[1:])
        assert r["prompt"] == PROMPTS[k % 4] and r["extra"] == k and r["method"] == "attention"
        image = Image.open(out.parent / r["image"])  # relative to the output file
        assert image.size == SIZES[k % 4] and isinstance(r["answer"], str)
        x1, y1, x2, y2 = r["bbox"]
        assert all(isinstance(v, int) for v in r["bbox"]) and 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height
        attn = np.array(r["attn"])
        assert list(attn.shape) == r["grid"] and abs(attn.sum() - 1) < 5e-3 and (attn >= 0).all()
        if family == "qwen":  # the merged grid of this image
            thw = processor.image_processor(images=[image.convert("RGB")], return_tensors="pt")["image_grid_thw"][0]
            assert r["grid"] == [int(thw[1]) // 2, int(thw[2]) // 2]
        else:
            assert r["grid"] == [4, 4]
        full = max(image.size) <= args["crop_base"]
        assert r["crop"] == ("full" if full else "window") and (not full or r["bbox"] == [0, 0, *image.size])


@pytest.mark.slow
def test_toy_world_defaults_and_bad_lines(tiny_llava, tmp_path):
    """world.json beside --data sets crop_base (and layer 0); bad lines are listed, odd image modes are converted."""
    folder = tmp_path / "data"
    data = write_instances(folder, 2)
    (folder / "world.json").write_text(json.dumps({"crop_base": 20}))
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")  # L
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(folder / "rgba.png")  # RGBA
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")  # P
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "deep.png")  # 16-bit
    assert [Image.open(folder / f"{n}.png").mode for n in ("gray", "rgba", "palette", "deep")] == \
        ["L", "RGBA", "P", "I;16"]
    (folder / "broken.png").write_bytes(b"not a png")
    with open(data, "a") as f:
        for name in ("gray", "rgba", "palette", "deep"):
            f.write(json.dumps({"id": name, "image": f"{name}.png", "prompt": PROMPTS[0]}) + "\n")
        f.write(json.dumps({"id": "nofile", "image": "missing.png", "prompt": PROMPTS[0]}) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"id": "noprompt", "image": "im0.png"}) + "\n")
        f.write(json.dumps({"id": "empty", "image": "im0.png", "prompt": "  "}) + "\n")
        f.write(json.dumps({"id": "broken", "image": "broken.png", "prompt": PROMPTS[0]}) + "\n")
    out = tmp_path / "crops.jsonl"
    proc = run_script(SCRIPT, "--model", tiny_llava, "--data", data, "--out", out, "--max-new-tokens", 4)
    assert set(lines(out)) == {"q0", "q1", "gray", "rgba", "palette", "deep"}
    args = json.loads(out.with_suffix(".args.json").read_text())
    assert args["crop_base"] == 20 and args["layers"] == [0]
    errors = [json.loads(line) for line in open(out.with_suffix(".errors.jsonl"))]
    assert [e["line"] for e in errors] == [7, 8, 9, 10, 11]
    for e, words in zip(errors, ["image not found", "bad JSON", "missing field 'prompt'", "empty field 'prompt'",
                                 "unreadable image"]):
        assert words in e["error"] and f"{data}:{e['line']}:" in e["error"], e
    assert "6 of 11 input lines written; 5 skipped" in proc.stdout
    again = run_script(SCRIPT, "--model", tiny_llava, "--data", data, "--out", out, "--map", "paper",
                       check=False)  # other result-changing settings: refused, file untouched
    assert again.returncode != 0 and "map" in again.stderr and len(lines(out)) == 6


@pytest.mark.slow
def test_every_line_failing_exits_nonzero(tiny_llava, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"id": "a", "image": "missing.png", "prompt": "x"}) + "\n{broken\n")
    proc = run_script(SCRIPT, "--model", tiny_llava, "--data", data, "--out", tmp_path / "o.jsonl", check=False)
    assert proc.returncode != 0 and "every line failed" in proc.stderr


@pytest.mark.slow
def test_resume_after_sigkill_and_two_processes_equal_one(tiny_llava, tmp_path):
    """One uninterrupted run; a run killed (SIGKILL) once it has written a line, then rerun; a 2-process torchrun:
    the same lines by id (batch size 1, so every row is computed alike and the 4-decimal maps match exactly)."""
    data = write_instances(tmp_path / "data", 120)
    common = ["--model", tiny_llava, "--data", data, "--batch-size", 1, "--max-new-tokens", 8]
    run_script(SCRIPT, *common, "--out", tmp_path / "full.jsonl")
    full = lines(tmp_path / "full.jsonl")
    assert len(full) == 120
    out = tmp_path / "killed.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, SCRIPT, *map(str, common), "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t = time.time()
    while not (out.exists() and out.read_bytes().count(b"\n") >= 1) and time.time() - t < 120:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_killed = out.read_bytes().count(b"\n")
    assert 1 <= n_killed < 120, f"the run was not interrupted mid-way ({n_killed} lines)"
    run_script(SCRIPT, *common, "--out", out)
    assert lines(out) == full
    torchrun(2, *common, "--out", tmp_path / "two.jsonl")
    assert lines(tmp_path / "two.jsonl") == full
    assert not list(tmp_path.glob("two.jsonl.rank*"))

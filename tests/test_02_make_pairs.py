"""Stage 02: contrastive amplification and nucleus sampling on hand-computed numbers, the derived images, the
hand-written decoding loop (lambda_ca = 0 greedy = HF generate, cached = uncached, a batch of 4 = four batches of 1,
greedy and sampled) on tiny LLaVA / Qwen2.5-VL models, and the stage run as a subprocess: output schema, bad lines,
odd image modes, a SIGKILL mid-run then resume = an uninterrupted run = 2 processes (gloo), a file where every line
fails exits non-zero."""
import json
import math
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

SCRIPT = "02_make_pairs.py"
stage = load_script(SCRIPT)
PROMPTS = ["is there a red circle in the image ?", "describe the image .", "what colour is the square ?",
           "what shape is the blue object ?"]
NO_EOS = {-1}  # an id no model emits: equivalence runs decode every step, so long sequences are compared


@pytest.fixture(scope="module", params=["llava", "qwen"])
def family(request):
    """(model, processor) of a tiny random LLaVA-1.5 or Qwen2.5-VL, loaded the way the stage loads them."""
    return stage.load_model(request.getfixturevalue(f"tiny_{request.param}"), "cpu")


def random_images(n, seed=0):
    rng = np.random.default_rng(seed)  # two sizes: Qwen rows then differ in image tokens, so padding is exercised
    return [Image.fromarray(rng.integers(0, 256, (48 + 16 * (i % 2), 56, 3), dtype=np.uint8)) for i in range(n)]


def inputs_for(processor, prompts, images, amateur=None):
    texts = [stage.chat_prompt(processor, p) for p in prompts]
    if amateur is not None:  # contrastive rows: experts, then amateurs
        texts, images = texts + texts, images + amateur
    return dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))


# ---- equations ----
def test_contrastive_logits_hand_computed():
    ep = torch.tensor([[2.0, 1.0, 0.0, -2.0], [2.0, 1.9, 0.0, -3.0]])
    at = torch.tensor([[1.0, 3.0, -1.0, 0.0], [3.0, 0.0, 0.0, -100.0]])
    # row 0: p_v / max p = e^(l_v - 2) = 1, 0.368, 0.135, 0.018 -> V_head = {0, 1, 2} at beta 0.1;
    #        1.5 * ep - 0.5 * at = 2.5, 0.0, 0.5, (1.5 * -2 - 0 = -3, masked)
    # row 1: ratios 1, 0.905, 0.135, 0.0067 -> V_head = {0, 1, 2}; 2 * ep - at = 1.0, 3.8, 0.0, (94, masked)
    row0 = stage.contrastive_logits(ep[:1], at[:1], 0.5, 0.1)
    row1 = stage.contrastive_logits(ep[1:], at[1:], 1.0, 0.1)
    assert torch.allclose(row0[0, :3], torch.tensor([2.5, 0.0, 0.5])) and row0[0, 3] == -math.inf
    assert torch.allclose(row1[0, :3], torch.tensor([1.0, 3.8, 0.0])) and row1[0, 3] == -math.inf
    assert ep[1].argmax() == 0 and row1.argmax() == 1  # amplification flips the choice the amateur shares
    # limits: lambda 0 is the expert on V_head; beta 0 keeps every token; beta 1 keeps only the argmax
    assert torch.equal(stage.contrastive_logits(ep, at, 0.0, 0.1)[:, :3], ep[:, :3])
    assert torch.isfinite(stage.contrastive_logits(ep, at, 0.1, 0.0)).all()
    assert (torch.isfinite(stage.contrastive_logits(ep, at, 0.1, 1.0)).sum(-1) == 1).all()


def test_next_token_nucleus_and_inverse_cdf():
    # probabilities 0.5, 0.3, 0.2 stored at ids 2, 0, 1; top_p 0.7 keeps ids 2 and 0 (mass before id 1 is 0.8)
    logits = torch.log(torch.tensor([[0.3, 0.2, 0.5]])).repeat(4, 1)
    u = torch.tensor([0.0, 0.6, 0.7, 0.999999])  # cdf over the nucleus: 0.5, 0.8 -> u * 0.8 = 0, 0.48, 0.56, ~0.8
    assert stage.next_token(logits, u, 1.0, 0.7).tolist() == [2, 2, 0, 0]
    assert stage.next_token(logits, u, 1.0, 1.0).tolist() == [2, 0, 0, 1]  # full: cdf 0.5, 0.8, 1.0 at u
    assert stage.next_token(logits, u, 0.0, 0.7).tolist() == [2, 2, 2, 2]  # temperature 0: argmax
    masked = torch.tensor([[0.0, -math.inf, 1.0]]).repeat(4, 1)  # an -inf token is never drawn
    assert 1 not in stage.next_token(masked, u, 1.0, 1.0).tolist()
    g = stage.response_generator(0, "x", "init")  # the sampler depends on (seed, id, role) only
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=stage.response_generator(0, "x", "init")))
    assert not torch.equal(torch.rand(3, generator=stage.response_generator(0, "x", "robust_w")),
                           torch.rand(3, generator=stage.response_generator(0, "x", "init")))


def test_derived_images():
    image = random_images(1)[0]  # 56 x 48
    bbox = [10, 5, 30, 25]
    views = stage.derived_images(image, bbox, 0.2, 0, "k")
    a, deg = np.asarray(image), np.array(views["deg"])
    mean = np.round(a.reshape(-1, 3).astype(np.float64).mean(0))
    assert (deg[5:25, 10:30] == mean).all()  # the box: the mean colour; outside: untouched
    deg[5:25, 10:30] = a[5:25, 10:30]
    assert np.array_equal(deg, a)
    assert np.array_equal(np.asarray(views["crop"]), a[5:25, 10:30])
    assert np.array_equal(np.asarray(views["noise"]), np.asarray(stage.add_noise(image, 0.2, 0, "k")))


def test_file_stem_is_safe_and_unique():
    assert stage.file_stem("inst_00001") == "inst_00001"
    names = [stage.file_stem(k) for k in ("a/b", "a_b", "A_b", "../x", "a b", 17)]
    assert len(set(names)) == len(names) and len({n.lower() for n in names}) == len(names)
    assert all("/" not in n and " " not in n and not n.startswith(".") for n in names)


# ---- flags and input fields: refused in one sentence, or that line's error ----
@pytest.mark.parametrize("flags, words", [
    (["--sigma", "3"], "argument --sigma"),  # help: (0, 1]
    (["--sigma", "0"], "argument --sigma"),  # I_noise = I: nothing to resist
    (["--beta-head", "1.5"], "argument --beta-head")])
def test_out_of_range_or_contradictory_flags_are_refused_before_the_model_loads(flags, words, tmp_path, capsys):
    with pytest.raises(SystemExit):  # a model and data that do not exist: the flags are refused first
        stage.main([*flags, "--model", str(tmp_path / "none"), "--data", str(tmp_path / "none.jsonl"),
                    "--out", str(tmp_path / "pairs.jsonl")])
    assert words in capsys.readouterr().err and not (tmp_path / "pairs.jsonl.lock").exists()


def test_a_processor_that_refuses_two_images_is_one_sentence(tiny_llava):
    class OneImage:  # a processor that refuses a second image
        def apply_chat_template(self, messages, **kwargs):
            return "<image> " * (len(messages[0]["content"]) - 1) + "x"

        def __call__(self, text, images, **kwargs):
            raise ValueError("one image per prompt")
    with pytest.raises(SystemExit, match="refuses two images"):
        stage.check_two_images(OneImage())
    stage.check_two_images(stage.load_model(tiny_llava, "cpu")[1])  # I_aug = (I, I_crop): taken


def write_lines(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / "a.png")
    base = {"image": "a.png", "prompt": PROMPTS[2], "bbox": [4, 6, 30, 28]}
    (folder / "crops.jsonl").write_text("".join(json.dumps({**base, **r}) + "\n" for r in rows))
    return stage.read_instances(folder / "crops.jsonl", ("image", "prompt", "bbox"))[0]


def make_args(tmp_path, *flags):
    args = stage.parse_args(["--out", str(tmp_path / "pairs.jsonl"), "--max-new-tokens", "3",
                             "--focus-max-new-tokens", "2", *flags])
    if args.robust_instruction is None:  # main() resolves it
        args.robust_instruction = stage.ROBUST_INSTRUCTION
    return args


def test_a_bad_crop_or_bbox_field_is_that_lines_error(tiny_llava, tmp_path):
    model, processor = stage.load_model(tiny_llava, "cpu")
    bad = {"zoom": {"crop": "zoom"}, "bool": {"crop": True}, "null": {"crop": None}, "capital": {"crop": "Full"},
           "true_box": {"bbox": [True, 0, 5, 5]}, "flat": {"bbox": [4, 6, 4, 28]}, "upside": {"bbox": [4, 28, 30, 6]},
           "outside": {"bbox": [4, 6, 49, 28]}, "str_box": {"bbox": "4,6,30,28"}, "five": {"bbox": [1, 2, 3, 4, 5]},
           "three": {"bbox": [1, 2, 3]}, "negative": {"bbox": [-1, 0, 5, 5]}, "float": {"bbox": [1.0, 2, 3, 4]}}
    rows = write_lines(tmp_path, [{"id": "ok", "crop": "window"}, {"id": "full", "crop": "full"},
                                  {"id": "whole", "bbox": [0, 0, 48, 40]}] + [{"id": k, **v} for k, v in bad.items()])
    lines = stage.make_pairs(model, processor, make_args(tmp_path), rows)
    got = dict(zip([r["id"] for r in rows], lines))
    assert isinstance(got["ok"], dict) and isinstance(got["whole"], dict) and isinstance(got["full"], dict)
    assert got["full"]["focus"] is None
    for key in bad:
        assert isinstance(got[key], str), (key, got[key])
        assert ("'crop'" if key in ("zoom", "bool", "null", "capital") else "bbox") in got[key], got[key]


class Recorder:
    """A processor that records the texts of each batch it is asked to pad (the decoding batches)."""
    def __init__(self, processor):
        self.processor = processor
        self.batches = []

    def __call__(self, text=None, **kwargs):
        if kwargs.get("padding"):
            self.batches.append(list(text))
        return self.processor(text=text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.processor, name)


@pytest.mark.parametrize("instruction", [None, ""])
def test_prompt_robust_is_the_text_the_robustness_responses_were_decoded_after(tiny_llava, tmp_path, instruction):
    """pairs.jsonl's prompt_robust is the user text of y_l, y_init and both rows of y_w's contrastive
    amplification: the authors' instruction + " " + P, or P alone when the instruction is ''."""
    model, processor = stage.load_model(tiny_llava, "cpu")
    recorder = Recorder(processor)
    rows = write_lines(tmp_path, [{"id": "a"}, {"id": "b", "prompt": PROMPTS[0]}])
    flags = [] if instruction is None else ["--robust-instruction", instruction]
    lines = stage.make_pairs(model, recorder, make_args(tmp_path, *flags), rows)
    focus, plain, contrast = recorder.batches  # y_w, y_l per instance; y_l, y_init; experts, then amateurs
    for i, (row, line) in enumerate(zip(rows, lines)):
        want = row["prompt"] if instruction == "" else f"{stage.ROBUST_INSTRUCTION} {row['prompt']}"
        assert line["prompt_robust"] == want
        text = stage.chat_prompt(processor, want, 1)
        assert plain[2 * i: 2 * i + 2] == [text, text] and contrast[i] == contrast[i + len(rows)] == text
        assert focus[2 * i + 1] == stage.chat_prompt(processor, row["prompt"], 1)  # y_l of focus: P itself


def test_refine_init_with_lambda_zero_gives_y_init_itself(tiny_llava, tmp_path):
    """--refine-init: y_w draws y_init's uniforms, so at lambda_ca = 0 (beta_head 0: V_head is every token) y_w
    is y_init, token for token, at temperature 1; without it y_w has its own draws and differs."""
    model, processor = stage.load_model(tiny_llava, "cpu")
    images = random_images(4, seed=3)
    flags = ["--lambda-ca", "0", "--beta-head", "0", "--temperature", "1", "--top-p", "1", "--max-new-tokens", "12"]
    said = {}
    for refine in (True, False):
        args = make_args(tmp_path, *flags, *(["--refine-init"] if refine else []))
        jobs = [stage.robust_pair_contexts(str(i), PROMPTS[i], im, stage.derived_images(im, [0, 0, 20, 20], 0.2, 0,
                str(i)), args.refine_init) for i, im in enumerate(images)]
        y_w = stage.respond(model, processor, [j[0] for j in jobs], args)
        y_init = stage.respond(model, processor, [j[2] for j in jobs], args)
        said[refine] = (y_w, y_init)
        assert sum(len(t.split()) > 3 for t in y_init) >= 3, y_init  # long enough to tell samplers apart
    assert said[True][0] == said[True][1] == said[False][1]
    assert said[False][0] != said[False][1]


# ---- equivalence of the decoding loop ----
def test_lambda_zero_greedy_is_the_experts_generate(family):
    model, processor = family
    images = random_images(4)
    noise = [stage.add_noise(im, 0.2, 0, str(i)) for i, im in enumerate(images)]
    plain = inputs_for(processor, PROMPTS, images)
    with torch.no_grad():
        ref = model.generate(**plain, max_new_tokens=12, do_sample=False, eos_token_id=-1,
                             pad_token_id=processor.tokenizer.pad_token_id)[:, plain["input_ids"].shape[1]:].tolist()
    gens = [torch.Generator() for _ in PROMPTS]
    ca = stage.decode(model, inputs_for(processor, PROMPTS, images, noise), gens, NO_EOS, 12, 0.0, lambda_ca=0.0)
    assert ca == ref
    assert stage.decode(model, plain, gens, NO_EOS, 12, 0.0) == ref
    eos = stage.eos_token_ids(model, processor)  # with the model's EOS: each row stops where generate stops
    with torch.no_grad():
        ref = model.generate(**plain, max_new_tokens=12, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)[:, plain["input_ids"].shape[1]:].tolist()
    ref = [r[:next((i for i, t in enumerate(r) if t in eos), len(r))] for r in ref]
    assert stage.decode(model, inputs_for(processor, PROMPTS, images, noise), gens, eos, 12, 0.0, lambda_ca=0.0) == ref


def test_a_cache_the_model_ignores_is_an_error(tiny_llava):
    """A transformers version whose forward does not know `cache=` swallows it in **kwargs, so decoding would
    silently run without its past: decode must stop with an error instead (as under 5.17 before the fix)."""
    model, processor = stage.load_model(tiny_llava, "cpu")
    forward = model.forward

    def no_cache_forward(**kwargs):  # a forward that drops the cache it is given
        kwargs.pop("cache", None)
        return forward(**kwargs)
    model.forward = no_cache_forward
    inputs = inputs_for(processor, PROMPTS[:2], random_images(2))
    with pytest.raises(AssertionError, match="cache= was ignored"):
        stage.decode(model, inputs, [torch.Generator() for _ in range(2)], NO_EOS, 4, 0.0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_loop_equals_uncached_loop(family, temperature):
    model, processor = family
    images = random_images(4, seed=1)
    noise = [stage.add_noise(im, 0.2, 0, str(i)) for i, im in enumerate(images)]
    for amateur, lambda_ca in ((None, None), (noise, 1.0)):
        inputs = inputs_for(processor, PROMPTS, images, amateur)
        runs = [stage.decode(model, inputs, [stage.response_generator(0, i, "r") for i in range(4)], NO_EOS, 10,
                             temperature, 0.9, lambda_ca, use_cache=use_cache,
                             suppress_ids=stage.placeholder_ids(processor)) for use_cache in (True, False)]
        assert runs[0] == runs[1] and all(len(r) == 10 for r in runs[0])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_of_four_equals_four_batches_of_one(family, temperature):
    model, processor = family
    images = random_images(4, seed=2)
    noise = [stage.add_noise(im, 0.2, 0, str(i)) for i, im in enumerate(images)]
    gens = lambda idx: [stage.response_generator(0, i, "robust_w") for i in idx]  # noqa: E731
    batched = stage.decode(model, inputs_for(processor, PROMPTS, images, noise), gens(range(4)), NO_EOS, 10,
                           temperature, 0.9, 1.0)
    single = [stage.decode(model, inputs_for(processor, [PROMPTS[i]], [images[i]], [noise[i]]), gens([i]), NO_EOS,
                           10, temperature, 0.9, 1.0)[0] for i in range(4)]
    assert batched == single
    plain = stage.decode(model, inputs_for(processor, PROMPTS, images), gens(range(4)), NO_EOS, 10, temperature, 0.9)
    if temperature == 0 and processor.__class__.__name__.startswith("Llava"):  # the test can see CA act
        assert plain != batched, "lambda_ca = 1 changed no token: the amateur is not used"


# ---- the stage as a user runs it ----
def write_crops(folder, n_good=6, bad=True):
    """crops.jsonl with n_good usable lines (RGB, then "L", "RGBA", "P", "I;16" images, one "full" crop, an id with
    unsafe characters) and, with bad, one line of each kind of error."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, rows = np.random.default_rng(0), []
    modes = ["RGB", "L", "RGBA", "P", "I;16"]
    for i in range(n_good):
        a = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        img, mode = Image.fromarray(a), modes[i % len(modes)]
        if mode == "I;16":
            img = Image.fromarray((a[..., 0].astype(np.uint16) * 257))
            assert img.mode == "I;16", img.mode
        elif mode != "RGB":
            img = img.convert(mode)
        img.save(folder / f"img{i}.png")
        full = i == n_good - 1
        rows.append({"id": f"x{i}" if i != 1 else "odd/id 1", "image": f"img{i}.png", "prompt": PROMPTS[i % 4],
                     "bbox": [0, 0, 64, 48] if full else [8 + i, 4, 40 + i, 36], "crop": "full" if full else "window",
                     "answer": "", "method": "test"})
    if bad:
        (folder / "broken.png").write_text("not an image")
        rows += [dict(rows[0], id="missing", image="nope.png"), dict(rows[0], id="noprompt", prompt=" "),
                 {k: v for k, v in dict(rows[0], id="nobox").items() if k != "bbox"},
                 dict(rows[0], id="outside", bbox=[0, 0, 65, 48]), dict(rows[0], id="floats", bbox=[0.5, 0, 9, 9]),
                 dict(rows[0], id="broken", image="broken.png"), dict(rows[0])]  # the last: a repeated id
    with open(folder / "crops.jsonl", "w") as f:
        for j, r in enumerate(rows):
            f.write(json.dumps(r) + "\n")
            if bad and j == n_good:
                f.write("{not json\n")
    return folder / "crops.jsonl"


def read_out(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llava", "qwen"])
def test_stage_writes_pairs(request, tmp_path, name):
    data = write_crops(tmp_path / "data")
    out = tmp_path / "data" / "run" / "pairs.jsonl"
    run_script(SCRIPT, "--model", request.getfixturevalue(f"tiny_{name}"), "--data", data, "--out", out,
               "--max-new-tokens", "8", "--focus-max-new-tokens", "3", "--batch-size", "3", "--device", "cpu")
    rows = read_out(out)
    assert [r["id"] for r in rows] == ["x0", "odd/id 1", "x2", "x3", "x4", "x5"]  # every image mode, input order
    errors = {e["id"]: e["error"] for e in read_out(out.with_suffix(".errors.jsonl"))}
    assert set(errors) == {None, "missing", "noprompt", "nobox", "outside", "floats", "broken", "x0"}, errors
    for key, words in {None: "bad JSON", "missing": "image not found", "noprompt": "empty field 'prompt'",
                       "nobox": "missing field 'bbox'", "outside": "not a box inside", "floats": "4 integers",
                       "broken": "unreadable image", "x0": "repeats line"}.items():
        assert words in errors[key] and "crops.jsonl:" in errors[key], (key, errors[key])
    assert json.loads(out.with_suffix(".args.json").read_text())["enh_template"] == stage.ENH_TEMPLATE
    for i, r in enumerate(rows):
        src = out.parent / r["image"]  # paths are relative to the output file
        assert src.resolve() == (tmp_path / "data" / f"img{i}.png").resolve(), r["image"]
        views = {k: Image.open(out.parent / p) for k, p in r["images"].items()}
        assert set(views) == {"crop", "deg", "noise"}
        expected = stage.derived_images(stage.load_image(src), r["bbox"], 0.2, 0, r["id"])
        assert all(np.array_equal(np.asarray(views[k]), np.asarray(expected[k])) for k in views), r["id"]
        assert r["prompt_enh"].endswith(r["prompt"]) and r["gen"]["lambda_ca"] == 0.1 and r["gen"]["sigma"] == 0.2
        assert r["answer"] == "" and r["method"] == "test"  # input fields are copied
        for branch, keys in (("focus", {"chosen", "rejected"}), ("robust", {"chosen", "rejected", "init"})):
            assert r[branch] is None or (set(r[branch]) == keys and r[branch]["chosen"] != r[branch]["rejected"])
        # decoding per branch (authors'): focus greedy, its own length cap; robust sampled after the instruction
        # (no world.json beside this model: the authors' sentence); word-level tokenizer: a word is a token
        gen = r["gen"]
        assert (gen["focus_temperature"], gen["temperature"], gen["top_p"]) == (0.0, 0.2, 0.9)
        assert gen["robust_instruction"] == stage.ROBUST_INSTRUCTION and not gen["refine_init"]
        assert r["prompt_robust"] == f"{stage.ROBUST_INSTRUCTION} {r['prompt']}"
        assert all(len(t.split()) <= 3 for t in (r["focus"] or {}).values()), r["focus"]
        assert all(len(t.split()) <= 8 for t in (r["robust"] or {}).values()), r["robust"]
    assert rows[-1]["focus"] is None  # the "full" crop


def torchrun(nproc, *args):
    return run_torchrun(ROOT / SCRIPT, nproc, *args)


@pytest.mark.slow
def test_resume_after_sigkill_and_two_processes_equal_one_uninterrupted_run(tiny_llava, tmp_path):
    data = write_crops(tmp_path, n_good=10, bad=False)
    flags = ["--model", tiny_llava, "--data", data, "--max-new-tokens", "24", "--focus-max-new-tokens", "24",
             "--batch-size", "1", "--device", "cpu"]
    full, resumed, two = (tmp_path / d / "pairs.jsonl" for d in ("full", "resumed", "two"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, str(ROOT / SCRIPT), *map(str, flags), "--out", str(resumed)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if resumed.exists() and resumed.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_killed = resumed.read_bytes().count(b"\n")
    assert 1 <= n_killed < 10, f"the kill came after {n_killed} of 10 lines: not mid-run"
    with open(resumed, "ab") as f:  # and a line cut mid-write, as a kill during a flush leaves it
        f.write(b'{"id": "x9", "image": "../im')
    run_script(SCRIPT, *flags, "--out", resumed)
    run_script(SCRIPT, *flags, "--out", full)
    torchrun(2, *flags, "--out", two)  # gloo: each rank takes every other line, rank 0 merges by id
    lines = lambda p: [json.dumps(r, sort_keys=True) for r in read_out(p)]  # noqa: E731
    assert len(lines(full)) == 10 and sorted(lines(resumed)) == sorted(lines(full)) and lines(two) == lines(full)
    for run in ("resumed", "two"):  # the images too, byte for byte
        for p in (tmp_path / "full" / "pairs_images").iterdir():
            assert p.read_bytes() == (tmp_path / run / "pairs_images" / p.name).read_bytes(), (run, p.name)


@pytest.mark.slow
def test_every_line_failing_exits_nonzero(tiny_llava, tmp_path):
    data = tmp_path / "crops.jsonl"
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    data.write_text(json.dumps({"id": "a", "image": "a.png", "prompt": PROMPTS[0], "bbox": [0, 0, 40, 9]}) + "\n"
                    + json.dumps({"id": "b", "image": "none.png", "prompt": PROMPTS[0], "bbox": [0, 0, 4, 4]}) + "\n")
    proc = run_script(SCRIPT, "--model", tiny_llava, "--data", data, "--out", tmp_path / "pairs.jsonl",
                      "--device", "cpu", check=False)
    assert proc.returncode != 0 and "every line failed" in proc.stderr + proc.stdout
    assert len(read_out(tmp_path / "pairs.errors.jsonl")) == 2

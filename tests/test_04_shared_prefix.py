"""Stage 04's shared prefix: a pair's y_w and y_l scored in one packed row [prompt, y_w, y_l] (y_l blind to y_w,
its positions restarting after the prompt) give the log-probs of a row per response, and micro_step gives the same
losses and the same gradient on every trainable parameter, on tiny LLaVA and Qwen2.5-VL (M-RoPE), LoRA and full
fine-tuning, with gradient checkpointing, for lines with the focus pair only, the robust pair only, or both."""
import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_script, token_by_token_logprob

stage = load_script("04_train_calibrated_dpo.py")
ENH = "answer mainly based on the first image , refer to the cropping details of the second image if necessary : "
PROMPTS = ["describe the image .", "is there a red circle in the image ? answer using a single word or phrase .",
           "what colour is the square ?"]  # prompts (prefixes) of different lengths in one micro-batch
PAIRS = [("there is a red circle and a blue square", "no"), ("yes", "a green triangle and a red cross"),
         ("blue", "red square")]  # y_w longer, shorter, as long as y_l


def image(rng, w, h):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_pair_logprobs_equal_a_row_per_response(family, attention, request):
    """Both responses of a packed row = each in a row of its own (the shared block), and = one row alone scored one
    token at a time (conftest), with no padding and no mask: an expectation that does not use the packing."""
    model, processor = stage.load_model(request.getfixturevalue(f"tiny_{family}"), "cpu", attention)
    rng = np.random.default_rng(0)
    images = [[image(rng, 48, 48)], [image(rng, 70, 42), image(rng, 30, 60)], [image(rng, 30, 60)]]
    prompts = [PROMPTS[0], ENH + PROMPTS[1], PROMPTS[2]]  # one or two images, image grids of different sizes
    with torch.no_grad():  # (the reference's scoring: no graph)
        packed, n_packed = stage.pair_logprobs(model, *stage.build_pair_batch(processor, prompts, PAIRS, images))
        rows = stage.build_batch(processor, prompts * 2, [w for w, _ in PAIRS] + [l for _, l in PAIRS], images * 2)
        apart, n_apart = stage.response_logprobs(model, *rows)
    assert n_packed.tolist() == n_apart.tolist()
    torch.testing.assert_close(packed, apart, rtol=0, atol=1e-5)
    for k, response in enumerate([w for w, _ in PAIRS] + [l for _, l in PAIRS]):
        i = k % len(PAIRS)
        text = stage.chat_prompt(processor, prompts[i], len(images[i]))
        total, n = token_by_token_logprob(model, processor, text, response, images[i])
        assert n_packed[k].item() == n
        assert packed[k].item() == pytest.approx(total, abs=1e-4)


def examples(folder, lines, family):
    """Training examples (parse_line's form) with random reference log-probs (so the loss is not at ln 2) and
    CLIP scores; lines: a string of f (focus pair only), r (robust only), b (both)."""
    rng = np.random.default_rng(1)
    args = stage.parse_args([])
    out = []
    for i, kind in enumerate(lines):
        sizes = [(48, 48), (70, 42), (30, 60)] if family == "qwen" else [(48, 48)] * 3  # Qwen: grids differ too
        for role, (w, h) in zip(("image", "crop", "deg", "noise"), sizes + [(56, 56)]):
            image(rng, w, h).save(folder / f"{role}{i}.png")
        w, l = PAIRS[i % len(PAIRS)]
        row = {"image": f"image{i}.png", "prompt": PROMPTS[i % len(PROMPTS)],
               "prompt_enh": ENH + PROMPTS[i % len(PROMPTS)],
               "images": {"crop": f"crop{i}.png", "deg": f"deg{i}.png", "noise": f"noise{i}.png"},
               "focus": {"chosen": w, "rejected": l}, "robust": {"chosen": l + " and a circle", "rejected": w},
               "keep": {"focus": kind in "fb", "robust": kind in "rb"},
               "ref": {k: float(rng.uniform(-30, -5)) for k in ("focus_w", "focus_l", "calib_aug_w", "calib_deg_w",
                                                                "calib_aug_l", "calib_deg_l", "robust_w", "robust_l")},
               "clip": {"crop": float(rng.uniform(0.3, 0.9)), "image": float(rng.uniform(0.3, 0.9))}}
        out.append(stage.parse_line(row, str(folder), args))
    return out


def grads_of(model, processor, mb, args, shared_prefix):
    """(losses, {name: .grad}) of one micro_step from zero gradients; shared_prefix=False: a row per response."""
    model.zero_grad(set_to_none=True)
    batches = stage.term_batches(processor, [ex for ex, _ in mb], shared_prefix=shared_prefix)
    losses, sums = stage.micro_step(model, processor, mb, args, contextlib.nullcontext(), 0.5, batches)
    return losses, sums, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("train", ["lora", "full", "lora+checkpointing"])
@pytest.mark.parametrize("lines", ["fff", "rrr", "bfrb"])
@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_micro_step_shared_prefix_equals_a_row_per_response(family, lines, train, request, tmp_path):
    flags = ["--lora-dropout", "0", "--lora-rank", "0" if train == "full" else "4"]
    flags += ["--grad-checkpointing"] * ("checkpointing" in train)
    args = stage.parse_args(flags)
    mb = [(ex, 1.0) for ex in examples(tmp_path, lines, family)]
    model, processor = stage.load_model(request.getfixturevalue(f"tiny_{family}"), "cpu")
    torch.manual_seed(0)
    model = stage.prepare(model, args, 1)
    for m in model.modules():  # B = 0 at init: give A a gradient too
        if isinstance(m, stage.LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.1)
    shared, shared_sums, shared_grads = grads_of(model, processor, mb, args, True)
    apart, apart_sums, apart_grads = grads_of(model, processor, mb, args, False)
    torch.testing.assert_close(shared, apart, rtol=0, atol=1e-5)
    torch.testing.assert_close(shared_sums, apart_sums, rtol=0, atol=1e-5)
    assert shared_grads.keys() == apart_grads.keys() and len(apart_grads) > 4
    assert sum(int(g.abs().sum() > 0) for g in apart_grads.values()) > len(apart_grads) // 2  # (not all zero)
    for name, g in apart_grads.items():
        torch.testing.assert_close(shared_grads[name], g, rtol=0, atol=1e-5, msg=name)


def test_the_rows_it_packs(tiny_llava, tmp_path):
    """term_batches packs only the pair contexts, one row per line (shared_prefix=False, benchmarks: a row each)."""
    processor = stage.load_model(tiny_llava, "cpu")[1]
    exs = examples(tmp_path, "bb", "llava")
    packed = stage.term_batches(processor, exs)  # (the default, micro_step's)
    rows = {keys: (score.__name__, batch[0]["input_ids"].shape[0]) for keys, _, score, batch in packed}
    assert rows == {("focus_w", "focus_l"): ("pair_logprobs", 2), ("robust_w", "robust_l"): ("pair_logprobs", 2),
                    ("aug",): ("response_logprobs", 2), ("deg",): ("response_logprobs", 2)}
    apart = stage.term_batches(processor, exs, shared_prefix=False)
    assert {keys: score.__name__ for keys, _, score, _ in apart} == dict.fromkeys(rows, "response_logprobs")

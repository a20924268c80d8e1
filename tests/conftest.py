"""Test fixtures and the two test tiers.

    python -m pytest -q tests           # the inner loop: every equation, bug-class and reliability test
    python -m pytest -q tests --slow    # both tiers: also the tests marked slow (end-to-end pipeline runs,
                                        # stages run as subprocesses, torchrun, benchmarks)

A test that runs a script as a subprocess, runs torchrun or runs a benchmark is marked `@pytest.mark.slow`;
without --slow it is skipped. The tiny random models come from tiny_models.py (the benchmarks build theirs
there too) and every script is loaded through stage_loader.py; nothing is downloaded.
"""
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # stage_loader.py and tiny_models.py sit in the repository root
from stage_loader import load_stage  # noqa: E402
from tiny_models import make_tiny_llava, make_tiny_qwen  # noqa: E402

load_script = load_stage  # the name the test files use
torch.set_num_threads(1)  # tiny models: one thread is fastest and does not stall on a busy second core


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run the tests marked slow (end-to-end, subprocess stages, torchrun, benchmarks)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end, subprocess, torchrun or benchmark test; runs with --slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("tiny_llava") / "model")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    return make_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen") / "model")


def run_script(name, *args, check=True, timeout=600, cwd=ROOT, **kw):
    """Run a stage as a user would: `python NAME ARGS...` from the repository root (or from `cwd`)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(ROOT / name), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}")
    return proc


def run_torchrun(script, nproc, *args, timeout=300):
    """Run a stage under `torchrun --standalone --nproc_per_node=nproc` (gloo on CPU), as a user would."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@torch.no_grad()
def naive_sample(logits, u, temperature, top_p):
    """The stages' sampler written naively, for the tests that check it: one token from 1-D fp32 logits u, a
    uniform: softmax(logits / T), the smallest top set of mass >= top_p, its inverse CDF at u (T 0: argmax)."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, -1).tolist()
    order = sorted(range(len(probs)), key=lambda v: -probs[v])
    kept, mass = [], 0.0
    for v in order:
        if mass >= top_p:
            break
        kept.append(v)
        mass += probs[v]
    target, acc = u * sum(probs[v] for v in kept), 0.0
    for v in kept:
        acc += probs[v]
        if target < acc:
            return v
    return kept[-1]


def token_by_token_logprob(model, processor, chat_text, response, images):
    """(log pi(y | c), n): one row alone, no padding, one plain forward per prefix of the response + EOS; the
    reference that batched, masked scoring is tested against. chat_text: the chat prompt with its image tokens."""
    tok = processor.tokenizer
    enc = processor(text=[chat_text], images=images, return_tensors="pt")
    resp = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    total = 0.0
    for t in range(len(resp)):
        extra = torch.tensor([resp[:t]], dtype=torch.long)
        feed = dict(enc, input_ids=torch.cat([enc["input_ids"], extra], 1),
                    attention_mask=torch.ones(1, enc["input_ids"].shape[1] + t, dtype=torch.long))
        if "mm_token_type_ids" in enc:
            feed["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(extra)], 1)
        total += torch.log_softmax(model(**feed).logits[0, -1].double(), -1)[resp[t]].item()
    return total, len(resp)

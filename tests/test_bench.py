"""Benchmarks: each bench/ script runs on a CPU with small settings and writes the numbers it prints."""
import json
import math
import sys

from conftest import ROOT, load_script, run_script


def test_gpu_scale_small_on_cpu(tmp_path):
    """bench/gpu_scale.py --size small runs every part on a CPU (the code path --size 7b takes on a GPU) and writes
    positive times, throughputs and memory; output_attentions' measured stack equals L x B x H x T^2 x bytes."""
    out = tmp_path / "gpu_scale.json"
    proc = run_script("bench/gpu_scale.py", "--size", "small", "--device", "cpu", "--new-tokens", "4",
                      "--batch-sizes", "1", "2", "--reps", "1", "--train-batch", "1", "--accum", "2", "--json", out)
    assert "not judged (small config)" in proc.stdout, proc.stdout
    res = json.loads(out.read_text())
    assert res["size"] == "small" and res["card"] == "cpu" and res["dtype"] == "float32", res
    assert res["params_b"] > 0.01 and res["weights_gb"] > 0 and res["build_s"] > 0 and res["wall_s"] > 0, res
    a = res["attention"]
    assert a["tokens"] > 576 and a["layer"] == 2, a  # 576 image tokens + prompt + answer; 01's middle layer of 4
    for part in ("attention", "grad_att", "output_attentions"):
        assert a[part]["s"] > 0 and a[part]["peak_gb"] > 0 and a[part]["extra_mb"] >= 0, (part, a[part])
    stack = 4 * 1 * 4 * a["tokens"] ** 2 * 4 / 2**20  # L x B x H x T^2 x fp32 bytes, MiB
    assert math.isclose(a["stack_mb"], stack) and math.isclose(a["output_attentions"]["kept_mb"], stack), a
    assert math.isclose(a["one_layer_mb"] * 4, stack), a
    assert set(res["decode"]) == {"B1", "B2"}, res["decode"].keys()
    for key, r in res["decode"].items():
        B = int(key[1:])
        for mode in ("plain", "ca"):
            m = r[mode]
            assert m["s"] > 0 and m["peak_gb"] > 0 and m["extra_mb"] >= 0, (key, mode, m)
            assert math.isclose(m["tok_per_s"], B * 4 / m["s"]), (key, mode, m)
        assert math.isclose(r["ca_over_plain"], r["ca"]["s"] / r["plain"]["s"]), r
    for variant in ("precomputed", "live_ref"):
        t = res["train"][variant]
        assert (t["lines"], t["micro_batch"], t["accum"], t["lora_rank"]) == (2, 1, 2, 32), t
        # LoRA r 32 on every linear of 4 layers: q, k, v, o (256 -> 256), gate, up (256 -> 688), down (688 -> 256)
        assert math.isclose(t["trainable_m"], 4 * 32 * (4 * 512 + 3 * (256 + 688)) / 1e6), t
        assert t["s"] > 0 and t["examples_per_s"] > 0 and t["peak_gb"] > 0 and math.isfinite(t["loss"]), t
    pre, live, ratio = res["train"]["precomputed"], res["train"]["live_ref"], res["train"]["ratio"]
    assert math.isclose(ratio["time"], pre["s"] / live["s"]), ratio
    assert math.isclose(ratio["memory"], pre["peak_gb"] / live["peak_gb"]) and ratio["memory"] < 1, ratio  # + a model


def test_gpu_scale_7b_config():
    """--size 7b builds LLaVA-1.5-7B's shapes: 7,063,427,072 parameters = Llama-2-7B's 6,738,415,616 + 64 padded
    vocabulary rows x 4096 x 2 (embedding, lm_head) + CLIP ViT-L/14-336's tower 303,507,456 + the projector (1024 x
    4096 + 4096 x 4096 + biases) 20,979,712 (built on the meta device: nothing allocated); its processor makes 576
    image tokens of a 336 px image."""
    sys.path.insert(0, str(ROOT / "bench"))
    gpu_scale = load_script("bench/gpu_scale.py")
    model, processor = gpu_scale.build_model("7b", "meta", 0)
    assert sum(p.numel() for p in model.parameters()) == 7_063_427_072
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads,
            text.vocab_size) == (4096, 11008, 32, 32, 32064), text
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (1024, 24, 336, 14)
    assert model.config.vision_feature_layer == -2 and len(processor.tokenizer) <= text.vocab_size
    enc = processor(text=["user : <image> describe the image ."], images=gpu_scale.images(1, 0), return_tensors="pt")
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 576


# ---- bench_pope.py and bench_growth.py: on a --tiny toy world built here, so world/ need not exist ----
import math as _math  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def bench_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_world") / "world"
    run_script("00_toy_world.py", "--tiny", "--out", out, "--seed", "3")
    return out


def test_bench_pope_small(bench_world, tmp_path):
    """bench_pope.py answers the same questions batched (05's generate_greedy) and one by one, on the toy model and
    the 36M LLaVA; the two modes give the same answers (the 36M model's random answers run to the cap, so they are
    not trivially equal); the table and the JSON hold the same, consistent numbers; exit 1 only with MISSED."""
    out = tmp_path / "pope.json"
    proc = run_script("bench/bench_pope.py", "--world", bench_world, "--questions", 8, "--questions-llava35m", 3,
                      "--batch-size", 4, "--max-new-tokens", 6, "--json", out, check=False)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    assert ("MISSED" in proc.stdout) == (proc.returncode == 1), proc.stdout
    res = json.loads(out.read_text())
    assert set(res) == {"toy", "llava35m"}, res
    assert res["toy"]["questions"] == 8 and res["llava35m"]["questions"] == 3, res
    assert 30 < res["llava35m"]["params_m"] < 40 and res["toy"]["params_m"] < 5, res
    assert res["llava35m"]["mean_answer_words"] > 3, res  # 6 new tokens of random words: real answers compared
    for name, r in res.items():
        assert r["texts_differ"] == r["yes_no_differ"] == 0 and r["first_difference"] is None, (name, r)
        assert r["batched_qps"] > 0 and r["single_qps"] > 0 and 0 <= r["accuracy"] <= 1, (name, r)
        assert _math.isclose(r["speedup"], r["batched_qps"] / r["single_qps"]), (name, r)
        row = next(line.split() for line in proc.stdout.splitlines() if line.startswith(name + " "))
        assert row[2] == str(r["questions"]) and row[5] == f"{r['speedup']:.2f}", (row, r)


def test_bench_growth_small(bench_world, tmp_path):
    """bench_growth.py runs 01 -> 02 -> 03 as subprocesses at --limit 1, 2 and 4 of the tiny world's instances and
    derives per-instance times, the ratio, the line's intercept and the marginal ratio from the times it measured."""
    out = tmp_path / "growth.json"
    proc = run_script("bench/bench_growth.py", "--world", bench_world, "--sizes", 4, 2, "--fixed-size", 1,
                      "--rounds", 1, "--json", out, check=False)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    assert ("MISSED" in proc.stdout) == (proc.returncode == 1), proc.stdout
    res = json.loads(out.read_text())
    assert res["sizes"] == [2, 4] and res["fixed_size"] == 1 and set(res["stages"]) == {"01", "02", "03"}, res
    for stage, r in res["stages"].items():
        t2, t4, t1 = r["seconds"]["2"], r["seconds"]["4"], r["fixed_s"]
        assert min(t1, t2, t4) > 1, (stage, r)  # a real process: imports and a model load
        assert _math.isclose(r["per_instance_s"]["4"], t4 / 4) and _math.isclose(r["ratio"], (t4 / 4) / (t2 / 2))
        assert _math.isclose(r["slope_s"], (t4 - t2) / 2) and _math.isclose(r["intercept_s"], t2 - 2 * r["slope_s"])
        assert _math.isclose(r["marginal"], ((t4 - t2) / 2) / (t2 - t1)), (stage, r)
        assert f"{r['ratio']:6.2f}" in next(line for line in proc.stdout.splitlines() if line.startswith(stage))
    too_many = run_script("bench/bench_growth.py", "--world", bench_world, "--sizes", 2, 13, check=False)
    assert too_many.returncode != 0 and "has 12 lines, fewer than --sizes 13" in too_many.stderr, too_many.stderr

"""pipeline.py, the README's main command, on a --tiny world: every stage runs, the table is written, and a second
run redoes nothing that is complete."""
import json

from conftest import run_script


def test_pipeline_runs_every_stage_then_resumes(tmp_path):
    world, runs = tmp_path / "world", tmp_path / "runs"
    run_script("00_toy_world.py", "--tiny", "--out", world, "--seed", "1")
    # the tiny model's answers are random: loose filter thresholds so that lines reach 04
    flags = ["--world", world, "--runs", runs, "--filter-flags", "--max-ppl=1e9 --margin-low=-1e9 --margin-high=1e9",
             "--train-flags", "--epochs 1 --batch-size 2", "--jobs", "1"]
    first = run_script("pipeline.py", *flags).stdout
    for stage in ("01", "02", "03", "04 seed 0 full", "05 eval_base_test", "05 eval_full_test"):
        assert f"  {stage}" in first, (stage, first)
    assert "is built: skipped" in first  # 00: the world was there, so it was not rebuilt
    instances = [json.loads(x)["id"] for x in open(world / "instances.jsonl")]
    crops = [json.loads(x) for x in open(runs / "crops.jsonl")]
    assert [c["id"] for c in crops] == instances and all(len(c["bbox"]) == 4 for c in crops)  # 01: every line
    pairs = [json.loads(x) for x in open(runs / "seed0" / "pairs.jsonl")]
    assert [p["id"] for p in pairs] == instances and any(p["focus"] or p["robust"] for p in pairs)  # 02
    train = [json.loads(x) for x in open(runs / "seed0" / "train.jsonl")]
    assert train and {t["id"] for t in train} <= set(instances) and all("ref" in t and "keep" in t for t in train)
    steps = [json.loads(x) for x in open(runs / "seed0" / "full" / "metrics.jsonl")]  # 04: one row a step
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1)) and steps
    table = (runs / "results.md").read_text()
    assert "| base |" in table and "| P2-DPO |" in table and "CHAIR" in table, table
    metrics = json.loads((runs / "seed0" / "eval_full_test" / "metrics.json").read_text())
    assert set(metrics["mean"]) == {"0", "0.2"}
    model = runs / "seed0" / "full" / "model.safetensors"
    stamp = model.stat().st_mtime_ns
    # the second run: --ablations with P2-DPO alone, so it trains nothing new and adds the perception diagnostic
    second = run_script("pipeline.py", *flags, "--ablations", "--seeds", "0", "--variants", "full").stdout
    assert "04 seed 0 full" not in second and model.stat().st_mtime_ns == stamp  # a saved model is not retrained
    ablations = (runs / "ablations.md").read_text()
    rows = lambda text: [x for x in text.split("\n") if x.startswith(("| base |", "| P2-DPO |"))]  # noqa: E731
    assert rows(table) and rows(ablations)[:len(rows(table))] == rows(table)  # the same POPE and CHAIR numbers
    # the perception table: stage 01 run for the base model and P2-DPO on the test images' open questions
    perception = json.loads((runs / "perception_test" / "metrics.json").read_text())
    assert set(perception) == {"base", "full_seed0"} and "  perception" in second
    section = ablations.split("**Perception**")[1]
    assert "| model | open-question accuracy % | AFR | attention ratio | P-Acc % | P-Acc top half % |" in section
    for name, key in (("base", "base"), ("P2-DPO", "full_seed0")):
        m = perception[key]
        assert (f"| {name} | {m['accuracy']:.1f} | {m['afr']:.2f} | {m['attention_ratio']:.2f} | {m['p_acc']:.1f} | "
                f"{m['p_acc_top']:.1f} |") in section, (name, section)

    # the analysis scripts read what the pipeline wrote
    run_script("analysis/figure_pairs.py", "--pairs", runs / "seed0" / "pairs.jsonl", "--out", tmp_path / "f.png",
               "--n", 2)
    assert (tmp_path / "f.png").stat().st_size > 1000
    out = run_script("analysis/ips_on_vs_off_policy.py", "--pairs", runs / "seed0" / "pairs.jsonl", "--world", world,
                     "--out", tmp_path / "ips").stdout
    ips = json.loads((tmp_path / "ips" / "ips.json").read_text())
    assert set(ips) == {"on-policy", "off-policy", "rephrased"} and "share < 0" in out
    assert ips["on-policy"]["n"] == ips["rephrased"]["n"] > 0

    # the off-policy baseline's pairs (pipeline.py --ablations): 02's format, chosen = the truth rephrased,
    # rejected = the model's own greedy answer (01), at most as many lines as P2-DPO's train.jsonl
    out = runs / "seed0" / "offpolicy_pairs.jsonl"
    run_script("analysis/offpolicy_pairs.py", "--pairs", runs / "seed0" / "pairs.jsonl", "--world", world,
               "--lines", runs / "seed0" / "train.jsonl", "--out", out)
    rows = [json.loads(line) for line in open(out)]
    pairs = {r["id"]: r for r in map(json.loads, open(runs / "seed0" / "pairs.jsonl"))}
    assert 0 < len(rows) <= sum(1 for _ in open(runs / "seed0" / "train.jsonl"))
    for r in rows:
        assert r["robust"] is None and r["focus"]["rejected"] == pairs[r["id"]]["answer"]
        assert r["focus"]["chosen"] != r["focus"]["rejected"] and r["images"] == pairs[r["id"]]["images"]

"""pipeline.py, the README's main command: on a --tiny world every stage runs, the table is written, and a second
run, from another folder with relative paths, redoes nothing that is complete (slow); the paths each stage is given
and the training-data table (fast, on the functions)."""
import json
from pathlib import Path

import pytest

from conftest import ROOT, load_script, run_script

pipeline = load_script("pipeline.py")
PATH_FLAGS = ("--model", "--data", "--out", "--clip", "--questions", "--describe", "--pairs", "--world", "--lines")


class Stop(Exception):
    pass


def test_every_stage_gets_absolute_paths_when_run_from_another_folder(tmp_path, monkeypatch):
    """`pipeline.py --world w --runs r` from a folder outside the repository: the stages (and their logs) get the
    caller's w and r as absolute paths, so a stage started anywhere reads and writes there, never in the repository.
    No world yet, so 00 is run too; 05 is the last stage recorded."""
    caller = tmp_path / "elsewhere"
    caller.mkdir()
    monkeypatch.chdir(caller)
    jobs = []

    def record(todo, n):
        jobs.extend(todo)
        if any(what.startswith("05") for _, _, what in todo):
            raise Stop

    monkeypatch.setattr(pipeline, "run_many", record)
    with pytest.raises(Stop):
        pipeline.main(["--world", "w", "--runs", "r", "--variants", "full", "filter_dpo", "offpolicy"])
    stages = {Path(cmd[1]).name for cmd, _, _ in jobs}
    assert stages == {"00_toy_world.py", "01_attention_crop.py", "02_make_pairs.py", "03_filter.py",
                      "offpolicy_pairs.py", "04_train_calibrated_dpo.py", "05_eval_pope.py"}, stages
    for cmd, log, what in jobs:
        assert Path(log).is_absolute() and Path(log).is_relative_to(caller / "r"), (what, log)
        values = [cmd[i + 1] for i, flag in enumerate(cmd) if flag in PATH_FLAGS and cmd[i + 1] != "none"]
        assert values, (what, cmd)
        for v in values:
            assert Path(v).is_absolute() and Path(v).is_relative_to(caller), (what, v)
    models = {cmd[cmd.index("--model") + 1] for cmd, _, _ in jobs if "--model" in cmd}
    assert str(caller / "w" / "model") in models
    assert [cmd[cmd.index("--out") + 1] for cmd, _, _ in jobs if cmd[1].endswith("00_toy_world.py")] == [
        str(caller / "w")]


def write_report(path, ratios):
    """A stage-03 report with 4 lines written, 3 focus pairs kept of 4, 2 lines keeping both branches, and the
    CLIP ratios of those lines (none: 03 ran with --clip none, or no line kept both)."""
    median, p05, p95 = ratios or (None, None, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "written": 4, "kept_both": 2, "branches": {"focus": {"kept": 3, "pairs": 4}, "robust": {"kept": 2, "pairs": 2}},
        "clip_ratio_kept_both": {"n": 2 if ratios else 0, "median": median, "p05": p05, "p95": p95}}))


def test_data_table_shows_a_dash_where_03_reported_no_clip_ratio(tmp_path):
    write_report(tmp_path / "seed0" / "train.report.json", (1.04, 0.9, 1.2))
    write_report(tmp_path / "seed0" / "train_offpolicy.report.json", None)  # 03 with --clip none
    rows = pipeline.data_table(tmp_path, [0], ["full", "offpolicy"]).split("\n")
    cells = lambda name: [c.strip() for c in next(r for r in rows if r.startswith(f"| {name}")).split("|")[1:-1]]
    assert cells("train.jsonl") == ["train.jsonl (full)", "4", "3 / 4", "2 / 2", "2", "1.04", "0.90 - 1.20"]
    assert cells("train_offpolicy.jsonl") == ["train_offpolicy.jsonl (offpolicy)", "4", "3 / 4", "2 / 2", "2",
                                              "-", "-"]


@pytest.mark.slow
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
    # the second run: --ablations with P2-DPO alone, so it trains nothing new and adds the perception diagnostic;
    # from the folder above world/ and runs/, named relatively: the same files, nothing made in the repository
    in_repository = sorted(p.name for p in ROOT.iterdir())
    relative = ["world" if f == world else "runs" if f == runs else f for f in flags]
    second = run_script("pipeline.py", *relative, "--ablations", "--seeds", "0", "--variants", "full",
                        cwd=tmp_path).stdout
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

    # the world's four numbers: analysis/world_phenomena.py's metrics.json, in ablations.md
    world_numbers = json.loads((runs / "world_phenomena" / "metrics.json").read_text())
    section = ablations.split("**The world**")[1]
    o = world_numbers["open"]
    assert f"| stage 01's crop holds the object % | {o['hold_pct']} |" in section, section
    assert f"| zoom gain: (I, 01's crop) + P_enh minus I alone, points | {o['zoom_gain']:+.1f} |" in section
    assert f"% (all {world_numbers['degenerate']['all']['n']} prompts) | " in section

    # the analysis scripts read what the pipeline wrote (ips: relative paths, from tmp_path)
    run_script("analysis/figure_pairs.py", "--pairs", runs / "seed0" / "pairs.jsonl", "--out", tmp_path / "f.png",
               "--n", 2)
    assert (tmp_path / "f.png").stat().st_size > 1000
    seed_pairs = [json.loads(line) for line in open(runs / "seed0" / "pairs.jsonl")]
    if not any(r["focus"] for r in seed_pairs):  # the tiny model may answer alike with and without the object
        with open(runs / "seed0" / "pairs_ips.jsonl", "w") as f:  # then: 01's answer over a bare "no"
            f.writelines(json.dumps({**r, "focus": {"chosen": r["answer"], "rejected": "no"}}) + "\n" for r in seed_pairs)
    name = "pairs.jsonl" if any(r["focus"] for r in seed_pairs) else "pairs_ips.jsonl"
    out = run_script("analysis/ips_on_vs_off_policy.py", "--pairs", f"runs/seed0/{name}", "--world", "world",
                     "--out", "ips", cwd=tmp_path).stdout
    assert sorted(p.name for p in ROOT.iterdir()) == in_repository
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

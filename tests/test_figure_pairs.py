"""analysis/figure_pairs.py draws lines with both pairs first, then lines with one (a world where no line has both
still gets its figure, which the pipeline test's tiny world needs)."""
import json
import subprocess
import sys

from PIL import Image

from conftest import ROOT


def test_a_line_with_one_pair_is_drawn(tmp_path):
    for name in ("i", "c", "d", "n"):
        Image.new("RGB", (16, 16), (200, 40, 40)).save(tmp_path / f"{name}.png")
    row = {"image": "i.png", "prompt": "describe the image .", "attn": [[0.25, 0.25], [0.25, 0.25]],
           "bbox": [0, 0, 8, 8], "images": {"crop": "c.png", "deg": "d.png", "noise": "n.png"}}
    lines = [{**row, "id": "a", "focus": None, "robust": None},  # no pair: never drawn
             {**row, "id": "b", "focus": {"chosen": "there is a red square .", "rejected": "no"}, "robust": None}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    run = subprocess.run([sys.executable, str(ROOT / "analysis/figure_pairs.py"), "--pairs",
                          str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "f.png"), "--n", "4"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "(1 instances)" in run.stdout and Image.open(tmp_path / "f.png").size[1] > 24

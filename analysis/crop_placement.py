"""Where in stage 01's window the queried object lies, and what that does to the zoom gain (the toy world, val).

analysis/world_phenomena.py measures the zoom gain: accuracy with (I, I.crop(01's bbox)) + P_enh minus accuracy
with I alone, on world/val's open questions. This script reads its output and splits that gain by where the
object's centre lies in 01's window:
  central half   the centre is within a quarter of the window's side from the window's centre, on both axes
  outer band     inside the window, but not in its central half
  outside        not inside the window (01's crop misses the object)
Then it answers the same questions once more with 01's window moved, same side, so that it is centred on the map's
peak cell (the grid cell of 01's "attn" with the most mass; ours, not the authors': their window is the one with
the most attention mass, found by a sliding search), and reports the gain per question kind. No ground truth
enters the moved window, only 01's own map.

  python analysis/world_phenomena.py && python analysis/crop_placement.py      # runs/world_phenomena
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # stage_loader.py sits in the repository root
from stage_loader import load_stage  # noqa: E402

WP = load_stage("analysis/world_phenomena.py")  # its questions' answers, scoring and centre_inside


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phenomena", default="runs/world_phenomena",
                   help="analysis/world_phenomena.py's --out (answers.jsonl, crops.jsonl)")
    p.add_argument("--world", default="world", help="the toy world (world.json, the val images)")
    p.add_argument("--model", default=None, help="the model to answer with (default: <world>/model)")
    p.add_argument("--batch-size", type=int, default=16, help="questions answered together")
    p.add_argument("--out", default=None, help="write the numbers as JSON here (default: print only)")
    return p.parse_args(argv)


def position(box, bbox):
    """"central" | "outer" | "outside": where the centre of box lies in the window bbox ([x1, y1, x2, y2] px,
    x2/y2 exclusive)."""
    if not WP.centre_inside(box, bbox):
        return "outside"
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    half_w, half_h = (bbox[2] - bbox[0]) / 4, (bbox[3] - bbox[1]) / 4
    mx, my = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    return "central" if abs(cx - mx) < half_w and abs(cy - my) < half_h else "outer"


def peak_window(attn, bbox, image_size):
    """01's window (its side kept) moved so that it is centred on the map's peak cell, then shifted to lie inside
    the image. attn: (h, w) grid map; the grid covers the image (the toy world's square images)."""
    attn = np.asarray(attn)
    h, w = attn.shape
    X, Y = image_size
    iy, ix = np.unravel_index(attn.argmax(), attn.shape)
    cx, cy = (ix + 0.5) * X / w, (iy + 0.5) * Y / h
    side_x, side_y = bbox[2] - bbox[0], bbox[3] - bbox[1]
    x = min(max(int(round(cx - side_x / 2)), 0), X - side_x)
    y = min(max(int(round(cy - side_y / 2)), 0), Y - side_y)
    return [x, y, x + side_x, y + side_y]


def split_gain(rows, key):
    """{group: {"n", "full", "zoom", "gain"}} (accuracies in %) over rows grouped by rows' `key`."""
    out = {}
    for group in sorted({r[key] for r in rows}):
        sel = [r for r in rows if r[key] == group]
        full = 100 * sum(r["full"] for r in sel) / len(sel)
        zoom = 100 * sum(r["enh"] for r in sel) / len(sel)
        out[group] = {"n": len(sel), "full": full, "zoom": zoom, "gain": zoom - full}
    return out


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    phen, world = Path(args.phenomena), Path(args.world)
    stage01 = load_stage("01_attention_crop.py")
    enh = load_stage("02_make_pairs.py").ENH_TEMPLATE
    settings = json.loads((world / "world.json").read_text())
    vocab = {"colour": settings["colours"], "shape": settings["shapes"]}
    crops = {r["id"]: r for r in map(json.loads, open(phen / "crops.jsonl"))}
    questions = {r["id"]: r for r in map(json.loads, open(phen / "questions.jsonl"))}
    rows = [r for r in map(json.loads, open(phen / "answers.jsonl")) if r["kind"] in vocab]
    for r in rows:
        r["position"] = position(r["box"], r["bbox"])
    result = {"by_position": split_gain(rows, "position")}
    for kind in vocab:
        result[f"by_position_{kind}"] = split_gain([r for r in rows if r["kind"] == kind], "position")
    # the same questions, 01's window centred on its map's peak cell
    model, processor = stage01.load_model(args.model or str(world / "model"), "cpu")
    inputs = []
    for r in rows:
        image = Image.open(phen / questions[r["id"]]["image"]).convert("RGB")
        r["peak_bbox"] = peak_window(crops[r["id"]]["attn"], r["bbox"], image.size)
        inputs.append((enh.format(question=r["prompt"]), [image, image.crop(r["peak_bbox"])]))
    answers = WP.answer_all(stage01, model, processor, inputs, rows, args.batch_size)
    for r, a in zip(rows, answers):
        r["enh"] = WP.correct(a, r["truth"], vocab[r["kind"]])  # the moved window's answer, scored as before
        r["hold_peak"] = WP.centre_inside(r["box"], r["peak_bbox"])
    result["peak_window"] = {}
    for kind in ("open",) + tuple(vocab):
        sel = [r for r in rows if kind == "open" or r["kind"] == kind]
        result["peak_window"][kind] = {**split_gain([{**r, "all": kind} for r in sel], "all")[kind],
                                       "hold": 100 * sum(r["hold_peak"] for r in sel) / len(sel)}
    print(f"zoom gain by where the object lies in stage 01's window ({phen}, {len(rows)} open questions):")
    for name in ("by_position", "by_position_colour", "by_position_shape"):
        for group, g in result[name].items():
            print(f"  {name[12:] or 'open':<7} {group:<8} n {g['n']:3d}  full view {g['full']:5.1f}  "
                  f"(I, 01's crop) {g['zoom']:5.1f}  gain {g['gain']:+5.1f}")
    print("01's window centred on its map's peak cell (same side):")
    for kind, g in result["peak_window"].items():
        print(f"  {kind:<7} n {g['n']:3d}  holds the object {g['hold']:5.1f}%  full view {g['full']:5.1f}  "
              f"(I, moved crop) {g['zoom']:5.1f}  gain {g['gain']:+5.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

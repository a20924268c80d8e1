"""One picture of the pipeline: for a few instances, the image with the model's attention and crop (01), the views
stage 02 made (I_crop, I_deg, I_noise) and the four responses of its focus and robustness pairs.

  python analysis/figure_pairs.py                    # after pipeline.py: runs/seed0/pairs.jsonl -> docs/pairs.png
"""
import argparse
import json
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIDE, PAD, TEXT_W = 160, 8, 430  # px: each image panel, the gaps, the text column


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", default="runs/seed0/pairs.jsonl", help="pairs.jsonl from stage 02 (has 01's fields)")
    p.add_argument("--out", default="docs/pairs.png", help="the PNG to write")
    p.add_argument("--n", type=int, default=4,
                   help="instances shown: the first ones with both pairs, then ones with one")
    return p.parse_args(argv)


def heat_overlay(image, attn, bbox):
    """The image dimmed where 01's normalised attention grid is low (colours stay true where the model looks: the
    world's objects are coloured, so a coloured heat map would hide them), and the chosen crop as a box."""
    grid = np.asarray(attn, dtype=np.float32)
    heat = Image.fromarray(np.uint8(255 * grid / grid.max())).resize(image.size, Image.BILINEAR)
    light = 0.25 + 0.75 * np.asarray(heat, dtype=np.float32)[..., None] / 255  # (Y, X, 1)
    out = Image.fromarray(np.uint8(np.asarray(image, dtype=np.float32) * light))
    ImageDraw.Draw(out).rectangle(bbox, outline=(255, 255, 255), width=2)
    return out


def panel(image):
    return image.convert("RGB").resize((SIDE, SIDE), Image.NEAREST)


def main():
    args = parse_args()
    pairs = Path(args.pairs)
    with_pair = [r for r in map(json.loads, open(pairs)) if r.get("focus") or r.get("robust")]
    # lines with both pairs first; lines with one fill up (a tiny or other world may have few with both)
    both = [r for r in with_pair if r.get("focus") and r.get("robust")]
    rows = (both + [r for r in with_pair if r not in both])[:args.n]
    if not rows:
        raise SystemExit(f"{pairs}: no line with a focus or a robustness pair")
    titles = ["I, dimmed by attention; crop", "I_crop", "I_deg", "I_noise"]
    width = 4 * (SIDE + PAD) + TEXT_W + PAD
    canvas = Image.new("RGB", (width, len(rows) * (SIDE + 2 * PAD) + 24), "white")
    draw = ImageDraw.Draw(canvas)
    for k, t in enumerate(titles):
        draw.text((PAD + k * (SIDE + PAD), 6), t, fill="black")
    for i, r in enumerate(rows):
        y = 24 + i * (SIDE + 2 * PAD)
        image = Image.open(pairs.parent / r["image"]).convert("RGB")
        views = [heat_overlay(image, r["attn"], r["bbox"])] + [Image.open(pairs.parent / r["images"][k])
                                                                for k in ("crop", "deg", "noise")]
        for k, v in enumerate(views):
            canvas.paste(panel(v), (PAD + k * (SIDE + PAD), y))
        none = {"chosen": "(no pair: equal responses)", "rejected": "-"}
        focus, robust = r.get("focus") or none, r.get("robust") or none
        text = [f"P: {r['prompt']}",
                f"focus   y_w (I_aug, P_enh): {focus['chosen']}", f"        y_l (I_deg, P): {focus['rejected']}",
                f"robust  y_w (contrastive): {robust['chosen']}", f"        y_l (I_noise, P): {robust['rejected']}"]
        lines = [w for t in text for w in textwrap.wrap(t, 68, subsequent_indent="          ")][:13]
        draw.multiline_text((4 * (SIDE + PAD) + PAD, y), "\n".join(lines), fill="black", spacing=2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(f"wrote {args.out} ({len(rows)} instances)")


if __name__ == "__main__":
    main()

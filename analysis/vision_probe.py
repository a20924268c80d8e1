"""Does the toy model's vision tower encode shape? A linear probe on its features, crop against full view.

Zooming can help a shape question only if the vision tower carries the shape of an object in a crop: the language
model cannot read what the tower does not encode. For each of --n fresh single-scene images (00's sample_scene and
render, a seed the world's images never used) one object is chosen; its features are the tower's last hidden states
averaged over the patches its box overlaps, in two inputs: the full 128-px canvas as the model sees it (the 64-px
view) and a --side-px crop centred on the object (stage 01's crop_base window, as an oracle crop). A multinomial
logistic regression (features standardised, L2 1e-3, Adam, 500 steps) is fitted on the first 2/3 and scored on the
rest: its shape accuracy (chance 25%) says how much shape the tower carries in each input.

  python analysis/vision_probe.py --model world/model            # prints crop and view accuracy
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stage_loader import load_stage  # noqa: E402 (the repository root is on sys.path only now)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="world/model", help="a toy-world model folder (00_toy_world.py's)")
    p.add_argument("--n", type=int, default=900, help="probe images (2/3 fit, 1/3 scored)")
    p.add_argument("--side-px", type=int, default=None,
                   help="crop side on the canvas (default: world.json's crop_base beside --model, else 56)")
    p.add_argument("--seed", type=int, default=123, help="draws the probe scenes")
    return p.parse_args(argv)


def probe_accuracy(features, labels, n_classes, n_fit, steps=500):
    """Held-out accuracy of a linear softmax probe fitted on the first n_fit rows. features (n, d)."""
    mean, std = features[:n_fit].mean(0), features[:n_fit].std(0) + 1e-6
    x = (features - mean) / std
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    with torch.enable_grad():  # (main runs under no_grad)
        for _ in range(steps):
            loss = F.cross_entropy(x[:n_fit] @ w + b, labels[:n_fit]) + 1e-3 * (w ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return float(((x[n_fit:] @ w + b).argmax(1) == labels[n_fit:]).float().mean())


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    tw = load_stage("00_toy_world.py")
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    tower = model.model.vision_tower
    world = Path(args.model).parent / "world.json"
    side = args.side_px or (json.loads(world.read_text())["crop_base"] if world.is_file() else 56)
    view, patch = tower.config.image_size, tower.config.patch_size
    defaults = tw.parse_args([])
    rng = np.random.default_rng(args.seed)
    popularity, themes = tw.class_statistics(rng)
    feats, shapes = {"crop": [], "view": []}, []
    for _ in range(args.n):
        scene = tw.sample_scene(rng, popularity, themes, defaults.canvas, defaults.obj_size)
        image, _ = tw.render(scene, defaults.canvas)
        box = scene["objects"][0]["box"]
        x = min(max(0, (box[0] + box[2] - side) // 2), defaults.canvas - side)
        y = min(max(0, (box[1] + box[3] - side) // 2), defaults.canvas - side)
        crop = [x, y, x + side, y + side]
        for kind, frame in (("crop", crop), ("view", [0, 0, defaults.canvas, defaults.canvas])):
            pixels = tw.pixel_values(processor, [image.crop(frame)])
            hidden = tower(pixel_values=pixels).last_hidden_state[0, 1:]  # (N, d), CLS dropped
            mask = tw.object_patches(box, frame, view, patch)  # (N,) (00's, as its stage 1 uses it)
            feats[kind].append((hidden * mask[:, None]).sum(0) / mask.sum())
        shapes.append(tw.SHAPES.index(scene["objects"][0]["class"].split()[1]))
    labels = torch.tensor(shapes)
    n_fit = 2 * args.n // 3
    for kind in ("crop", "view"):
        acc = probe_accuracy(torch.stack(feats[kind]), labels, len(tw.SHAPES), n_fit)
        what = f"a {side}-px crop around the object" if kind == "crop" else "the full view"
        print(f"shape read from the tower, {what}: {100 * acc:.1f}% ({args.n - n_fit} held-out images; chance 25%)")


if __name__ == "__main__":
    main()

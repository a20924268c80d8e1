"""analysis/vision_probe.py: which patches an object covers (00's object_patches, which the probe uses), and the
probe's held-out accuracy, against hand counts."""
import torch

from conftest import load_script

vp = load_script("analysis/vision_probe.py")
toy = load_script("00_toy_world.py")


def test_object_patches_in_the_view_and_in_a_crop():
    # full 128-px canvas seen at 64 px, patch 8: a box [16, 16, 40, 24] is [8, 8, 20, 12] in view px, so it
    # overlaps patch columns 1-2 (8-15, 16-23) and patch row 1 (8-15): cells (1, 1) and (1, 2) of the 8 x 8 grid
    got = toy.object_patches([16, 16, 40, 24], [0, 0, 128, 128], 64, 8).reshape(8, 8)
    want = torch.zeros(8, 8)
    want[1, 1] = want[1, 2] = 1
    assert torch.equal(got, want)
    # a 32-px crop at (16, 16) seen at 64 px (2 view px per canvas px): the same box is [0, 0, 48, 16]
    got = toy.object_patches([16, 16, 40, 24], [16, 16, 48, 48], 64, 8).reshape(8, 8)
    want = torch.zeros(8, 8)
    want[0:2, 0:6] = 1
    assert torch.equal(got, want)


def test_probe_reads_what_the_features_carry_and_nothing_else():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (300,))
    carried = torch.nn.functional.one_hot(labels, 4).float() + 0.1 * torch.randn(300, 4)
    assert vp.probe_accuracy(torch.cat([carried, torch.randn(300, 8)], 1), labels, 4, 200) > 0.95
    assert vp.probe_accuracy(torch.randn(300, 12), labels, 4, 200) < 0.45  # chance is 0.25

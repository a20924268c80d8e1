"""analysis/crop_placement.py's arithmetic: where an object lies in a window, the window moved onto the map's peak
cell, and the zoom gain split by group (expectations worked out by hand below)."""
import numpy as np

from conftest import load_script

placement = load_script("analysis/crop_placement.py")


def test_position_central_outer_outside():
    """A 64-px window at (0, 0): its central half is 16 < x, y < 48 around the centre 32; x2 is exclusive."""
    window = [0, 0, 64, 64]
    assert placement.position([28, 28, 36, 36], window) == "central"  # centre (32, 32)
    assert placement.position([44, 28, 50, 36], window) == "central"  # centre (47, 32): 15 from 32 < 16
    assert placement.position([45, 28, 51, 36], window) == "outer"  # centre (48, 32): 16, not < 16
    assert placement.position([40, 2, 48, 10], window) == "outer"  # x central (44 - 32 = 12), y not (6)
    assert placement.position([60, 60, 68, 68], window) == "outside"  # centre (64, 64): x2 = 64 is outside
    assert placement.position([10, 10, 20, 20], [16, 16, 80, 80]) == "outside"  # centre (15, 15) left of 16


def test_peak_window_centres_on_the_peak_cell_and_stays_inside():
    """An 8 x 8 grid over a 128-px image: cell (row 2, col 5) spans x 80-96, y 32-48, centre (88, 40)."""
    attn = np.full((8, 8), 0.01)
    attn[2, 5] = 0.5
    assert placement.peak_window(attn, [0, 0, 64, 64], (128, 128)) == [56, 8, 120, 72]  # 88 - 32, 40 - 32
    assert placement.peak_window(attn, [10, 20, 90, 100], (128, 128)) == [48, 0, 128, 80]  # side 80: y -> 0
    attn = np.full((8, 8), 0.01)
    attn[7, 7] = 0.5  # centre (120, 120): the 64-px window shifts back inside, to 64-128
    assert placement.peak_window(attn, [0, 0, 64, 64], (128, 128)) == [64, 64, 128, 128]


def test_split_gain_per_group():
    rows = [{"g": "a", "full": True, "enh": True}, {"g": "a", "full": False, "enh": True},
            {"g": "b", "full": True, "enh": False}, {"g": "b", "full": True, "enh": True},
            {"g": "b", "full": False, "enh": False}]
    out = placement.split_gain(rows, "g")
    assert out["a"] == {"n": 2, "full": 50.0, "zoom": 100.0, "gain": 50.0}
    assert out["b"]["n"] == 3 and abs(out["b"]["full"] - 200 / 3) < 1e-9 and abs(out["b"]["gain"] + 100 / 3) < 1e-9

"""analysis/world_phenomena.py: the arithmetic of the four numbers, against counts done by hand."""
from conftest import load_script

wp = load_script("analysis/world_phenomena.py")
COLOURS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle", "cross"]


def test_centre_inside_is_exclusive_at_the_far_edges():
    box = [10, 10, 20, 20]  # centre (15, 15)
    assert wp.centre_inside(box, [0, 0, 16, 16])
    assert not wp.centre_inside(box, [0, 0, 15, 15])  # x2, y2 exclusive
    assert wp.centre_inside(box, [15, 15, 40, 40])
    assert not wp.centre_inside(box, [16, 0, 40, 40])


def test_oracle_box_is_centred_clamped_and_holds_the_object():
    assert wp.oracle_box([40, 40, 50, 50], 48, (128, 128)) == [21, 21, 69, 69]
    assert wp.oracle_box([100, 100, 110, 110], 48, (128, 128)) == [80, 80, 128, 128]  # clamped
    assert wp.oracle_box([0, 0, 60, 60], 48, (128, 128)) == [0, 0, 64, 64]  # object + 4 px


def test_degenerate_means_not_of_the_prompt_kind():
    assert wp.degenerate("describe", "no", COLOURS, SHAPES)
    assert not wp.degenerate("describe", "there is a red circle .", COLOURS, SHAPES)
    assert wp.degenerate("colour", "yes", COLOURS, SHAPES)
    assert wp.degenerate("colour", "circle", COLOURS, SHAPES)  # a shape word to a colour question
    assert not wp.degenerate("colour", "Red.", COLOURS, SHAPES)
    assert not wp.degenerate("shape", "red square", COLOURS, SHAPES)  # the object's name
    assert wp.degenerate("shape", "blue", COLOURS, SHAPES)
    assert not wp.degenerate("yesno", "no .", COLOURS, SHAPES)
    assert wp.bare_yes_no("No.") and not wp.bare_yes_no("no red circle")


def test_correct_reads_the_asked_word_of_a_name():
    assert wp.correct("red square", "square", SHAPES) and wp.correct("Square.", "square", SHAPES)
    assert not wp.correct("red square", "circle", SHAPES)
    assert wp.correct("red square", "red", COLOURS) and not wp.correct("red square", "blue", COLOURS)
    assert not wp.correct("square or circle", "square", SHAPES)  # two shapes: not an answer
    assert not wp.correct("yes", "square", SHAPES)


def test_phenomena_counts():
    def row(kind, hold, full, enh, oracle):
        return {"kind": kind, "hold": hold, "full": full, "enh": enh, "oracle": oracle,
                "degenerate_enh": False, "bare_enh": False}
    rows = [row("shape", True, False, True, True),    # processing failure, fixed by zooming
            row("shape", True, False, False, True),   # processing failure
            row("shape", False, False, False, True),  # perception failure
            row("shape", True, True, True, True),
            row("colour", False, True, False, True),
            {"kind": "describe", "degenerate_enh": True, "bare_enh": True},
            {"kind": "describe", "degenerate_enh": False, "bare_enh": False}]
    m = wp.phenomena(rows)
    shape = m["shape"]
    assert (shape["n"], shape["hold"], shape["wrong_full"]) == (4, 3, 3)
    assert (shape["perception"], shape["processing"]) == (1, 2)
    assert shape["hold_pct"] == 75.0 and shape["acc_full"] == 25.0 and shape["acc_enh"] == 50.0
    assert shape["zoom_gain"] == 25.0 and shape["oracle_gain"] == 75.0
    assert shape["processing_pct"] == round(100 * 2 / 3, 1)
    both = m["open"]
    assert (both["n"], both["hold"], both["correct_full"], both["correct_enh"]) == (5, 3, 2, 2)
    assert both["zoom_gain"] == 0.0 and m["colour"]["zoom_gain"] == -100.0
    assert m["degenerate"]["describe"] == {"n": 2, "degenerate": 1, "bare_yes_no": 1,
                                           "degenerate_pct": 50.0}
    assert m["degenerate"]["all"]["n"] == 7 and m["degenerate"]["all"]["degenerate"] == 1

"""The README's stage table states each script's size: its line counts must be the files' own."""
import re

from conftest import ROOT

ROW = re.compile(r"^\| `([\w.]+\.py)` \|(?:[^|]*\|){2} (\d+) \|\s*(\d*)\s*\|\s*(\d*)\s*\|$", re.M)


def counts(path):
    """(lines, lines above the appendix ruler, lines of copied shared blocks, rulers included)."""
    lines = path.read_text().splitlines()
    appendix = next((i for i, line in enumerate(lines) if line.startswith("# Appendix")), None)
    above = appendix - 1 if appendix is not None else None  # the "# ====" line above it starts it
    shared = 0
    inside = False
    for line in lines:
        if line.startswith("# ---- shared: "):
            inside = True
        if inside:
            shared += 1
        if line.startswith("# ---- end shared ----"):
            inside = False
    return len(lines), above, shared


def test_stage_table_counts_are_the_files():
    rows = ROW.findall((ROOT / "README.md").read_text())
    scripts = {name for name, *_ in rows}
    expected = {p.name for p in ROOT.glob("[0-9][0-9]_*.py")} | {"pipeline.py"}
    assert scripts == expected, f"README's stage table lists {sorted(scripts)}, the repository has {sorted(expected)}"
    for name, total, above, shared in rows:
        n_total, n_above, n_shared = counts(ROOT / name)
        stated = (int(total), int(above) if above else None, int(shared) if shared else 0)
        assert stated == (n_total, n_above, n_shared), \
            f"README says {name} has {stated} (lines, above the appendix, copied); the file: " \
            f"{(n_total, n_above, n_shared)}"


def test_counts_read_a_script_shape(tmp_path):
    script = tmp_path / "x.py"
    script.write_text("a\nb\n# ====\n# Appendix: plumbing\n# ---- shared: s ----\ndef f():\n"
                      "    pass\n# ---- end shared ----\nmain()\n")
    assert counts(script) == (9, 2, 4)

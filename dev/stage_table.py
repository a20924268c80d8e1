"""Rewrite the line counts in the README's stage table from the files (tests/test_readme.py checks them).

  python dev/stage_table.py            # rewrite README.md in place
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_readme import ROW, counts  # noqa: E402 (the tests' own counting, so the two cannot disagree)


def main():
    readme = ROOT / "README.md"

    def fill(m):
        total, above, shared = counts(ROOT / m.group(1))
        row = m.group(0)
        cells = row.rsplit("|", 4)  # [..., lines, above, copied, ""]
        stage = m.group(1)[0].isdigit()  # a stage: 0 copied lines is a count; pipeline.py has none to state
        new = [f" {total} ", f" {above} " if above is not None else "  ", f" {shared} " if stage else "  "]
        return "|".join([cells[0], *new, cells[-1]])
    readme.write_text(ROW.sub(fill, readme.read_text()))


if __name__ == "__main__":
    main()

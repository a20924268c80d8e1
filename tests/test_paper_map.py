"""docs/paper_map.md maps each term of the paper to `script.py:function` and to the test that checks it: every
named function and test must exist, so the map cannot drift from the code."""
import ast
import re

from conftest import ROOT

MAP = ROOT / "docs" / "paper_map.md"
CODE = re.compile(r"`([\w/.-]+\.py):(\w+)`")
TEST = re.compile(r"`(tests/[\w.-]+\.py)::(\w+)`")


def defined(path):
    """Names of the functions and classes defined anywhere in a Python file."""
    tree = ast.parse((ROOT / path).read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def missing(text):
    """The `file:function` and `tests/file::test` references of a map that name nothing."""
    gone = []
    for pattern in (CODE, TEST):
        for path, name in pattern.findall(text):
            if not (ROOT / path).is_file() or name not in defined(path):
                gone.append(f"{path}:{name}")
    return gone


def test_every_function_and_test_the_paper_map_names_exists():
    text = MAP.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and CODE.search(line)]
    assert len(rows) >= 20, f"only {len(rows)} rows of the map name a function"
    assert all(TEST.search(row) for row in rows), [row for row in rows if not TEST.search(row)]
    assert missing(text) == []


def test_the_check_catches_a_name_that_does_not_exist():
    assert missing("| A | `01_attention_crop.py:no_such_function` | `tests/test_paper_map.py::no_test` |") == [
        "01_attention_crop.py:no_such_function", "tests/test_paper_map.py:no_test"]
    assert missing("| x | `tests/test_paper_map.py:missing` | `tests/test_paper_map.py::missing` |") == []

"""The test and script tooling: stage_loader.load_stage, the one way the tests, the benchmarks, the analysis and
dev scripts load a script as a module (a stage's name starts with a digit, so `import` cannot), and what it
promises; the two test tiers (tests marked slow run only with --slow)."""
import re
import sys

import pytest

import conftest
from conftest import ROOT
from stage_loader import load_stage

# the ways to load a file as a module by hand; stage_loader.py is the one file allowed to
PRIVATE_LOADER = re.compile(r"spec_from_file_location|module_from_spec|exec_module|SourceFileLoader|import_module"
                            r"|runpy|__import__|\bexec\(")
FOLDERS = ("tests", "bench", "analysis", "dev")


def private_loaders(paths):
    """[(file, line number, line)] of every line that loads a module by hand."""
    return [(path.name, n, line.strip()) for path in paths
            for n, line in enumerate(path.read_text().splitlines(), 1) if PRIVATE_LOADER.search(line)]


def test_every_script_is_loaded_through_stage_loader():
    paths = [p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))] + [ROOT / "pipeline.py"]
    paths.remove(ROOT / "tests" / "test_tooling.py")  # this file names the patterns
    assert len(paths) > 20
    assert private_loaders(paths) == []


def test_a_private_loader_is_found(tmp_path):
    own = tmp_path / "own_loader.py"
    own.write_text("import importlib.util\n\n\ndef load(path):\n"
                   "    spec = importlib.util.spec_from_file_location('x', path)\n"
                   "    module = importlib.util.module_from_spec(spec)\n"
                   "    spec.loader.exec_module(module)\n    return module\n")
    assert [n for _, n, _ in private_loaders([own])] == [5, 6, 7]
    own.write_text("import importlib\nstage = importlib.import_module('03_filter')\n")
    assert [n for _, n, _ in private_loaders([own])] == [2]
    assert private_loaders([ROOT / "stage_loader.py"])  # the one loader, found by the same patterns


def test_load_stage_defines_the_functions_and_does_not_run_main(tmp_path, monkeypatch):
    s03 = load_stage("03_filter.py")
    assert s03.__name__ == "03_filter" and callable(s03.main) and s03.__file__ == str(ROOT / "03_filter.py")
    script = tmp_path / "07_demo.py"
    script.write_text("RAN = []\n\n\ndef main():\n    RAN.append(1)\n\n\n"
                      "if __name__ == '__main__':\n    main()\n    raise SystemExit('main ran')\n")
    demo = load_stage(script)  # an absolute path is taken as it is
    assert demo.__name__ == "07_demo" and demo.RAN == []


def test_each_call_is_a_fresh_module_outside_sys_modules(monkeypatch):
    a = load_stage("01_attention_crop.py")
    b = load_stage("01_attention_crop.py")
    assert a is not b and "01_attention_crop" not in sys.modules
    monkeypatch.setattr(a, "main", None)  # a test patching its copy leaves every other copy alone
    assert callable(b.main)


class Item:
    """What pytest_collection_modifyitems reads of a collected test: its markers."""
    def __init__(self, *markers):
        self.markers = list(markers)

    def get_closest_marker(self, name):
        return next((m for m in self.markers if m.name == name), None)

    def add_marker(self, marker):
        self.markers.append(marker.mark)


class Config:
    def __init__(self, slow):
        self.slow = slow

    def getoption(self, name):
        assert name == "--slow", name
        return self.slow


@pytest.mark.parametrize("slow", [False, True])
def test_slow_tests_are_skipped_unless_slow_is_given(slow):
    fast_item, slow_item = Item(), Item(pytest.mark.slow.mark)
    conftest.pytest_collection_modifyitems(Config(slow), [fast_item, slow_item])
    skipped = [any(m.name == "skip" for m in item.markers) for item in (fast_item, slow_item)]
    assert skipped == [False, not slow]

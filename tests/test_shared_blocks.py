"""SPEC: helpers several stages need are copied verbatim between `# ---- shared: NAME ----` rulers
(no shared module, so each script stands alone). Every copy of a NAME must be identical."""
import re
from collections import defaultdict

from conftest import ROOT

BLOCK = re.compile(r"^# ---- shared: (\S+) ----\n(.*?)^# ---- end shared ----$", re.S | re.M)


def shared_blocks():
    blocks = defaultdict(dict)
    for path in sorted(ROOT.glob("[0-9][0-9]_*.py")):
        for name, body in BLOCK.findall(path.read_text()):
            assert path.name not in blocks[name], f"{path.name} has two '{name}' blocks"
            blocks[name][path.name] = body
    return blocks


def test_shared_blocks_are_identical_copies():
    blocks = shared_blocks()
    assert blocks, "no shared blocks found"
    for name, copies in blocks.items():
        first_file, first = next(iter(copies.items()))
        for file, body in copies.items():
            assert body == first, f"shared block '{name}' differs between {first_file} and {file}"


def test_block_regex_catches_a_difference():
    text_a = "# ---- shared: x ----\ndef f(): return 1\n# ---- end shared ----\n"
    text_b = text_a.replace("1", "2")
    assert BLOCK.findall(text_a)[0][1] != BLOCK.findall(text_b)[0][1]

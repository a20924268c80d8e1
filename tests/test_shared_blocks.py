"""Helpers several stages need are copied verbatim between `# ---- shared: NAME ----` rulers
(no shared module, so each script stands alone). Every copy of a NAME must be identical, a script carries
only the helpers it calls, and the copies sit in the appendix below main(), so a reader meets the paper first."""
import re
from collections import defaultdict

from conftest import ROOT

BLOCK = re.compile(r"^# ---- shared: (\S+) ----\n(.*?)^# ---- end shared ----$", re.S | re.M)
DEF = re.compile(r"^def (\w+)\(", re.M)
STAGES = sorted(ROOT.glob("[0-9][0-9]_*.py"))


def shared_blocks():
    blocks = defaultdict(dict)
    for path in STAGES:
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


def unused_helpers(text):
    """Names of functions defined in shared blocks that nothing else in `text` refers to."""
    bodies = {}
    for _, body in BLOCK.findall(text):
        for chunk in re.split(r"\n(?=@|def )", body):
            names = DEF.findall(chunk)
            if names:
                bodies[names[0]] = chunk
    return [n for n, chunk in bodies.items()
            if len(re.findall(rf"\b{n}\b", text)) == len(re.findall(rf"\b{n}\b", chunk))]


def test_every_copied_helper_is_called():
    for path in STAGES:
        assert unused_helpers(path.read_text()) == [], f"{path.name} carries helpers it never calls"


def test_unused_helper_check_catches_a_dead_copy():
    used = "# ---- shared: x ----\ndef f():\n    return 1\n# ---- end shared ----\nf()\n"
    assert unused_helpers(used) == []
    assert unused_helpers(used.replace("\nf()\n", "\n")) == ["f"]


def test_copies_sit_in_the_appendix_below_main():
    for path in STAGES:
        text = path.read_text()
        if not BLOCK.search(text):
            continue
        lines = text.splitlines()
        main = lines.index(next(l for l in lines if l.startswith("def main(")))
        appendix = next(i for i, l in enumerate(lines) if l.startswith("# Appendix"))
        first_block = next((i for i, l in enumerate(lines) if l.startswith("# ---- shared: ")), len(lines))
        assert main < appendix <= first_block, f"{path.name}: main() at line {main + 1}, appendix at " \
            f"{appendix + 1}, first shared block at {first_block + 1}"
        assert lines[-2:] == ['if __name__ == "__main__":', "    main()"], f"{path.name}: main() must be last"

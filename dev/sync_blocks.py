"""Copy shared helper blocks from one stage script into every other stage that carries them.

Each stage stands alone, so the helpers several stages need are copied verbatim between
`# ---- shared: NAME ----` and `# ---- end shared ----` rulers, and tests/test_shared_blocks.py fails when two
copies differ. After editing a block in one script, this writes that version into the others:

  python dev/sync_blocks.py 01_attention_crop.py            # every block 01 has, into every stage
  python dev/sync_blocks.py 02_make_pairs.py --only noise   # one block
  python dev/sync_blocks.py 01_attention_crop.py --check    # exit 1 and name the copies that differ
"""
import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^# ---- shared: (\S+) ----\n.*?^# ---- end shared ----$", re.S | re.M)


def blocks(text):
    """{NAME: the whole block, rulers included}."""
    return {m.group(1): m.group(0) for m in BLOCK.finditer(text)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", help="the stage script whose blocks are the ones to copy")
    p.add_argument("--only", nargs="+", default=None, help="block names (default: all of the source's)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a copy differs")
    args = p.parse_args()
    source = blocks((ROOT / args.source).read_text())
    names = args.only or list(source)
    differ = []
    for path in sorted(ROOT.glob("[0-9][0-9]_*.py")):
        text = path.read_text()
        new = BLOCK.sub(lambda m: source[m.group(1)] if m.group(1) in names and m.group(1) in source
                        else m.group(0), text)
        if new != text:
            differ.append(path.name)
            if not args.check:
                path.write_text(new)
    verb = "differ" if args.check else "updated"
    print(f"{verb}: {', '.join(differ) or 'none'}")
    sys.exit(1 if args.check and differ else 0)


if __name__ == "__main__":
    main()

"""Load a stage script as a module, for the tests, the benchmarks and the analysis scripts.

A stage's file name starts with a digit (01_attention_crop.py), so `import` cannot name it. load_stage executes
the file under its own name (never "__main__"), so its functions are defined and its main() does not run. Each
call executes the file afresh and leaves sys.modules alone: a test that patches one copy does not patch another.

    import sys; sys.path.insert(0, "<repository root>")   # scripts outside the root; the tests' conftest does it
    from stage_loader import load_stage
    s03 = load_stage("03_filter.py")                       # or "analysis/offpolicy_pairs.py", "bench/gpu_scale.py"
"""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def load_stage(filename):
    """The script at `filename` (relative to the repository root, or absolute) as a new module named after its
    file (01_attention_crop), with its main() not run."""
    path = ROOT / filename
    spec = importlib.util.spec_from_file_location(path.stem.replace("-", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

"""Import a stage script by its file name (its name starts with a digit, so `import` cannot)."""
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def load_stage(filename):
    """The module of <repository root>/<filename>, loaded once and cached in sys.modules under a name made
    from the file name ("01_attention_crop.py" -> "stage_01_attention_crop")."""
    name = "stage_" + re.sub(r"\W", "_", Path(filename).stem)
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / filename)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]

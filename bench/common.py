"""What the benchmarks share: the stage scripts imported as modules, and the models they are measured on."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # stage_loader.py and tiny_models.py sit in the repository root
from stage_loader import load_stage  # noqa: E402,F401  (the benchmarks import it from here)

MODELS = ("toy", "llava35m")


def status_mb(field):
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def build_model(name, folder):
    """toy: the toy world's model (world/model, from 00_toy_world.py); llava35m: a random LLaVA-1.5-shaped model of
    36M parameters (text: 8 layers of width 640; vision: 4 layers of width 256, 64 px images, 8 px patches), where
    the costs compared mean something. Returns the model folder."""
    if name == "toy":
        path = ROOT / "world" / "model"
        if not path.is_dir():
            raise SystemExit(f"{path} not found: run `python 00_toy_world.py` first")
        return path
    if name != "llava35m":
        raise SystemExit(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
    from tiny_models import make_tiny_llava  # the tests' random LLaVA builder, at a larger size
    return make_tiny_llava(Path(folder) / name, image_size=64, patch_size=8, hidden=640, layers=8, heads=8,
                           vision_hidden=256, vision_layers=4)

"""dev/plant_bugs.py: every planted bug's snippet still occurs exactly once (a refactor must update the plants)."""
import shutil

from conftest import ROOT, load_script

plant = load_script("dev/plant_bugs.py")


def test_every_snippet_occurs_once():
    assert plant.stale() == []


def test_a_stale_snippet_is_named(tmp_path):
    b = next(b for b in plant.BUGS if b["id"] == "lora_scale")
    shutil.copy(ROOT / b["file"], tmp_path / b["file"])
    path = tmp_path / b["file"]
    path.write_text(path.read_text().replace(b["old"], b["old"].replace(" = ", " =  ")))
    assert plant.stale([b], tmp_path) == [("lora_scale", b["file"], 0)]
    assert not plant.check([b], tmp_path)

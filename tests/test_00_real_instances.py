"""Stage 00 (real data): a parquet file in RLHF-V's published column layout (written here with pyarrow) and LLaVA-format
JSON (LLaVA, V-DPO and LLaMA-Factory rows) -> every field of instances.jsonl and human_pairs.jsonl, the copied image
bytes, the errors and duplicates files; the parquet file read in row batches, never whole; resume after a crash =
one run; a rerun with other data refuses; pyarrow missing; the script run as a user would, its outputs read by stage
01 and by 03 --score-only on the toy model."""
import base64
import hashlib
import io
import json
import shutil
import sys

import pytest
from PIL import Image

from conftest import ROOT, load_script, run_script

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # the parquet path's one extra package; the JSON path and its tests need none
    pa = pq = None
needs_pyarrow = pytest.mark.skipif(pq is None, reason="pyarrow is needed only by the parquet path")

SCRIPT = "00_real_instances.py"
stage = load_script(SCRIPT)


def encoded(colour, fmt="PNG", size=(24, 16)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


RED, BLUE, GREEN = encoded("red"), encoded("blue", "JPEG"), encoded("green")
TRUNCATED = encoded("yellow", "JPEG", (64, 64))[:200]  # a JPEG whose header opens but whose pixels are cut


def name(data, suffix):
    """Where the stage puts an image: images/<sha256, 16 hex><suffix>, relative to the JSONL files."""
    return f"images/{hashlib.sha256(data).hexdigest()[:16]}{suffix}"


def text(question, chosen, rejected):
    return json.dumps({k: v for k, v in (("question", question), ("chosen", chosen), ("rejected", rejected)) if v})


RLHFV = [  # (idx, image bytes, text), row numbers 0..8
    (100, RED, text("<image>\n What colour is the square? ", "It is red.", "It is blue.")),  # tag and spaces go
    (101, BLUE, text("Describe the image.", " A blue square.\n", "A red circle.")),  # answers stripped too
    (102, b"not an image", text("What is this?", "A.", "B.")),  # undecodable
    (103, RED, text(None, "A.", "B.")),  # missing question
    (104, RED, text("What colour is the square?", "Red.", "Green.")),  # exact duplicate of row 0: dropped
    (105, RED, text("Is there a circle?", "No.", "Yes.")),  # row 0's image, another prompt: kept, one image file
    (106, TRUNCATED, text("What is yellow?", "A.", "B.")),  # truncated: fails only when decoded
    (107, BLUE, "not json"),
    (101, GREEN, text("What shape is it?", "A square.", "A circle.")),  # idx 101 again: id "101-row8"
]
RLHFV_INSTANCES = [
    {"id": "100", "image": name(RED, ".png"), "prompt": "What colour is the square?"},
    {"id": "101", "image": name(BLUE, ".jpg"), "prompt": "Describe the image."},
    {"id": "105", "image": name(RED, ".png"), "prompt": "Is there a circle?"},
    {"id": "101-row8", "image": name(GREEN, ".png"), "prompt": "What shape is it?"}]
RLHFV_PAIRS = [dict(row, chosen=c, rejected=r) for row, (c, r) in zip(RLHFV_INSTANCES, [
    ("It is red.", "It is blue."), ("A blue square.", "A red circle."), ("No.", "Yes."), ("A square.", "A circle.")])]
RLHFV_ERRORS = {2: ("102", "undecodable image"), 3: ("103", "missing question"), 6: ("106", "undecodable image"),
                7: ("107", "'text' is not JSON")}


def write_rlhfv(path, rows=RLHFV, row_group_size=None):
    """A parquet file with RLHF-V-Dataset.parquet's columns, in its dataset card's order."""
    n = len(rows)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "ds_name": ["RLHF-V"] * n,
        "image": pa.array([{"bytes": b, "path": f"{i}.jpg"} for i, b, _ in rows], image),
        "text": [t for *_, t in rows],
        "origin_dataset": ["RLHF-V-Hall_v0"] * n,
        "origin_split": [json.dumps({"model": "muffin"})] * n,
        "idx": pa.array([i for i, *_ in rows], pa.int64()),
        "image_path": [f"coco/{i}.jpg" for i, *_ in rows]})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def lines(path):
    return [json.loads(line) for line in open(path)]


def outputs(out):
    """Everything a run leaves in DIR, as comparable values (image files by bytes)."""
    return {"instances": lines(out / "instances.jsonl"), "pairs": lines(out / "human_pairs.jsonl"),
            "errors": lines(out / "instances.errors.jsonl"), "duplicates": lines(out / "instances.duplicates.jsonl"),
            "images": {p.name: p.read_bytes() for p in (out / "images").iterdir()}}


@needs_pyarrow
def test_rlhfv_parquet_every_output_field(tmp_path, capsys):
    data = write_rlhfv(tmp_path / "RLHF-V-Dataset.parquet")
    stage.main(["--data", str(data), "--out", str(tmp_path / "rlhfv")])
    got = outputs(tmp_path / "rlhfv")
    assert got["instances"] == RLHFV_INSTANCES
    assert got["pairs"] == RLHFV_PAIRS
    assert got["images"] == {name(d, s)[len("images/"):]: d for d, s in ((RED, ".png"), (BLUE, ".jpg"),
                                                                         (GREEN, ".png"))}  # bytes kept exactly
    assert got["duplicates"] == [{"id": "104", "row": 4, "duplicate_of": "100"}]
    assert {e["row"]: e["id"] for e in got["errors"]} == {n: i for n, (i, _) in RLHFV_ERRORS.items()}
    for e in got["errors"]:
        assert e["file"] == str(data.resolve())
        assert e["error"].startswith(f"{data.resolve()}:row {e['row']}: {RLHFV_ERRORS[e['row']][1]}"), e
    printed = capsys.readouterr().out
    assert "4 instances (0 from an earlier run), 1 exact duplicates of (image, prompt) dropped, 4 bad rows" in printed
    assert "4 human pairs" in printed
    args = json.loads((tmp_path / "rlhfv" / "instances.args.json").read_text())
    assert args["data"] == str(data.resolve()) and args["images"] == str(tmp_path.resolve())


def write_llava(folder):
    """A LLaVA-format JSON list in folder with its images: every supported row shape and every kind of bad row."""
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(RED)
    (folder / "sub" / "b.jpg").write_bytes(BLUE)
    (folder / "broken.png").write_bytes(b"\x89PNG garbage")
    elsewhere = folder.parent / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "c.png").write_bytes(GREEN)
    human = lambda v: {"from": "human", "value": v}  # noqa: E731
    gpt = lambda v: {"from": "gpt", "value": v}  # noqa: E731
    rows = [
        {"id": "vdpo", "image": "a.png", "conversations": [human("<image>\nWhat is red?"), gpt("The square.")],
         "contrastive_conversations": [human("<image>\nWhat is red?"), gpt("The circle.")]},  # V-DPO
        {"images": ["sub/b.jpg"], "conversations": [human("<image>Describe it.")], "chosen": gpt("Blue. "),
         "rejected": gpt("Red.")},  # LLaMA-Factory, no id: the row number
        {"id": "llava", "image": str(elsewhere / "c.png"), "conversations": [human("<image>\nWhat colour?"),
                                                                              gpt("Green."), human("Shape?"),
                                                                              gpt("Square.")]},  # LLaVA SFT: no pair
        {"id": "openai", "images": ["a.png"], "messages": [{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": "<image>How many squares?"}],
         "chosen": "One.", "rejected": "Two."},  # openai tags, plain-string answers
        {"id": "gone", "image": "missing.png", "conversations": [human("<image>Q?")]},
        {"id": "bad", "image": "broken.png", "conversations": [human("<image>Q?")]},
        {"id": "nohuman", "image": "a.png", "conversations": [gpt("Hello.")]},
        {"id": "two", "images": ["a.png", "sub/b.jpg"], "conversations": [human("<image><image>Q?")]},
        "not a row",
        {"id": "multi", "images": ["sub/b.jpg"], "conversations": [human("<image>First?"), gpt("A1."),
                                                                   human("Second?")],
         "chosen": gpt("Yes."), "rejected": gpt("No.")},  # the pair answers turn 2: instance from turn 1, no pair
        {"id": "empty", "image": "a.png", "conversations": [human("<image>\n  ")]},
        {"id": "vdpo", "image": "a.png", "conversations": [human("What is red?"), gpt("The square.")]},  # duplicate
    ]
    path = folder / "rlhf_v.json"
    path.write_text(json.dumps(rows))
    return path


LLAVA_INSTANCES = [
    {"id": "vdpo", "image": name(RED, ".png"), "prompt": "What is red?"},
    {"id": "1", "image": name(BLUE, ".jpg"), "prompt": "Describe it."},
    {"id": "llava", "image": name(GREEN, ".png"), "prompt": "What colour?"},
    {"id": "openai", "image": name(RED, ".png"), "prompt": "How many squares?"},
    {"id": "multi", "image": name(BLUE, ".jpg"), "prompt": "First?"}]
LLAVA_PAIRS = [dict(LLAVA_INSTANCES[0], chosen="The square.", rejected="The circle."),
               dict(LLAVA_INSTANCES[1], chosen="Blue.", rejected="Red."),
               dict(LLAVA_INSTANCES[3], chosen="One.", rejected="Two.")]
LLAVA_ERRORS = {4: ("gone", "image not found"), 5: ("bad", "undecodable image"), 6: ("nohuman", "no user turn"),
                7: ("two", "2 images"), 8: ("8", "a row is a JSON object"), 10: ("empty", "empty question")}


def test_llava_json_every_row_shape_and_bad_row(tmp_path, capsys):
    data = write_llava(tmp_path / "rlhfv_json")
    stage.main(["--data", str(data), "--out", str(tmp_path / "out")])
    got = outputs(tmp_path / "out")
    assert got["instances"] == LLAVA_INSTANCES
    assert got["pairs"] == LLAVA_PAIRS
    assert got["images"] == {name(d, s)[len("images/"):]: d for d, s in ((RED, ".png"), (BLUE, ".jpg"),
                                                                         (GREEN, ".png"))}
    assert got["duplicates"] == [{"id": "vdpo-row11", "row": 11, "duplicate_of": "vdpo"}]
    assert {e["row"]: e["id"] for e in got["errors"]} == {n: i for n, (i, _) in LLAVA_ERRORS.items()}
    for e in got["errors"]:
        assert e["error"].startswith(f"{data.resolve()}:row {e['row']}: {LLAVA_ERRORS[e['row']][1]}"), e
    assert "2 new instances have no single-turn pair" in capsys.readouterr().out


def test_llava_json_images_folder_and_limit(tmp_path):
    """--images: the JSON's paths are relative to it, not to the JSON; --limit N reads the first N rows only."""
    write_llava(tmp_path / "imgs")
    data = tmp_path / "meta" / "rlhf_v.json"
    data.parent.mkdir()
    shutil.move(tmp_path / "imgs" / "rlhf_v.json", data)
    with pytest.raises(SystemExit, match="no row gave an instance"):  # the images are not beside the JSON
        stage.main(["--data", str(data), "--out", str(tmp_path / "a"), "--limit", "2"])
    assert [e["error"].split(": ", 1)[1][:15] for e in lines(tmp_path / "a" / "instances.errors.jsonl")] == \
        ["image not found"] * 2
    stage.main(["--data", str(data), "--out", str(tmp_path / "b"), "--limit", "2", "--images", str(tmp_path / "imgs")])
    assert lines(tmp_path / "b" / "instances.jsonl") == LLAVA_INSTANCES[:2]
    assert lines(tmp_path / "b" / "instances.errors.jsonl") == []


def test_a_json_saved_with_a_bom_reads_and_a_limit_below_one_is_refused(tmp_path):
    """A JSON list saved with a byte-order mark (Windows editors do) reads as without one; --limit -1 used to drop
    the last row in silence and --limit 0 every row: both are refused, as is --batch-size 0."""
    data = write_llava(tmp_path / "j")  # (a subfolder: write_llava puts images beside tmp_path too)
    data.write_bytes(b"\xef\xbb\xbf" + data.read_bytes())
    stage.main(["--data", str(data), "--out", str(tmp_path / "a"), "--limit", "2"])
    assert lines(tmp_path / "a" / "instances.jsonl") == LLAVA_INSTANCES[:2]
    for flag, value in (("--limit", "-1"), ("--limit", "0"), ("--batch-size", "0")):
        with pytest.raises(SystemExit):
            stage.parse_args(["--data", str(data), flag, value])


@needs_pyarrow
def test_llama_factory_parquet_rows(tmp_path):
    """llamafactory/RLHF-V's rlhf-v.parquet: LLaVA-format rows with "images" = [{"bytes", "path"}], no id."""
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "conversations": pa.array([[{"from": "human", "value": "<image>What is red?"}],
                                   [{"from": "human", "value": "<image>\nWhat is blue?"}]], pa.list_(turn)),
        "chosen": pa.array([{"from": "gpt", "value": "The square."}, {"from": "gpt", "value": "The sky."}], turn),
        "rejected": pa.array([{"from": "gpt", "value": "The circle."}, {"from": "gpt", "value": "Grass."}], turn),
        "images": pa.array([[{"bytes": RED, "path": None}], [{"bytes": None, "path": "b.jpg"}]], pa.list_(image))})
    pq.write_table(table, tmp_path / "rlhf-v.parquet")
    (tmp_path / "b.jpg").write_bytes(BLUE)  # a struct with a path and no bytes: read from --images (the file's folder)
    stage.main(["--data", str(tmp_path / "rlhf-v.parquet"), "--out", str(tmp_path / "out")])
    assert lines(tmp_path / "out" / "human_pairs.jsonl") == [
        {"id": "0", "image": name(RED, ".png"), "prompt": "What is red?", "chosen": "The square.",
         "rejected": "The circle."},
        {"id": "1", "image": name(BLUE, ".jpg"), "prompt": "What is blue?", "chosen": "The sky.", "rejected": "Grass."}]
    assert len(lines(tmp_path / "out" / "instances.jsonl")) == 2


@needs_pyarrow
def test_parquet_is_read_in_row_batches_never_whole(tmp_path, monkeypatch):
    """Five row groups of 2 rows, --batch-size 2: every batch pyarrow hands over holds at most 2 rows, only the three
    columns the stage uses are read, no whole-file read is called, and --limit 3 stops after the batches it needs."""
    data = write_rlhfv(tmp_path / "d.parquet", row_group_size=2)
    assert pq.ParquetFile(data).metadata.num_row_groups == 5
    calls, sizes = [], []
    iter_batches = pq.ParquetFile.iter_batches

    def spy(self, *args, **kw):
        calls.append(kw)
        for batch in iter_batches(self, *args, **kw):
            sizes.append(batch.num_rows)
            yield batch

    def forbidden(*args, **kw):
        raise AssertionError("the whole file was read")
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    for whole in ("read", "read_row_group", "read_row_groups"):
        monkeypatch.setattr(pq.ParquetFile, whole, forbidden)
    monkeypatch.setattr(pq, "read_table", forbidden)
    stage.main(["--data", str(data), "--out", str(tmp_path / "a"), "--batch-size", "2"])
    assert lines(tmp_path / "a" / "instances.jsonl") == RLHFV_INSTANCES
    assert calls[0]["batch_size"] == 2 and sorted(calls[0]["columns"]) == ["idx", "image", "text"]
    assert len(sizes) == 5 and max(sizes) == 2
    sizes.clear()
    stage.main(["--data", str(data), "--out", str(tmp_path / "b"), "--batch-size", "2", "--limit", "3"])
    assert sizes == [2, 2]  # rows 0-3 read, rows 4-8 never
    assert lines(tmp_path / "b" / "instances.jsonl") == RLHFV_INSTANCES[:2]


@needs_pyarrow
def test_resume_after_a_crash_equals_one_run_and_other_data_refuses(tmp_path, capsys):
    data = write_rlhfv(tmp_path / "d.parquet")
    one = tmp_path / "one"
    stage.main(["--data", str(data), "--out", str(one)])
    crashed = tmp_path / "crashed"
    shutil.copytree(one, crashed)
    inst = (one / "instances.jsonl").read_text().splitlines(keepends=True)
    pairs = (one / "human_pairs.jsonl").read_text().splitlines(keepends=True)
    # killed while writing the 3rd instance line: its pair went first; the 4th row's image was half written
    (crashed / "instances.jsonl").write_text(inst[0] + inst[1] + inst[2][:20])
    (crashed / "human_pairs.jsonl").write_text("".join(pairs[:3]))
    green = crashed / RLHFV_INSTANCES[3]["image"]
    green.unlink()
    green.with_name(green.name + ".tmp").write_bytes(GREEN[:10])
    for side in ("errors", "duplicates"):
        (crashed / f"instances.{side}.jsonl").unlink()
    capsys.readouterr()
    stage.main(["--data", str(data), "--out", str(crashed)])
    assert "4 instances (2 from an earlier run)" in capsys.readouterr().out
    assert outputs(crashed) == outputs(one)  # no pair twice, the image whole, errors and duplicates complete
    with pytest.raises(SystemExit, match="images="):
        stage.main(["--data", str(data), "--out", str(crashed), "--images", str(tmp_path / "other")])
    other = write_rlhfv(tmp_path / "other.parquet", RLHFV[:2])
    with pytest.raises(SystemExit, match="data="):
        stage.main(["--data", str(other), "--out", str(crashed)])


def test_missing_pyarrow_says_what_to_install_and_json_needs_none(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(SystemExit, match=r"pip install pyarrow==26\.0\.1"):
        stage.main(["--data", str(tmp_path / "d.parquet"), "--out", str(tmp_path / "a")])
    stage.main(["--data", str(write_llava(tmp_path / "j")), "--out", str(tmp_path / "b")])
    assert lines(tmp_path / "b" / "instances.jsonl") == LLAVA_INSTANCES


def test_unknown_format_and_all_rows_bad_exit_nonzero(tmp_path):
    (tmp_path / "d.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit, match=r"\.parquet .* or \.json"):
        stage.main(["--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "a")])
    (tmp_path / "d.json").write_text(json.dumps([{"id": "x", "image": "none.png", "conversations": []}]))
    with pytest.raises(SystemExit, match="no row gave an instance"):
        stage.main(["--data", str(tmp_path / "d.json"), "--out", str(tmp_path / "b")])
    assert [e["id"] for e in lines(tmp_path / "b" / "instances.errors.jsonl")] == ["x"]


@needs_pyarrow
@pytest.mark.slow  # three scripts as subprocesses
def test_as_a_user_then_stage_01_and_03_score_only_read_the_outputs(tmp_path):
    data = write_rlhfv(tmp_path / "RLHF-V-Dataset.parquet")
    out = tmp_path / "rlhfv"
    proc = run_script(SCRIPT, "--data", data, "--out", out)
    assert "4 instances (0 from an earlier run)" in proc.stdout and "4 human pairs" in proc.stdout
    model = ROOT / "assets" / "toy_model"
    run_script("01_attention_crop.py", "--model", model, "--data", out / "instances.jsonl", "--out",
               tmp_path / "runs" / "crops.jsonl", "--limit", "2", "--device", "cpu")
    crops = lines(tmp_path / "runs" / "crops.jsonl")
    assert [c["id"] for c in crops] == ["100", "101"]
    for c, inst in zip(crops, RLHFV_INSTANCES):  # the same image file, now relative to crops.jsonl
        assert (tmp_path / "runs" / c["image"]).resolve() == (out / inst["image"]).resolve()
        assert c["prompt"] == inst["prompt"] and len(c["bbox"]) == 4
    run_script("03_filter.py", "--score-only", "--model", model, "--clip", "none", "--data",
               out / "human_pairs.jsonl", "--out", tmp_path / "runs" / "human.jsonl", "--limit", "2", "--device", "cpu")
    report = json.loads((tmp_path / "runs" / "human.report.json").read_text())
    assert report["branches"]["pair"]["pairs"] == 2 and report["branches"]["pair"]["ips_all"]["n"] == 2


@pytest.mark.parametrize("fmt", ["json", pytest.param("parquet", marks=needs_pyarrow)])
def test_a_run_that_wrote_nothing_never_blocks_its_fix(tmp_path, fmt):
    """A run on a 0-row file, or on rows that are all bad, writes no instance and no pair: the corrected run
    into the same DIR, with other data, is taken as a first run (the same outputs as a fresh DIR); a DIR that
    holds a pair still refuses other data."""
    good = write_llava(tmp_path / "good")
    fresh = tmp_path / "fresh"
    stage.main(["--data", str(good), "--out", str(fresh)])
    if fmt == "json":
        (tmp_path / "empty.json").write_text("[]")
        empty = tmp_path / "empty.json"
    else:
        empty = write_rlhfv(tmp_path / "empty.parquet", rows=[])
        assert pq.ParquetFile(empty).metadata.num_rows == 0
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "x", "image": "none.png", "conversations": []}]))
    for failed in (empty, tmp_path / "bad.json"):
        out = tmp_path / f"out_{failed.stem}"
        with pytest.raises(SystemExit, match="no row gave an instance"):
            stage.main(["--data", str(failed), "--out", str(out)])
        stage.main(["--data", str(good), "--out", str(out)])  # the fix: not refused
        assert outputs(out) == outputs(fresh)
        assert json.loads((out / "instances.args.json").read_text())["data"] == str(good.resolve())
    # a run killed after a pair line and before its instance line left something of that data: refused
    out = tmp_path / "out_pair"
    with pytest.raises(SystemExit, match="no row gave an instance"):
        stage.main(["--data", str(tmp_path / "bad.json"), "--out", str(out)])
    (out / "human_pairs.jsonl").write_text(json.dumps(LLAVA_PAIRS[0]) + "\n")
    with pytest.raises(SystemExit, match="data="):
        stage.main(["--data", str(good), "--out", str(out)])


def test_a_data_uri_image_is_decoded_and_a_bad_image_field_is_its_rows_one_sentence(tmp_path):
    """A base64 "data:" image is decoded (and checked like a file's bytes); a data URI that is not base64 or
    does not decode, and a path too long for the file system, are each their row's error in one short
    sentence, not a traceback."""
    human = [{"from": "human", "value": "<image>What is it?"}]
    b64 = base64.b64encode(BLUE).decode()
    wrapped = "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))  # MIME-style line breaks
    rows = [{"id": "uri", "image": f"data:image/jpeg;base64,{b64}", "conversations": human},
            {"id": "wrapped", "image": f"data:image/jpeg;base64,{wrapped}",
             "conversations": [{"from": "human", "value": "Other?"}]},
            {"id": "plain", "image": "data:image/png,%89PNG", "conversations": human},
            {"id": "garbled", "image": "data:image/png;base64,@@not base64@@", "conversations": human},
            {"id": "long", "image": "data:" + "A" * 20000, "conversations": human},  # no comma at all
            {"id": "toolong", "image": "x" * 20000 + ".png", "conversations": human},
            {"id": "notimage", "image": "data:image/png;base64," + base64.b64encode(b"hello").decode(),
             "conversations": human}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    stage.main(["--data", str(tmp_path / "d.json"), "--out", str(tmp_path / "out")])
    got = outputs(tmp_path / "out")
    assert got["instances"] == [{"id": "uri", "image": name(BLUE, ".jpg"), "prompt": "What is it?"},
                                {"id": "wrapped", "image": name(BLUE, ".jpg"), "prompt": "Other?"}]
    assert got["images"] == {name(BLUE, ".jpg")[len("images/"):]: BLUE}  # the decoded bytes, exactly
    errors = {e["id"]: e["error"].split(": ", 1)[1] for e in got["errors"]}
    assert set(errors) == {"plain", "garbled", "long", "toolong", "notimage"}
    assert errors["plain"].startswith("a 'data:' image that is not base64")
    assert errors["long"].startswith("a 'data:' image that is not base64")
    assert errors["garbled"].startswith("a 'data:' image whose base64 does not decode")
    assert errors["toolong"].startswith("image unreadable: ") and "File name too long" in errors["toolong"]
    assert errors["notimage"].startswith("undecodable image")
    for e in got["errors"]:
        assert len(e["error"]) < 400 and "\n" not in e["error"], e


def test_every_field_of_a_llava_row_is_checked_for_type_on_its_own_row(tmp_path):
    """A field of the wrong type is its row's error, naming the field: never a traceback, never read as
    something else (an object id turned into text, a pair dropped in silence)."""
    (tmp_path / "a.png").write_bytes(RED)
    human = [{"from": "human", "value": "<image>Q?"}]
    both = [{"from": "human", "value": "<image>Q?"}, {"from": "gpt", "value": "A."}]
    ok = {"image": "a.png", "conversations": human}
    rows = [
        {"id": "ok", **ok, "chosen": "A.", "rejected": "B."},
        {"id": {"x": 1}, **ok},
        {"id": True, **ok},
        {"id": "t3", "image": "a.png", "conversations": ["hello", human[0]]},
        {"id": "t4", "image": "a.png", "conversations": [{"from": "human", "value": ["<image>Q?"]}]},
        {"id": "t5", "image": "a.png", "messages": [{"role": 1, "content": "Q?"}]},
        {"id": "t6", "image": 5, "conversations": human},
        {"id": "t7", "images": [["a.png"]], "conversations": human},
        {"id": "t8", **ok, "chosen": ["A."], "rejected": "B."},
        {"id": "t9", **ok, "chosen": "A.", "rejected": 3},
        {"id": "t10", **ok, "chosen": {"from": "human", "value": "A."}, "rejected": "B."},
        {"id": "t11", "image": "a.png", "conversations": both, "contrastive_conversations": "x"},
        {"id": "t12", "image": "a.png", "conversations": both, "contrastive_conversations": both[:1]},
        {"id": 7, "image": "a.png", "conversations": [{"from": "human", "value": "Other?"}]},  # an integer id: fine
        {"id": 1.5, **ok},
        {"id": "t15", "image": "a.png", "conversations": both, "contrastive_conversations": [both[0], 5]},
        {"id": "t16", "image": {"bytes": [1, 2, 3]}, "conversations": human},
    ]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    stage.main(["--data", str(tmp_path / "d.json"), "--out", str(tmp_path / "out")])
    got = outputs(tmp_path / "out")
    assert got["instances"] == [{"id": "ok", "image": name(RED, ".png"), "prompt": "Q?"},
                                {"id": "7", "image": name(RED, ".png"), "prompt": "Other?"}]
    assert got["pairs"] == [{"id": "ok", "image": name(RED, ".png"), "prompt": "Q?", "chosen": "A.",
                             "rejected": "B."}]
    expected = {1: "'id' is an object, not text or an integer", 2: "'id' is true/false, not text or an integer",
                3: "'conversations' turn 0 is text, not a turn", 4: "'conversations' turn 0: its role",
                5: "'messages' turn 0: its role ('from' / 'role') is a number",
                6: "the image is a number, not a path", 7: "the image is a list, not a path",
                8: "'chosen' is a list, not text", 9: "'rejected' is a number, not text",
                10: "'chosen' is a 'human' turn, not the assistant's",
                11: "'contrastive_conversations' is text, not a list of 2 turns",
                12: "'contrastive_conversations' is a list of 1 turns, not a list of 2 turns",
                14: "'id' is a number, not text or an integer",
                15: "'contrastive_conversations' turn 1 is a number, not a turn",
                16: "the image's 'bytes' is a list, not bytes"}
    errors = {e["row"]: e for e in got["errors"]}
    assert sorted(errors) == sorted(expected)
    for n, message in expected.items():
        assert errors[n]["error"].startswith(f"{(tmp_path / 'd.json').resolve()}:row {n}: {message}"), errors[n]
    assert errors[1]["id"] == "1" and errors[3]["id"] == "t3"  # a bad id: the row number stands in


@needs_pyarrow
def test_every_field_of_an_rlhfv_row_is_checked_for_type_on_its_own_row(tmp_path):
    """RLHF-V's parquet: image bytes of another type, a question or an answer that is not text inside 'text',
    and 'text' itself not a string: each its row's error, naming the field."""
    image = pa.struct([("bytes", pa.string()), ("path", pa.string())])  # a struct written with text bytes
    (tmp_path / "r.png").write_bytes(RED)
    table = pa.table({
        "idx": pa.array([0, 1, 2, 3], pa.int64()),
        "image": pa.array([{"bytes": "abc", "path": None}] + [{"bytes": None, "path": "r.png"}] * 3, image),
        "text": [text("Q?", "A.", "B."), json.dumps({"question": 5}),
                 json.dumps({"question": "Q2?", "chosen": ["A."], "rejected": "B."}), text("Q3?", "A.", "B.")]})
    pq.write_table(table, tmp_path / "d.parquet")
    stage.main(["--data", str(tmp_path / "d.parquet"), "--out", str(tmp_path / "out")])
    got = outputs(tmp_path / "out")
    assert got["instances"] == [{"id": "3", "image": name(RED, ".png"), "prompt": "Q3?"}]
    assert {e["row"]: e["error"].split(": ", 1)[1] for e in got["errors"]} == {
        0: "the image's 'bytes' is text, not bytes", 1: "the question is a number, not text",
        2: "'text' chosen is a list, not text"}
    with pytest.raises(ValueError, match="'text' is bytes, not a JSON string"):
        stage.rlhfv_row({"text": b'{"question": "Q?"}', "image": None})
    with pytest.raises(ValueError, match="'idx' is a number, not text or an integer"):
        stage.row_id({"idx": 3.0}, 0, set())


def test_an_out_holding_the_users_own_instances_is_refused_untouched(tmp_path):
    """Before, a folder holding the user's own instances.jsonl (no args file beside it) was written over, rc 0."""
    write_llava(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "instances.jsonl").write_text('{"id": "hand-made"}\n')
    with pytest.raises(SystemExit, match="no instances.args.json says this script made them"):
        stage.main(["--data", str(tmp_path / "rlhf_v.json"), "--out", str(out)])
    assert (out / "instances.jsonl").read_text() == '{"id": "hand-made"}\n'
    assert sorted(p.name for p in out.iterdir()) == ["instances.jsonl"]

"""Reliability (issue 16): a rerun compares what decides its output and a refused run changes nothing, one run per
--out at a time (a lock, tested with two real processes), 04's default checkpoints and its refusals, inputs that used
to crash or pass silently (decompression bombs, prompts past the context, empty files, odd JSON), and errors that end
in one sentence naming the file, line or flag. Each test failed before its fix. The stages run in this process
(main(argv)) where one process is enough: an import of torch costs more than a tiny model's run."""
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, load_script

s01 = load_script("01_attention_crop.py")
s02 = load_script("02_make_pairs.py")
s03 = load_script("03_filter.py")
s04 = load_script("04_train_calibrated_dpo.py")
s05 = load_script("05_eval_pope.py")
STAGES = {"00_real_instances.py": load_script("00_real_instances.py"), "01_attention_crop.py": s01,
          "02_make_pairs.py": s02, "03_filter.py": s03,
          "04_train_calibrated_dpo.py": s04, "05_eval_pope.py": s05}


def main(stage, *args):
    return stage.main([str(a) for a in args])


def instances(folder, n=2, prompt="what colour is the circle ?"):
    """instances.jsonl: n lines on one random image, ids q0..q<n-1>."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / "im.png")
    path = folder / "instances.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "image": "im.png", "prompt": prompt}) + "\n"
                            for i in range(n)))
    return path


def lines(path):
    return [json.loads(line) for line in open(path)]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def train_data(folder, n=6):
    """train.jsonl for stage 04: n lines with both branches; the ref log-probs need not be the model's."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for role in ("image", "crop", "deg", "noise"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{role}.png")
    ref = {k: -5.0 for k in ("focus_w", "focus_l", "calib_aug_w", "calib_deg_w", "calib_aug_l", "calib_deg_l",
                             "robust_w", "robust_l")}
    row = {"image": "image.png", "prompt": "describe the image .", "prompt_enh": "answer : describe the image .",
           "images": {"crop": "crop.png", "deg": "deg.png", "noise": "noise.png"},
           "focus": {"chosen": "a red circle", "rejected": "a blue square"},
           "robust": {"chosen": "yes", "rejected": "no", "init": "yes"}, "ref": ref,
           "clip": {"crop": 0.6, "image": 0.5}, "keep": {"focus": True, "robust": True}}
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps({**row, "id": f"x{i}"}) + "\n" for i in range(n)))
    return path


def curve(out):
    return np.array([[m["loss"], m["grad_norm"]] for m in lines(out / "metrics.jsonl")])


def bomb_png(path, width=20000, height=20000):
    """A tiny PNG whose header claims width x height pixels (a decompression bomb, as far as its header goes)."""
    Image.new("RGB", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # its CRC, over the chunk type and data
    path.write_bytes(bytes(data))


# ---- reruns: what decides the output is compared, and a refused run changes nothing ----
def test_rerun_with_other_data_or_a_model_changed_in_place_is_refused_and_changes_nothing(tiny_llava, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llava, model)
    data = instances(tmp_path / "a")
    other = instances(tmp_path / "b", prompt="describe the image .")  # the same ids, other prompts
    out = tmp_path / "runs" / "crops.jsonl"
    common = ["--model", model, "--out", out, "--max-new-tokens", 2]
    main(s01, *common, "--data", data)
    before = snapshot(out.parent)
    with pytest.raises(SystemExit, match="holds lines made with data_identity="):
        main(s01, *common, "--data", other)
    weights = model / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    os.utime(weights, ns=(mtime, mtime + 10**9))  # a model retrained or replaced in place, same folder
    with pytest.raises(SystemExit, match="holds lines made with model_identity="):
        main(s01, *common, "--data", data)
    assert snapshot(out.parent) == before  # no args.json rewritten, no lock left behind
    os.utime(weights, ns=(mtime, mtime))
    main(s01, *common, "--data", data, "--limit", 1)  # the same inputs resume (a --limit changes no line)
    assert lines(out) == [json.loads(x) for x in before["crops.jsonl"].decode().splitlines()]


def test_an_out_that_is_an_input_is_refused_naming_both(tiny_llava, tmp_path):
    data = instances(tmp_path)
    kept = data.read_bytes()
    with pytest.raises(SystemExit, match=f"--out {data} is also the input --data {data}"):
        main(s01, "--model", tiny_llava, "--data", data, "--out", data)
    with pytest.raises(SystemExit, match="is also the input --model"):  # 04 would save over the base model
        main(s04, "--model", tiny_llava, "--data", data, "--out", tiny_llava)
    assert data.read_bytes() == kept


# ---- one run per --out ----
def test_a_second_run_into_one_out_refuses_and_a_killed_runs_lock_is_free(tiny_llava, tmp_path):
    """Two real processes: the first holds the lock (stopped with SIGSTOP so that it cannot finish first), the
    second refuses and changes nothing; once the first is killed (SIGKILL: no clean-up), the lock is free again."""
    data = instances(tmp_path, n=24)
    out = tmp_path / "crops.jsonl"
    lock = tmp_path / "crops.jsonl.lock"
    args = ["--model", tiny_llava, "--data", data, "--out", out, "--max-new-tokens", 2, "--batch-size", 1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, str(ROOT / "01_attention_crop.py"), *map(str, args)], cwd=ROOT,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t = time.time()
        while not (lock.exists() and f"pid {first.pid} " in lock.read_text()) and time.time() - t < 300:
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None, "the first run ended before it could be stopped"
        held = out.read_bytes() if out.exists() else None
        with pytest.raises(SystemExit, match=f"in use by pid {first.pid} on host"):
            main(s01, *args)
        assert (out.read_bytes() if out.exists() else None) == held
    finally:
        first.kill()
        first.wait()
    main(s01, *args)  # the kernel let go of the killed run's flock: its lock file is free to take
    assert [r["id"] for r in lines(out)] == [f"q{i}" for i in range(24)]
    assert lock.read_text() == f"pid {os.getpid()} on host {socket.gethostname()}\n"


# ---- stage 04: checkpoints by default; --resume and a trained --out ----
def test_04_checkpoints_by_default_and_resume_equals_one_run(tiny_llava, tmp_path, monkeypatch):
    data = train_data(tmp_path / "data")
    common = ["--model", tiny_llava, "--data", data, "--effective-batch", 2, "--batch-size", 2, "--epochs", 2,
              "--lr", 1e-3, "--lora-dropout", 0]  # 6 lines: 6 steps
    main(s04, *common, "--out", tmp_path / "full")
    micro_step = s04.micro_step
    calls = []

    def crash_at_step_4(*a, **k):  # a kill mid-run (one micro-step per step here)
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return micro_step(*a, **k)
    monkeypatch.setattr(s04, "micro_step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        main(s04, *common, "--out", tmp_path / "crashed")  # default flags
    monkeypatch.undo()
    assert torch.load(tmp_path / "crashed" / "checkpoint.pt")["step"] == 3  # every ceil(3% of 6) = 1 step
    main(s04, *common, "--out", tmp_path / "crashed", "--resume")
    np.testing.assert_allclose(curve(tmp_path / "crashed"), curve(tmp_path / "full"), atol=1e-6)


def test_04_resume_refuses_other_data_or_settings_and_a_trained_out_needs_overwrite(tiny_llava, tmp_path):
    data = train_data(tmp_path / "data")
    other = train_data(tmp_path / "other", n=5)
    out = tmp_path / "p2dpo"
    common = ["--model", tiny_llava, "--epochs", 1, "--effective-batch", 2, "--batch-size", 2, "--out", out]
    main(s04, *common, "--data", data)
    before = snapshot(out)
    with pytest.raises(SystemExit, match="holds a trained model or a checkpoint: --resume continues it, "
                                         "--overwrite starts over"):
        main(s04, *common, "--data", data)
    with pytest.raises(SystemExit, match="trained with lr=1e-05, not 0.0001"):
        main(s04, *common, "--data", data, "--resume", "--lr", 1e-4)
    with pytest.raises(SystemExit, match="trained with no_calib=False, not True"):
        main(s04, *common, "--data", data, "--resume", "--no-calib")
    with pytest.raises(SystemExit, match="trained with data_identity="):
        main(s04, *common, "--data", other, "--resume")
    with pytest.raises(SystemExit, match="holds no checkpoint.pt to continue from"):
        main(s04, *common[:-1], tmp_path / "fresh", "--data", data, "--resume")
    assert snapshot(out) == before  # args.json, metrics.jsonl, the model: untouched
    (out / "checkpoint.pt").write_bytes(before["checkpoint.pt"][:100])  # a disk that filled up
    with pytest.raises(SystemExit, match="checkpoint.pt is damaged .*; start over with --overwrite"):
        main(s04, *common, "--data", data, "--resume")
    main(s04, *common, "--data", other, "--overwrite", "--stop-after", 1)
    assert len(lines(out / "metrics.jsonl")) == 1 and not (out / "config.json").exists()  # no stale model
    assert json.loads((out / "args.json").read_text())["lines"] == 5


# ---- inputs that crashed or passed silently ----
def test_decompression_bomb_and_prompt_past_the_context_are_per_line_errors(tiny_llava, tmp_path):
    data = instances(tmp_path, n=2)
    bomb_png(tmp_path / "bomb.png")
    with open(data, "a") as f:
        f.write(json.dumps({"id": "bomb", "image": "bomb.png", "prompt": "what colour is the circle ?"}) + "\n")
        f.write(json.dumps({"id": "long", "image": "im.png", "prompt": "red " * 600}) + "\n")  # 512 positions
    out = tmp_path / "crops.jsonl"
    main(s01, "--model", tiny_llava, "--data", data, "--out", out, "--max-new-tokens", 2)
    assert [r["id"] for r in lines(out)] == ["q0", "q1"]  # the good lines of the batch are written
    errors = {e["id"]: e["error"] for e in lines(out.with_suffix(".errors.jsonl"))}
    assert "Image size (400000000 pixels) exceeds limit" in errors["bomb"] and "--max-image-pixels" in errors["bomb"]
    assert "over the model's context of 512 positions" in errors["long"] and f"{data}:4:" in errors["long"]


def test_the_context_check_counts_the_tokens_the_processor_makes(tiny_qwen):
    """Qwen2.5-VL's image tokens grow with the image: the count measured once per size on blank images, plus the
    text's tokens, must be the processor's own count for every row."""
    model, processor = s01.load_model(tiny_qwen, "cpu")
    rng = np.random.default_rng(0)
    images = [[Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))]
              for w, h in ((48, 40), (200, 90), (64, 300), (48, 40))]
    texts = [s01.chat_prompt(processor, p) for p in ("describe the image .", "what colour is the circle ?",
                                                     "is there a red square in the image ?", "yes")]
    limit = model.config.get_text_config().max_position_embeddings
    problems = s01.prompt_problems(model, processor, texts, images, [limit] * 4, "more")  # every row too long
    for text, imgs, problem in zip(texts, images, problems):
        n = len(processor(text=[text], images=imgs)["input_ids"][0])
        assert f"the prompt is {n} tokens (images included), + {limit} more" in problem, (n, problem)


def test_a_prompt_holding_the_image_placeholder_is_a_per_line_error(tiny_llava, tmp_path):
    """The processor counts "<image>" typed in a prompt as one image too many: before, the whole batch failed
    with its ValueError, on every rerun."""
    data = instances(tmp_path, n=2)
    with open(data, "a") as f:
        f.write(json.dumps({"id": "mark", "image": "im.png", "prompt": "what is <image> here ?"}) + "\n")
    out = tmp_path / "crops.jsonl"
    main(s01, "--model", tiny_llava, "--data", data, "--out", out, "--max-new-tokens", 2)
    assert [r["id"] for r in lines(out)] == ["q0", "q1"]
    assert "holds the model's image placeholder '<image>'" in lines(out.with_suffix(".errors.jsonl"))[0]["error"]


def test_empty_and_all_bad_inputs_say_exactly_that(tiny_llava, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SystemExit, match="no input lines \\(the file is empty\\)"):
        main(s01, "--model", tiny_llava, "--data", empty, "--out", tmp_path / "crops.jsonl")
    with pytest.raises(SystemExit, match="no input lines \\(the file is empty\\)"):  # not "the thresholds"
        main(s03, "--model", tiny_llava, "--clip", "none", "--data", empty, "--out", tmp_path / "train.jsonl")
    with pytest.raises(SystemExit, match="no input lines \\(the file is empty\\)"):  # not "reasons above"
        main(s04, "--model", tiny_llava, "--data", empty, "--out", tmp_path / "p2dpo")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "image": "missing.png", "prompt": "x"}\n{broken\n')
    with pytest.raises(SystemExit, match="every line failed: all 2 input lines are bad"):
        main(s01, "--model", tiny_llava, "--data", bad, "--out", tmp_path / "crops.jsonl")


def test_04_refuses_an_empty_prompt_or_a_response_that_is_not_text(tmp_path):
    row = json.loads(train_data(tmp_path).read_text().splitlines()[0])
    args = s04.parse_args([])
    assert s04.parse_line(row, str(tmp_path), args)["prompt"] == "describe the image ."
    for field, value, why in (("prompt", " ", "'prompt' must be non-empty text"),
                              ("focus", {"chosen": None, "rejected": "no"}, "'focus.chosen' must be")):
        with pytest.raises(ValueError, match=why):
            s04.parse_line({**row, field: value}, str(tmp_path), args)


def test_a_damaged_line_inside_an_output_is_one_sentence(tmp_path):
    """Two writers (before the lock) could interleave lines; every rerun then crashed in read_jsonl's ValueError."""
    out = tmp_path / "crops.jsonl"
    out.write_text('{"id": "a"}\n{"id": "b"{"id": "c"}\n{"id": "d"}\n')
    with pytest.raises(SystemExit, match=f"{out}:2: bad JSON line .*a line inside the output is damaged"):
        s01.continue_jsonl(out)


def test_odd_jsonl_lines_are_per_line_errors(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "bom"}\n'  # a UTF-8 BOM (Windows editors): fine
                     b'{"id": "\xff"}\n'  # not UTF-8
                     + b"[" * 100000 + b"\n"  # nested past the recursion limit
                     b'{"id": "last"}\n')
    errors = []
    rows = s01.read_jsonl(path, on_error=lambda n, message: errors.append((n, message)))
    assert [r["id"] for _, r in rows] == ["bom", "last"] and [n for n, _ in errors] == [2, 3]
    assert all(f"{path}:{n}: bad JSON line" in message for n, message in errors)


# ---- errors a user can cause: one sentence naming the file, line or flag ----
def test_model_that_is_missing_empty_or_not_cached_is_one_sentence(tiny_llava, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text("{}")
    cases = {str(tmp_path / "nope"): "no such folder$",
             str(tmp_path / "empty"): "holds no config.json, so it is not a saved model",
             "nobody/no-such-model": "no model of that name in your Hugging Face cache",
             str(tmp_path / "config_only"): "no image-text model and processor load from it",
             str(tmp_path / "no_template"): "no image-text model and processor load from it"}
    shutil.copytree(tiny_llava, tmp_path / "no_template")
    (tmp_path / "no_template" / "chat_template.jinja").unlink()  # it would fail at the first prompt
    for path, why in cases.items():
        with pytest.raises(SystemExit, match=why):
            s01.load_model(path, "cpu")


def test_unwritable_out_is_refused_before_the_model_loads(tmp_path):
    data = instances(tmp_path)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="--out .*a_file/crops.jsonl: cannot write there"):
        main(s01, "--model", tmp_path / "no_model", "--data", data, "--out", tmp_path / "a_file" / "crops.jsonl")
    with pytest.raises(SystemExit, match="exists and is not a folder"):  # 05 writes a folder
        main(s05, "--model", tmp_path / "no_model", "--questions", data, "--out", tmp_path / "a_file")


def test_debug_shows_the_traceback_behind_the_sentence(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        s01.load_model(str(tmp_path / "nobody"), "cpu")
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["01_attention_crop.py", "--debug"])
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        s01.load_model(str(tmp_path / "config_only"), "cpu")
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(STAGES))
def test_help_shows_every_default(name, capsys):
    with pytest.raises(SystemExit):
        STAGES[name].parse_args(["--help"])
    text = capsys.readouterr().out
    options = text.split("options:")[1].split("\n  -")[2:]  # each flag's entry, after -h
    assert options and all("(default:" in " ".join(o.split()) for o in options), text


@pytest.mark.parametrize("name, flag, value", [("01_attention_crop.py", "--batch-size", "0"),
                                               ("02_make_pairs.py", "--limit", "-1"),
                                               ("03_filter.py", "--batch-size", "0"),
                                               ("04_train_calibrated_dpo.py", "--lr", "nan"),
                                               ("04_train_calibrated_dpo.py", "--epochs", "0"),
                                               ("05_eval_pope.py", "--noise-sigma", "inf"),
                                               ("02_make_pairs.py", "--top-p", "0"),  # an empty nucleus
                                               ("04_train_calibrated_dpo.py", "--lora-dropout", "1.5"),
                                               ("03_filter.py", "--margin-low", "nan"),
                                               ("02_make_pairs.py", "--seed", "-1"),  # numpy's noise seed
                                               pytest.param("01_attention_crop.py", "--device", "cuda",
                                                            marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                                     reason="a GPU is here"))])
def test_odd_flag_values_are_refused_naming_the_flag(name, flag, value, capsys):
    with pytest.raises(SystemExit):
        STAGES[name].parse_args([flag, value])
    assert f"argument {flag}" in capsys.readouterr().err


# ---- stage 05: answers say what they answer ----
def pope_split(folder, split="random", image="a.png", colours=("red", "blue")):
    """<folder>/<split>.jsonl: one question per colour about one random image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(image))
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / image)
    rows = [{"question_id": i + 1, "image": image, "text": f"is there a {c} circle in the image ?",
             "label": ["yes", "no"][i % 2]} for i, c in enumerate(colours)]
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / f"{split}.jsonl"


def test_05_rerun_with_other_questions_under_the_same_split_name_is_refused(tiny_llava, tmp_path):
    """The same ids and texts about another image (POPE's questions repeat across images): before, the old
    answers were reused and scored against the new labels."""
    first = pope_split(tmp_path / "a", image="a.png")
    other = pope_split(tmp_path / "b", image="b.png")
    out = tmp_path / "eval"
    main(s05, "--model", tiny_llava, "--questions", first, "--out", out, "--max-new-tokens", 2)
    before = snapshot(out)
    with pytest.raises(SystemExit, match="question_id 1 was asked .* about 'a.png' there, not .* about 'b.png'"):
        main(s05, "--model", tiny_llava, "--questions", other, "--out", out, "--max-new-tokens", 2)
    assert snapshot(out) == before
    assert all(r["image"] == "a.png" and r["split"] == "random" for r in lines(out / "answers.jsonl"))


def test_05_rescoring_refuses_answers_to_another_splits_questions(tmp_path):
    questions = pope_split(tmp_path, split="popular", colours=("green", "blue"))
    answers = tmp_path / "answers.jsonl"  # LLaVA's format: no split; the prompts are random's questions
    answers.write_text("".join(json.dumps({"question_id": i + 1, "text": "yes",
                                           "prompt": f"is there a {c} circle in the image ?" + s05.SUFFIX}) + "\n"
                               for i, c in enumerate(("red", "blue"))))
    with pytest.raises(SystemExit, match="answers.jsonl.*:1: question_id 1 answers 'is there a red circle"):
        main(s05, "--questions", questions, "--answers", answers, "--out", tmp_path / "rescored")
    assert not (tmp_path / "rescored" / "args.json").exists()


def test_05_writes_args_json_only_once_the_model_loads(tiny_llava, tmp_path):
    """Before, a run with a wrong --model wrote args.json first, and the corrected run was refused."""
    questions = pope_split(tmp_path / "q")
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "config.json").write_text("{}")
    out = tmp_path / "eval"
    with pytest.raises(SystemExit, match="no image-text model and processor load"):
        main(s05, "--model", tmp_path / "wrong", "--questions", questions, "--out", out)
    assert not (out / "args.json").exists()
    main(s05, "--model", tiny_llava, "--questions", questions, "--out", out, "--max-new-tokens", 2)
    assert json.loads((out / "args.json").read_text())["model"] == str(tiny_llava.resolve())


def test_05_an_unreadable_image_or_a_bad_line_is_a_sentence_naming_it(tiny_llava, tmp_path):
    questions = pope_split(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with open(questions, "a") as f:
        f.write(json.dumps({"question_id": 9, "image": "broken.png", "text": "is there a cat ?", "label": "no"}) + "\n")
    with pytest.raises(SystemExit, match=f"{questions}:3: unreadable image"):
        main(s05, "--model", tiny_llava, "--questions", questions, "--out", tmp_path / "eval", "--max-new-tokens", 2,
             "--batch-size", 1)
    assert len(lines(tmp_path / "eval" / "answers.jsonl")) == 2  # the questions before it are kept
    questions.write_text(questions.read_text() + "{broken\n")
    with pytest.raises(SystemExit, match=f"{questions}:4: bad JSON line"):  # before: a ValueError traceback
        main(s05, "--model", tiny_llava, "--questions", questions, "--out", tmp_path / "eval2")


def test_odd_ids_and_float_or_rotated_images(tmp_path):
    """An id that is a list, a bool, a float or NaN (Python's json reads NaN) was written back as is, NaN as
    invalid JSON; a 32-bit float image turned black; an EXIF-rotated photo reached the model on its side."""
    rgb = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "im.png")
    rows = [{"id": i, "image": "im.png", "prompt": "p"} for i in ("a", 7, ["a"], True, 1.5)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) +
                                       '{"id": NaN, "image": "im.png", "prompt": "p"}\n')
    good, bad = s01.read_instances(tmp_path / "in.jsonl", ("image", "prompt"))
    assert [r["id"] for r in good] == ["a", 7] and [e["line"] for e in bad] == [3, 4, 5, 6]
    assert all("field 'id' must be text or an integer" in e["error"] for e in bad)
    Image.fromarray((rgb[..., 0] / 255.0).astype(np.float32), mode="F").save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match="a 32-bit float image; convert it to 8 or 16 bits"):
        s01.load_image(tmp_path / "float.tif")
    photo = Image.fromarray(rgb)
    exif = photo.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    photo.save(tmp_path / "rotated.jpg", exif=exif)
    assert s01.load_image(tmp_path / "rotated.jpg").size == (40, 48)  # upright: what a viewer shows


# ---- second pass: nothing of the user's or of another stage written over; a failed run never blocks its fix ----
def test_an_out_written_by_another_stage_is_refused_naming_it(tiny_llava, tmp_path):
    """Before, 05 --out at a 04 model folder replaced its args.json, and a later 04 --resume at another lr was
    accepted; 01 --out at 02's pairs.jsonl resumed into it."""
    model = tmp_path / "p2dpo"
    main(s04, "--model", tiny_llava, "--data", train_data(tmp_path / "data"), "--out", model, "--epochs", 1,
         "--effective-batch", 2, "--batch-size", 2, "--stop-after", 1)
    before = snapshot(model)
    with pytest.raises(SystemExit, match=f"--out {model} was written by 04_train_calibrated_dpo.py, not "
                                         f"05_eval_pope.py"):
        main(s05, "--model", tiny_llava, "--questions", pope_split(tmp_path / "q"), "--out", model)
    assert snapshot(model) == before
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"id": "q0"}\n')
    s02.write_args(s02.args_path(pairs), {"data": "crops.jsonl"})  # what 02 records beside its output
    with pytest.raises(SystemExit, match="was written by 02_make_pairs.py, not 01_attention_crop.py"):
        main(s01, "--model", tiny_llava, "--data", instances(tmp_path / "in"), "--out", pairs)
    assert pairs.read_text() == '{"id": "q0"}\n'


def test_a_folder_of_the_users_is_never_written_into(tiny_llava, tmp_path):
    """A mistyped folder --out (05, 04) that holds the user's files is refused before anything is written; a folder
    left with only empty files by a failed run is not the user's."""
    mine = tmp_path / "my_notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for stage, extra in ((s05, ["--questions", pope_split(tmp_path / "q")]),
                         (s04, ["--data", train_data(tmp_path / "data")])):
        with pytest.raises(SystemExit, match=f"--out {mine} is a folder this stage did not write"):
            main(stage, "--model", tiny_llava, *extra, "--out", mine)
    assert snapshot(mine) == {"notes.txt": b"keep me"}
    (mine / "notes.txt").write_text("")
    s05.claim_out(mine, {}, folder=True)  # only an empty file: nothing to lose


def test_a_run_where_every_line_failed_leaves_nothing_that_blocks_the_fix(tiny_llava, tmp_path):
    """Before, 01 left a 0-byte crops.jsonl, and the corrected rerun was refused ("holds lines but no
    args.json")."""
    data = instances(tmp_path / "in", n=2)
    moved = tmp_path / "in" / "im.png"
    moved.rename(tmp_path / "elsewhere.png")
    out = tmp_path / "crops.jsonl"
    with pytest.raises(SystemExit, match="every line failed"):
        main(s01, "--model", tiny_llava, "--data", data, "--out", out, "--max-new-tokens", 2)
    assert not out.exists()
    (tmp_path / "elsewhere.png").rename(moved)
    main(s01, "--model", tiny_llava, "--data", data, "--out", out, "--max-new-tokens", 2)
    assert [r["id"] for r in lines(out)] == ["q0", "q1"]
    out.write_text("")  # a 0-byte output from any older run blocks nothing either
    s01.args_path(out).unlink()
    main(s01, "--model", tiny_llava, "--data", data, "--out", out, "--max-new-tokens", 2)
    assert [r["id"] for r in lines(out)] == ["q0", "q1"]


@pytest.mark.parametrize("kind, error, words", [
    (KeyboardInterrupt, KeyboardInterrupt(), "interrupted: what was written so far is kept; rerun it"),
    (OSError, OSError(28, "No space left on device", "/x/crops.jsonl"),
     "the disk is full (/x/crops.jsonl): what was written so far is kept; free some space, then rerun it"),
    (PermissionError, PermissionError(13, "Permission denied", "/x/in.jsonl"),
     "cannot read or write /x/in.jsonl (Permission denied): what was written so far is kept; mend that")])
def test_ctrl_c_a_full_disk_or_an_unreadable_file_end_in_one_sentence(kind, error, words, monkeypatch, capsys):
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
    monkeypatch.setattr(sys, "argv", ["01_attention_crop.py"])
    s01.exits_in_one_sentence("rerun it")
    sys.excepthook(kind, error, None)
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    monkeypatch.setattr(sys, "argv", ["01_attention_crop.py", "--debug"])
    sys.excepthook(ValueError, ValueError("a bug"), None)  # anything else: Python's own traceback
    assert "ValueError: a bug" in capsys.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C; `kill`, `timeout`, a job scheduler
def test_ctrl_c_in_a_real_run_is_one_sentence(sig, tiny_llava, tmp_path):
    data = instances(tmp_path, n=400)
    out = tmp_path / "crops.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = subprocess.Popen([sys.executable, str(ROOT / "01_attention_crop.py"), "--model", str(tiny_llava),
                            "--data", str(data), "--out", str(out), "--batch-size", "1", "--max-new-tokens", "2"],
                           cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           # as from a terminal: a pytest started in the background (SIGINT ignored) would pass
                           # that on, and Python then installs no KeyboardInterrupt for Ctrl-C
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t = time.time()
    while not (out.exists() and out.stat().st_size) and time.time() - t < 300:
        time.sleep(0.01)
    run.send_signal(sig)
    err = run.communicate(timeout=120)[1]
    assert run.returncode != 0 and "Traceback" not in err, err[-2000:]
    assert "interrupted: what was written so far is kept; rerun the same command" in err


def test_a_device_this_machine_lacks_is_refused_saying_what_it_has(monkeypatch):
    """--device names what the machine has: on one without a GPU no "cuda:N for N < 0"; with two GPUs, N < 2."""
    import argparse
    for gpus, says in ((0, "it has no GPU: cpu"), (2, "cpu, or cuda:N for N < 2")):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        with pytest.raises(argparse.ArgumentTypeError, match=f"'cuda:2' is no device of this machine \\({says}\\)"):
            s01.device_name("cuda:2")
        assert s01.device_name("cpu") == "cpu"

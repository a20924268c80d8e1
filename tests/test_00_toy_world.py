"""00_toy_world.py at --tiny size, run as a user would; the world's rules and the model's input path."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import ROOT, load_script, run_script

tw = load_script("00_toy_world.py")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "world"
    run_script("00_toy_world.py", "--tiny", "--out", out, "--seed", "3")
    return out


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def rows(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.slow  # tiny_world: a world build, 40-90 s
def test_writes_every_file(tiny_world):
    for name in ["truth.jsonl", "instances.jsonl", "describe.jsonl", "world.json", "val/describe.jsonl",
                 "model/config.json", "model/model.safetensors", "model/chat_template.jinja", "model/tokenizer.json",
                 "clip/open_clip_config.json", "clip/open_clip_model.safetensors"]:
        assert (tiny_world / name).is_file(), name
    for folder in ("pope", "val/pope"):
        assert sorted(p.name for p in (tiny_world / folder).iterdir()) == ["adversarial.jsonl", "popular.jsonl", "random.jsonl"]
    truth = {r["image"]: r for r in rows(tiny_world / "truth.jsonl")}
    assert all((tiny_world / image).is_file() for image in truth)
    for inst in rows(tiny_world / "instances.jsonl"):
        assert set(inst) == {"id", "image", "prompt"} and inst["image"] in truth and inst["prompt"]
    world = json.loads((tiny_world / "world.json").read_text())
    assert len(world["classes"]) == 20 and "{question}" in world["prompts"]["enhanced"]


@pytest.mark.slow
def test_pope_files_follow_pope_rules(tiny_world):
    truth = {r["image"]: {o["class"] for o in r["objects"]} for r in rows(tiny_world / "truth.jsonl")}
    splits = {s: rows(tiny_world / "pope" / f"{s}.jsonl") for s in ("random", "popular", "adversarial")}
    for split, qs in splits.items():
        assert [q["question_id"] for q in qs] == list(range(1, len(qs) + 1))
        by_image = {}
        for q in qs:
            assert set(q) == {"question_id", "image", "text", "label"}
            cls = q["text"].removeprefix("Is there a ").removesuffix(" in the image?")
            present = cls in truth[q["image"].removeprefix("../")]
            assert present == (q["label"] == "yes"), (split, q)
            by_image.setdefault(q["image"], []).append(q["label"])
        assert all(sorted(v) == ["no", "yes"] for v in by_image.values())  # 1 positive + 1 negative per image
        assert all(q["image"].startswith("../images/test_") for q in qs)  # held-out images only
    assert all(q["image"].startswith("../../images/val_") for q in rows(tiny_world / "val" / "pope" / "random.jsonl"))


def test_popular_negative_is_the_most_frequent_absent_class():
    objects = [[{"class": "red circle", "box": [0, 0, 9, 9]}]]
    freq = torch.zeros(20).numpy()
    freq[tw.CLASSES.index("blue cross")] = 5
    freq[tw.CLASSES.index("red circle")] = 9  # most frequent, but present: not a negative
    cooc = torch.zeros(20, 20).numpy()
    cooc[tw.CLASSES.index("red circle"), tw.CLASSES.index("green square")] = 3
    import numpy as np
    out = tw.pope_rows([{"objects": objects[0]}], ["x"], freq, cooc, np.random.default_rng(0), "")
    assert out["popular"][1]["text"] == "Is there a blue cross in the image?"
    assert out["adversarial"][1]["text"] == "Is there a green square in the image?"


@pytest.mark.slow  # a second world build
def test_same_seed_same_files(tiny_world, tmp_path):
    again = tmp_path / "again"
    run_script("00_toy_world.py", "--tiny", "--out", again, "--seed", "3")
    a, b = digest(tiny_world), digest(again)
    a.pop("world.json"), b.pop("world.json")  # holds the build time
    assert a == b


@pytest.mark.slow
def test_model_reloads_offline_and_generates(tiny_world):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    processor = AutoProcessor.from_pretrained(tiny_world / "model")
    model = AutoModelForImageTextToText.from_pretrained(tiny_world / "model").eval()
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    q = rows(tiny_world / "pope" / "random.jsonl")[0]
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q["text"]}]}],
                                         add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.open(tiny_world / "pope" / q["image"])], return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 64  # (64 / 8)^2 patches
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.slow
def test_clip_loads_with_open_clip(tiny_world):
    import open_clip
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_world / 'clip'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_world / 'clip'}")
    image = preprocess(Image.open(next((tiny_world / "images").glob("*.png")))).unsqueeze(0)
    with torch.no_grad():
        i, t = model.encode_image(image), model.encode_text(tokenizer(["a photo of a red circle"]))
    assert i.shape == t.shape == (1, 64)


def test_training_sequences_match_the_processor():
    """SFT ids are built without the processor (speed): they must equal what the processor makes from the chat template.
    On the committed base model (the world's processor, 64 image tokens), so that no world is built."""
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(tw.SHIPPED)
    turns = [("is there a red circle in the image ?" + tw.SUFFIX, "yes"), ("what colour is the square ?", "blue")]
    for n_images in (1, 2):
        ids, labels = tw.encode_conversation(processor, turns, n_images, 64)
        messages = []
        for i, (q, a) in enumerate(turns):
            messages += [{"role": "user", "content": [{"type": "image"}] * (n_images if i == 0 else 0) + [{"type": "text", "text": q}]},
                         {"role": "assistant", "content": [{"type": "text", "text": a}]}]
        text = processor.apply_chat_template(messages, tokenize=False)
        ref = processor(text=[text], images=[Image.new("RGB", (128, 128))] * n_images, return_tensors="pt")["input_ids"][0]
        assert ids == ref.tolist()
        answer = [processor.tokenizer.decode([t]) for t in labels if t != -100]
        assert answer == ["yes", "</s>", "blue", "</s>"]


def test_embed_inputs_equals_llava_forward():
    """Training feeds precomputed tower features; the logits must equal LLaVA's own pixel_values path (on the
    committed base model and two random images, so that no world is built)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    processor = AutoProcessor.from_pretrained(tw.SHIPPED)
    model = AutoModelForImageTextToText.from_pretrained(tw.SHIPPED).eval()
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * 2 + [{"type": "text", "text": "describe the image ."}]}],
                                         add_generation_prompt=True, tokenize=False)
    pixels = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (64, 64, 3), generator=pixels, dtype=torch.uint8).numpy())
              for _ in range(2)]
    inputs = processor(text=[text], images=images, return_tensors="pt")
    with torch.no_grad():
        ref = model(**inputs).logits
        ours = model(inputs_embeds=tw.embed_inputs(model, inputs["input_ids"], tw.vision_features(model, inputs["pixel_values"])),
                     attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_eval_on_the_tiny_world_and_rescore(tiny_world, tmp_path):
    """05 end to end on the world 00 wrote (POPE splits, noise, CHAIR), then --answers re-scoring agrees."""
    out = tmp_path / "eval"
    run_script("05_eval_pope.py", "--model", tiny_world / "model", "--questions", tiny_world / "pope", "--out", out,
               "--noise-sigma", "0", "0.3", "--describe", tiny_world / "describe.jsonl", "--max-new-tokens", "8")
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["pope"]) == {"0", "0.3"} and set(metrics["pope"]["0"]) == {"random", "popular", "adversarial"}
    assert metrics["pope"]["0"]["random"]["n"] == 2 * 10 and set(metrics["chair"]) == {"0", "0.3"}
    rescored = tmp_path / "rescore"
    run_script("05_eval_pope.py", "--questions", tiny_world / "pope", "--answers", out / "answers.jsonl", "--out", rescored)
    assert json.loads((rescored / "metrics.json").read_text())["pope"] == metrics["pope"]


def test_committed_base_model_matches_the_default_settings():
    """The default build copies assets/toy_model instead of training only when its settings are the defaults:
    if a default changes without a retrain, this fails (rebuild with --retrain and copy world/model there)."""
    settings = tw.base_model_settings(tw.parse_args([]))
    assert tw.shipped_settings() == json.loads(json.dumps(settings))
    assert (tw.SHIPPED / "model.safetensors").is_file() and (tw.SHIPPED / "config.json").is_file()


@pytest.mark.slow  # two world builds
def test_a_second_build_into_a_world_being_built_refuses(tmp_path):
    """Two builds into one --out delete each other's files (a second run's rmtree under the first): while a run
    holds <out>.lock, another refuses before it deletes anything; once the holder is gone, a build takes the lock
    and removes it when it ends."""
    import fcntl
    out = tmp_path / "w"
    out.mkdir()
    (out / "mine.txt").write_text("the first build's file")
    with open(tmp_path / "w.lock", "a+") as held:  # as the running build holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit, match="being built by another run"):
            tw.lock_world(out)
        proc = run_script("00_toy_world.py", "--tiny", "--out", out, check=False)
        assert proc.returncode != 0 and "being built by another run" in proc.stderr, proc.stderr[-2000:]
        assert (out / "mine.txt").read_text() == "the first build's file"  # nothing deleted
    proc = run_script("00_toy_world.py", "--tiny", "--out", out, "--seed", "3")  # the holder has ended
    assert not (out / "mine.txt").exists() and (out / "world.json").is_file()
    assert not (tmp_path / "w.lock").exists()

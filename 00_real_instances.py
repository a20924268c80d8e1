"""Stage 00 (real data): RLHF-V's parquet or a LLaVA-format JSON -> instances.jsonl, the images, and the human pairs.

Paper: P2-DPO (ICLR 2026) makes its on-policy pairs from the images and prompts of RLHF-V,
and its implicit preference strength (IPS) analysis sets them against the dataset's own
human-written (off-policy) chosen / rejected pairs (here: stage 03 --score-only). No equation
lives here; this stage fixes what stage 01 reads:
  P = the first user turn (RLHF-V: "question") with every "<image>" tag removed (the chat
      template places the image) and surrounding whitespace stripped
  a row whose (image bytes, P) equals an earlier row's exactly is dropped, with its pair

Input   --data FILE, the format told by its extension:
  .parquet  RLHF-V as published (huggingface.co/datasets/openbmb/RLHF-V-Dataset,
            RLHF-V-Dataset.parquet, 5.7k rows; features per its dataset card): "idx",
            "image" = {"bytes", "path"}, "text" = a JSON string {"question", "chosen",
            "rejected"}, "ds_name", "origin_dataset", "origin_split", "image_path";
            or LLaMA-Factory's copy (huggingface.co/datasets/llamafactory/RLHF-V,
            rlhf-v.parquet): the JSON rows below, "images" = [{"bytes", "path"}].
            Read in row batches (pyarrow.parquet.ParquetFile.iter_batches); pyarrow is the one
            package beyond requirements.txt and is imported only here.
  .json     a list of LLaVA-format rows, read with the standard library:
            {"id", "image": path (or "images": [path]),
             "conversations": [{"from": "human", "value": "<image>\\n..."},
                               {"from": "gpt", "value": ...}, ...]}
            (LLaVA's own SFT files: instances only) and two ways of carrying a pair:
              V-DPO (github.com/YuxiXie/V-DPO, llava_dpo/train/dpo_train.py,
                LazyContrastiveDataset): "conversations" = [human, gpt: chosen],
                "contrastive_conversations" = [human, gpt: rejected]
              LLaMA-Factory's sharegpt preference rows (github.com/hiyouga/LLaMA-Factory,
                data/README.md; the "rlhf_v" entry of data/dataset_info.json):
                "conversations" = [human], "chosen" / "rejected" = {"from": "gpt", "value"}
                (plain strings are read too), "images": [path], no "id"
            "messages" with {"role": "user" | "assistant", "content"} turns (LLaMA-Factory's
            openai tags) is read like "conversations". Image paths are relative to --images
            (default: the JSON file's folder); an image may also be a base64 "data:" URI.
  Every field read is checked for its type on its own row: a wrong one is that row's error.
Output  DIR/instances.jsonl     {"id", "image", "prompt"}: stage 01's input; image paths
                                relative to DIR
        DIR/human_pairs.jsonl   {"id", "image", "prompt", "chosen", "rejected"}: 03
                                --score-only's input, one line per written instance whose row
                                holds a pair for a single user turn
        DIR/images/<sha256 of the bytes, 16 hex>.<format>
                                the image bytes exactly as the data holds them (a "data:"
                                URI's decoded; checked to decode the way stages 01-03 read
                                them, never re-encoded); one file per image
        DIR/instances.errors.jsonl  {"file", "row", "id", "error"}: bad rows (image missing or
                                undecodable, no question, ...)
        DIR/instances.duplicates.jsonl  {"id", "row", "duplicate_of"}
        DIR/instances.args.json. A rerun into the same DIR resumes; a run that wrote no instance
        and no pair (every row bad, or none) blocks nothing: a rerun with other data takes DIR over.
Rows are numbered from 0 in file order (the JSON list's index, the parquet file's row).

  # the paper's data; CPU, no model
  python 00_real_instances.py --data RLHF-V-Dataset.parquet --out rlhfv
  # V-DPO's export
  python 00_real_instances.py --data RLHF-V-Dataset-5.7k.json --images RLHF-V/images --out rlhfv
  # then stages 01-05
  python 01_attention_crop.py --model llava-hf/llava-1.5-7b-hf --data rlhfv/instances.jsonl
  python 03_filter.py --score-only --model llava-hf/llava-1.5-7b-hf \
      --data rlhfv/human_pairs.jsonl --out runs/human
  (no torchrun line: nothing here runs a model; one process reads the file once, at disk speed)
Our choices where the paper is silent: the prompt is the first user turn and a pair is kept only when the
row has one user turn (a later turn's answer needs the conversation before it, which a
single-turn instance drops); chosen and rejected are stripped like P; ids are the row's "id"
(JSON) or "idx" (RLHF-V), else the row number, and an id an earlier row already had gets
"-row<N>" appended; a parquet image struct that holds a path but no bytes is read from --images.
Memory: pyarrow decodes a nested binary column a row group at a time, so the peak is one row
group of the file plus one batch. Hugging Face `datasets` writes image data in groups of 100
rows (older releases) or about 100 MB (newer); a file written as a single row group is decoded
whole (measured: 0.4 GB of pyarrow memory for a 200 MB such file).
"""
import argparse
import base64
import hashlib
import io
import json
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

IMAGE_TAG = "<image>"  # LLaVA's placeholder for the image in a user turn
USER = ("human", "user")  # sharegpt / LLaVA tag, openai tag
ASSISTANT = ("gpt", "assistant")
SUFFIXES = {
    "JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif",
}
RESULT_ARGS = ("data", "images")  # resuming into a DIR needs these equal


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True,
                   help="RLHF-V's RLHF-V-Dataset.parquet, LLaMA-Factory's rlhf-v.parquet, or "
                   "a LLaVA-format .json list (V-DPO's or LLaMA-Factory's RLHF-V export; "
                   "module docstring)")
    p.add_argument("--out", default="rlhfv",
                   help="output folder: instances.jsonl, human_pairs.jsonl, images/ "
                   "(a rerun into it resumes)")
    p.add_argument("--images", default=None,
                   help="folder the JSON's image paths are relative to (default: the JSON "
                   "file's folder, as V-DPO's --image_folder); parquet: where an image stored "
                   "as a path only is read")
    p.add_argument("--batch-size", type=int, default=64,
                   help="parquet rows per read batch (64 RLHF-V rows: ~10 MB of images)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N rows of --data")
    p.add_argument("--max-image-pixels", type=int, default=Image.MAX_IMAGE_PIXELS,
                   help="an image with more pixels is a bad row (PIL's guard against "
                   "decompression bombs); 0: no limit")
    args = p.parse_args(argv)
    for flag, value in (("--batch-size", args.batch_size), ("--limit", args.limit)):
        if value is not None and value < 1:  # (--limit -1 would drop the last row, 0 every row)
            p.error(f"{flag} must be at least 1, not {value}")
    return args


def kind(value):
    """A value's type in the data's words, for an error message: "a list", "a number", ..."""
    names = {str: "text", bool: "true/false", int: "a number", float: "a number", list: "a list",
             dict: "an object", bytes: "bytes", type(None): "missing"}
    return names.get(type(value), type(value).__name__)


def text_or_none(value, where):
    """value when it is text, None when it is absent; ValueError naming the field for any other type (read
    as nothing, it would drop a pair in silence)."""
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"{where} is {kind(value)}, not text")


def prompt_of(question):
    """P: the question with every "<image>" tag removed and surrounding whitespace stripped.
    ValueError if missing, not text, or empty."""
    if question is None:
        raise ValueError("missing question")
    prompt = text_or_none(question, "the question").replace(IMAGE_TAG, "").strip()
    if not prompt:
        raise ValueError("empty question")
    return prompt


def pair_of(chosen, rejected):
    """(chosen, rejected) stripped, or None unless both are there (text, checked by the caller)."""
    if chosen is not None and rejected is not None:
        return chosen.strip(), rejected.strip()
    return None


def turn_of(turn, where):
    """(role, text) of a conversation turn, {"from", "value"} or {"role", "content"}; ValueError naming the
    turn (where) unless both are text."""
    if not isinstance(turn, dict):
        raise ValueError(f"{where} is {kind(turn)}, not a turn {{'from', 'value'}}")
    role = turn.get("from", turn.get("role"))
    text = turn.get("value", turn.get("content"))
    if not (isinstance(role, str) and isinstance(text, str)):
        raise ValueError(f"{where}: its role ('from' / 'role') is {kind(role)} and its text "
                         f"('value' / 'content') is {kind(text)}, where both must be text")
    return role, text


def answer_text(answer, where):
    """A chosen / rejected answer: plain text or an assistant turn (LLaMA-Factory's sharegpt); None when
    absent; ValueError naming the field otherwise."""
    if isinstance(answer, dict):
        role, text = turn_of(answer, where)
        if role not in ASSISTANT:
            raise ValueError(f"{where} is a '{role}' turn, not the assistant's ('gpt' or 'assistant')")
        return text
    return text_or_none(answer, where)


def rlhfv_row(row):
    """(P, pair or None, image) of a row of RLHF-V's parquet: "text" = JSON {question, chosen,
    rejected}, "image" = {bytes, path}. ValueError says why the row cannot be used."""
    if not isinstance(row.get("text"), str):
        raise ValueError(f"'text' is {kind(row.get('text'))}, not a JSON string")
    try:
        text = json.loads(row["text"])
    except ValueError as e:
        raise ValueError(f"'text' is not JSON ({e})") from None
    if not isinstance(text, dict):
        raise ValueError(f"'text' is JSON {type(text).__name__}, not an object with 'question'")
    prompt = prompt_of(text.get("question"))
    pair = pair_of(text_or_none(text.get("chosen"), "'text' chosen"),
                   text_or_none(text.get("rejected"), "'text' rejected"))
    return prompt, pair, row.get("image")


def llava_row(row):
    """(P, pair or None, image) of a LLaVA-format row (module docstring: LLaVA, V-DPO and
    LLaMA-Factory). P is the first user turn; the pair is kept only when it answers the one user
    turn of the row. Every turn, answer and image is checked for its type here, so a wrong one is
    this row's error."""
    field = "conversations" if "conversations" in row else "messages"
    turns = row.get(field)
    if not (isinstance(turns, list) and turns):
        raise ValueError("no 'conversations' (or 'messages') list")
    turns = [turn_of(t, f"'{field}' turn {i}") for i, t in enumerate(turns)]  # [(role, text)]
    users = [i for i, (role, _) in enumerate(turns) if role in USER]
    if not users:
        raise ValueError("no user turn ('from': 'human' or 'role': 'user')")
    images = row.get("images", row.get("image"))
    images = images if isinstance(images, list) else [images]
    if len(images) != 1:
        raise ValueError(f"{len(images)} images: an instance has one image")
    chosen = answer_text(row.get("chosen"), "'chosen'")
    rejected = answer_text(row.get("rejected"), "'rejected'")
    pair = None
    if "contrastive_conversations" in row:
        # V-DPO: the last answer replaced by the rejected one
        worse = row["contrastive_conversations"]
        if not (isinstance(worse, list) and len(worse) == len(turns)):
            got = f"a list of {len(worse)} turns" if isinstance(worse, list) else kind(worse)
            raise ValueError(f"'contrastive_conversations' is {got}, not a list of {len(turns)} turns "
                             f"like '{field}'")
        worse = [turn_of(t, f"'contrastive_conversations' turn {i}") for i, t in enumerate(worse)]
        if len(users) == 1 and turns[-1][0] in ASSISTANT and worse[-1][0] in ASSISTANT:
            pair = pair_of(turns[-1][1], worse[-1][1])
    elif users == [len(turns) - 1]:
        # LLaMA-Factory: the answers to the last turn, the user's
        pair = pair_of(chosen, rejected)
    return prompt_of(turns[users[0]][1]), pair, images[0]


def image_bytes(image, root):
    """The bytes of an image: a parquet {"bytes", "path"} struct (bytes, else the path read from
    root), a path relative to root (absolute stays absolute), or a base64 "data:" URI, decoded.
    ValueError says why there are none."""
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            if not isinstance(image["bytes"], (bytes, bytearray)):
                raise ValueError(f"the image's 'bytes' is {kind(image['bytes'])}, not bytes")
            return bytes(image["bytes"])
        image = image.get("path")
    if image is None or image == "":
        raise ValueError("no image")
    if not isinstance(image, str):
        raise ValueError(f"the image is {kind(image)}, not a path or {{'bytes', 'path'}}")
    if image.startswith("data:"):
        return data_uri_bytes(image)
    path = Path(root) / image
    shown = str(path) if len(str(path)) <= 200 else f"{str(path)[:100]}... ({len(str(path))} characters)"
    try:
        if not path.is_file():
            raise ValueError(f"image not found: {shown}")
        return path.read_bytes()
    except OSError as e:  # a name too long for the file system, a folder without permission
        raise ValueError(f"image unreadable: {shown} ({e.strerror or type(e).__name__})") from None


def data_uri_bytes(uri):
    """The bytes of a base64 data URI, "data:<type>;base64,<data>" (RFC 2397): decoded here, as cheap as
    reading a file, and checked like any image by image_suffix. ValueError for any other data URI."""
    header, comma, payload = uri.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ValueError(f"a 'data:' image that is not base64 ({header[:60]!r}: give data:<type>;base64,<data>)")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except ValueError as e:  # binascii.Error
        raise ValueError(f"a 'data:' image whose base64 does not decode ({e})") from None


def image_suffix(data):
    """The file suffix of an image's format, read from its bytes, after checking that they decode
    the way stages 01-03 will read the file (load_image). ValueError if they do not."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
        load_image(io.BytesIO(data))  # the full decode (a truncated file fails here, not at open)
    except Image.UnidentifiedImageError:
        # its message names the BytesIO object, which differs from run to run
        raise ValueError("undecodable image (no format PIL knows)") from None
    except Exception as e:
        # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...: all "unusable"
        raise ValueError(f"undecodable image ({type(e).__name__}: {e})") from None
    return SUFFIXES.get(fmt, "." + fmt.lower())


def row_id(row, n, seen):
    """The instance id: the row's "id" (LLaVA) or "idx" (RLHF-V), text or an integer, else the row
    number n; an id an earlier row already had gets "-row<n>" appended, so ids stay unique (and the
    same on every run: rows come in file order). ValueError for an id of another type."""
    key = "id" if "id" in row else "idx"
    raw = row.get(key)
    if raw is not None and (isinstance(raw, bool) or not isinstance(raw, (str, int))):
        raise ValueError(f"'{key}' is {kind(raw)}, not text or an integer")
    if raw is None or not str(raw).strip():
        rid = str(n)
    else:
        rid = str(raw)
    if rid in seen:
        rid = f"{rid}-row{n}"
    seen.add(rid)
    return rid


def convert(rows, parse, args, out, total):
    """Write instances.jsonl, human_pairs.jsonl and the images for rows [(row number, row dict)]
    parsed by `parse`. Ids already in instances.jsonl are skipped (resume).
    Returns (counts, errors, duplicates)."""
    done = continue_jsonl(out / "instances.jsonl")
    done_ids = {r["id"] for r in done}
    paired = {r["id"] for r in continue_jsonl(out / "human_pairs.jsonl")}
    # image names are content hashes: same name, same bytes
    kept = {(r["image"], r["prompt"]): r["id"] for r in done}
    seen = set()
    counts = Counter()
    errors = []
    duplicates = []
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / "instances.jsonl", "a", encoding="utf-8") as fi, \
            open(out / "human_pairs.jsonl", "a", encoding="utf-8") as fp:
        for n, row in tqdm(rows, total=total, desc="00 real instances", unit="row"):
            rid = str(n)  # until the row's own id is read
            try:
                if not isinstance(row, dict):
                    raise ValueError(f"a row is a JSON object, not {type(row).__name__}")
                rid = row_id(row, n, seen)
                prompt, pair, image = parse(row)
                if rid in done_ids:  # written by an earlier run (its pair went first)
                    counts["earlier"] += 1
                    continue
                data = image_bytes(image, args.images)
                digest = hashlib.sha256(data).hexdigest()[:16]
                name = f"images/{digest}{image_suffix(data)}"
            except ValueError as e:
                message = f"{args.data}:row {n}: {e}"
                errors.append({"file": args.data, "row": n, "id": rid, "error": message})
                continue
            if (name, prompt) in kept:
                duplicates.append({"id": rid, "row": n, "duplicate_of": kept[name, prompt]})
                continue
            kept[name, prompt] = rid
            save_image(out / name, data)
            if pair and rid not in paired:
                # the pair first: an instance line means its row is complete
                chosen, rejected = pair
                append_jsonl(fp, {"id": rid, "image": name, "prompt": prompt,
                                  "chosen": chosen, "rejected": rejected})
            append_jsonl(fi, {"id": rid, "image": name, "prompt": prompt})
            counts["written"] += 1
            counts["unpaired"] += pair is None
    return counts, errors, duplicates


def main(argv=None):
    args = parse_args(argv)
    Image.MAX_IMAGE_PIXELS = args.max_image_pixels or None
    data = Path(args.data)
    if not data.is_file():
        raise SystemExit(f"{data}: input file not found")
    args.data = str(data.resolve())  # a resume compares where the data is, not how it was spelled
    args.images = str(Path(args.images or data.parent).resolve())
    out = Path(args.out)
    check_settings(args, out)
    if data.suffix == ".parquet":
        total, parse, rows = parquet_rows(data, args.batch_size, args.limit)
    elif data.suffix == ".json":
        total, parse, rows = json_rows(data, args.limit)
    else:
        raise SystemExit(f"{data}: the format is told by the extension, "
                         f".parquet (RLHF-V) or .json (LLaVA format)")
    counts, errors, duplicates = convert(rows, parse, args, out, total)
    report(out, counts, errors, duplicates)


# ==================================================================================================
# Appendix: plumbing. A first reading may skip everything below: the stage's own input/output
# and printing, then helpers that several stages need, copied verbatim between
# "# ---- shared: NAME ----" rulers so each script stands alone (tests/test_shared_blocks.py
# keeps every copy identical).
# ==================================================================================================
# ---- plumbing: reading the data, writing and printing ----
def parquet_rows(path, batch_size, limit=None):
    """(rows to read, row parser, iterator of (row number, row dict)) over a parquet file read in
    batches of batch_size rows, only the columns the parser needs; reading stops at `limit` rows.
    The columns tell the layout: RLHF-V's "text" + "image", or LLaVA-format rows
    ("conversations" or "messages", "images")."""
    try:
        import pyarrow.parquet as pq  # only this path needs pyarrow
    except ImportError:
        raise SystemExit("reading a .parquet file needs pyarrow, which requirements.txt leaves "
                         "out: pip install pyarrow==26.0.1 (a LLaVA-format .json needs only the "
                         "standard library)")
    # column chunks in 1 MiB reads, none read ahead
    f = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    names = f.schema_arrow.names
    if "text" in names and "image" in names:
        parse = rlhfv_row
        wanted = ("idx", "text", "image")
    elif "conversations" in names or "messages" in names:
        parse = llava_row
        wanted = ("id", "conversations", "messages", "contrastive_conversations",
                  "chosen", "rejected", "images", "image")
    else:
        raise SystemExit(f"{path}: columns {names}: neither RLHF-V's ('text', 'image') "
                         f"nor LLaVA-format rows ('conversations' or 'messages')")
    total = f.metadata.num_rows if limit is None else min(limit, f.metadata.num_rows)

    def rows():
        n = 0
        columns = [c for c in wanted if c in names]
        for batch in f.iter_batches(batch_size=batch_size, columns=columns):
            for row in batch.to_pylist():
                if n >= total:
                    return
                yield n, row
                n += 1
    return total, parse, rows()


def json_rows(path, limit=None):
    """(rows to read, row parser, iterator of (row number, row)) over a JSON list of LLaVA-format
    rows."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))  # (a BOM: as Windows editors save)
    except ValueError as e:
        raise SystemExit(f"{path}: not JSON ({e})")
    if not isinstance(data, list):
        raise SystemExit(f"{path}: expected a JSON list of LLaVA-format rows, "
                         f"got a {type(data).__name__}")
    data = data[:limit]
    return len(data), llava_row, enumerate(data)


def check_settings(args, out):
    """Write DIR/instances.args.json; refuse when DIR already holds instances or pairs made from other
    data or images. A run that wrote neither (every row bad, or none) blocks nothing: the next run,
    with any data, takes DIR over."""
    path = out / "instances.args.json"
    old = {}
    wrote = any((out / f).is_file() and (out / f).stat().st_size for f in ("instances.jsonl", "human_pairs.jsonl"))
    if wrote and not path.is_file():  # the user's own files, or another program's: never written over
        raise SystemExit(f"{out} holds instances.jsonl or human_pairs.jsonl but no {path.name} says this "
                         f"script made them: pass a new or empty --out")
    if path.is_file() and wrote:
        old = json.loads(path.read_text())
    for k in RESULT_ARGS:
        if k in old and old[k] != vars(args)[k]:
            raise SystemExit(f"{out} holds instances made with {k}={old[k]!r}, "
                             f"not {vars(args)[k]!r}: use another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(vars(args), indent=1))


def save_image(path, data):
    """Write an image once (its name is its content hash), through a temporary file: a crash never
    leaves part of an image under the final name, where a resume would take it as done."""
    if path.is_file():
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_lines(path, rows):
    """Write a whole JSONL file atomically: a crash leaves the old file, never half of the new
    one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


def report(out, counts, errors, duplicates):
    """Write this run's bad rows and dropped duplicates (every run reads the whole input, so both
    are complete) and print the counts. Exits non-zero when the data gave no instance at all."""
    write_lines(out / "instances.errors.jsonl", errors)
    write_lines(out / "instances.duplicates.jsonl", duplicates)
    for e in errors[:10]:
        print(e["error"])
    n = counts["written"] + counts["earlier"]
    n_pairs = sum(1 for _ in open(out / "human_pairs.jsonl", encoding="utf-8"))
    summary = (f"{out / 'instances.jsonl'}: {n} instances ({counts['earlier']} from an earlier "
               f"run), {len(duplicates)} exact duplicates of (image, prompt) dropped, "
               f"{len(errors)} bad rows skipped")
    if errors:
        summary += f" (see {out / 'instances.errors.jsonl'})"
    print(summary)
    pairs_line = f"{out / 'human_pairs.jsonl'}: {n_pairs} human pairs"
    if counts["unpaired"]:
        pairs_line += f"; {counts['unpaired']} new instances have no single-turn pair"
    print(pairs_line)
    if n == 0:
        raise SystemExit(f"no row gave an instance: nothing in {out / 'instances.jsonl'}")
# ---- end plumbing ----


# ---- shared: jsonl ----
def read_jsonl(path, on_error=None):
    """[(line number, row)] of a JSONL file's non-blank lines. A line that is not a JSON object
    raises ValueError naming file and line, or goes to on_error(line number, message)."""
    rows = []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is that line's error
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:  # a BOM, CRLF: fine; not UTF-8, nested past the recursion limit: that line's error
                row = json.loads(raw.decode("utf-8-sig" if n == 1 else "utf-8"))
                assert isinstance(row, dict), f"expected a JSON object, got {type(row).__name__}"
                rows.append((n, row))
            except (ValueError, RecursionError, AssertionError) as e:
                if on_error is None:
                    raise ValueError(f"{path}:{n}: bad JSON line ({e})") from None
                on_error(n, f"{path}:{n}: bad JSON line ({e})")
    return rows


def append_jsonl(f, row):
    """Write one row and flush: a crash or Ctrl-C loses at most the line being written."""
    f.write(json.dumps(row) + "\n")
    f.flush()
# ---- end shared ----


# ---- shared: resume ----
def continue_jsonl(path):
    """The rows already in an output JSONL, once a last line a crash left unfinished is cut."""
    path = Path(path)
    data = path.read_bytes() if path.exists() else b""
    if not data.endswith(b"\n"):
        with open(path, "ab") as f:
            f.truncate(data.rfind(b"\n") + 1)
    try:
        return [row for _, row in read_jsonl(path)]
    except ValueError as e:  # not a crash's trace: an edit, or two writers
        raise SystemExit(f"{e}: a line inside the output is damaged; mend or delete that line, or "
                         f"delete {path} to start over") from None
# ---- end shared ----


# ---- shared: images ----
def open_image(path):
    """The image, opened lazily (header only) behind PIL's decompression-bomb guard, its warning an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise ValueError(f"{path}: {e} (a guard against decompression bombs; "
                             f"--max-image-pixels raises it)") from None


def load_image(path):
    """8-bit RGB, upright by its EXIF orientation (what a viewer shows): grayscale, palette and
    16-bit images converted, transparency composited on white."""
    with open_image(path) as img:
        img = ImageOps.exif_transpose(img)
    if img.mode == "F":  # 32-bit float: no range says what is white
        raise ValueError(f"{path}: a 32-bit float image; convert it to 8 or 16 bits")
    if img.mode.startswith("I"):  # 16-bit grayscale: scaled to 8 bits, not clipped
        img = Image.fromarray(np.round(np.asarray(img, np.float64) * 255 / 65535).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")
# ---- end shared ----


if __name__ == "__main__":
    main()

"""Plant realistic bugs one at a time in a copy of the repository and see which the tests catch (issue 17).

Each bug is (id, file, old snippet, new snippet, test selection). For each: the working tree is copied to a
temporary folder (without .git), the tests/ folder is optionally replaced by the one of a commit (--tests-from,
for "before" numbers), the snippet is replaced (it must occur exactly once), and `pytest -x -q` runs on the
selection: a failure means caught. Prints a markdown table.

  OMP_NUM_THREADS=1 python dev/plant_bugs.py                          # every bug, the current tests
  OMP_NUM_THREADS=1 python dev/plant_bugs.py --tests-from 3f29c62     # the tests as they were at a commit
  python dev/plant_bugs.py --list;  python dev/plant_bugs.py --only calib_sign --only lora_scale
  python dev/plant_bugs.py --baseline                                 # each selection passes unplanted
  python dev/plant_bugs.py --check      # every snippet occurs exactly once in the current tree (every run checks)

A file refactored after its bugs were written can leave an `old` snippet that no longer occurs: --check (and the
start of every run) names such stale bugs and exits 1, and tests/test_plant_bugs.py runs the same check.

Selections are the fast tests a forker runs for the file they touched (the stage's unit tests, not its
subprocess runs) plus tests/test_bug_classes.py; files missing from the chosen tests/ are dropped.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEW = "tests/test_bug_classes.py"
# the fast part of each stage's test file (its subprocess stage runs left out)
FAST = {
    "01": ("tests/test_01_attention_crop.py", "not stage_writes and not toy_world_defaults and not every_line "
                                              "and not resume_after"),
    "02": ("tests/test_02_make_pairs.py", "not stage_writes and not resume_after and not every_line"),
    "03": ("tests/test_03_filter.py", "not authors_thresholds and not llava_lines and not qwen_end and not "
                                      "kill_and_resume and not bad_lines and not every_line and not score_only"),
    "04": ("tests/test_04_train.py", "not step0 and not resume_equals and not no_usable and not two_processes "
                                     "and not fsdp"),
    "05": ("tests/test_05_eval_pope.py", "not end_to_end"),
    "05b": ("tests/test_05_benchmarks.py", "not end_to_end"),
}
F04, F02, F03, F01, F05 = ("04_train_calibrated_dpo.py", "02_make_pairs.py", "03_filter.py", "01_attention_crop.py",
                           "05_eval_pope.py")
F05B = "05_eval_benchmarks.py"


def bug(id, file, old, new, stage, what, extra=()):
    return dict(id=id, file=file, old=old, new=new, stage=stage, what=what, extra=list(extra))


BUGS = [
    # ---- 04: the loss ----
    bug("calib_sign", F04, "return -F.logsigmoid(beta * (delta_pi - delta_ref))",
        "return -F.logsigmoid(beta * (delta_ref - delta_pi))", "04", "L_calib sign flipped"),
    bug("dpo_sign", F04, "losses = -F.logsigmoid(beta * (pi_logratios - ref_logratios))",
        "losses = -F.logsigmoid(beta * (ref_logratios - pi_logratios))", "04", "DPO sign flipped"),
    bug("dpo_no_beta", F04, "losses = -F.logsigmoid(beta * (pi_logratios - ref_logratios))",
        "losses = -F.logsigmoid(pi_logratios - ref_logratios)", "04", "DPO without beta"),
    bug("calib_deg_ref_sign", F04, "delta_ref = fp32(ref_aug) - fp32(ref_deg)",
        "delta_ref = fp32(ref_deg) - fp32(ref_aug)", "04", "Delta pi_ref reversed (deg - aug)"),
    bug("ddw_swap", F04, "return w_base + alpha, w_base - alpha", "return w_base - alpha, w_base + alpha",
        "04", "DDW weights swapped between branches"),
    bug("ddw_no_minus1", F04, "alpha = alpha_max * torch.tanh((r - 1) / tau)",
        "alpha = alpha_max * torch.tanh(r / tau)",
        "04", "DDW tanh(r / tau) instead of tanh((r - 1) / tau)"),
    bug("ddw_tau_mul", F04, "alpha = alpha_max * torch.tanh((r - 1) / tau)",
        "alpha = alpha_max * torch.tanh((r - 1) * tau)",
        "04", "DDW (r - 1) * tau"),
    bug("lambda_on_both", F04, "torch.where(has_focus, dpo_f + lambda_calib * calib, 0.0)",
        "torch.where(has_focus, lambda_calib * (dpo_f + calib), 0.0)", "04", "lambda_calib scales DPO_focus too"),
    bug("one_branch_half", F04, "w_focus = torch.where(both, w_focus, 1.0) * has_focus",
        "w_focus = torch.where(both, w_focus, w_base) * has_focus",
        "04", "a focus-only line weighted w_base, not 1.0"),
    bug("batch_sum", F04, "ctx, world / len(batch))", "ctx, world)", "04",
        "L_total summed over the global batch"),
    bug("micro_mean", F04, "ctx, world / len(batch))", "ctx, world / len(mb))", "04",
        "L_total averaged per micro-batch (grad x accum)"),
    bug("clip_order_04", F04, 'get(f"clip.{k}", "clip")) for k in ("crop", "image")]',
        'get(f"clip.{k}", "clip")) for k in ("image", "crop")]', "04",
        "the two CLIP scores read swapped (04)"),
    bug("calib_ref_swap", F04, 'need.update(aug=f"calib_aug_{side}", deg=f"calib_deg_{side}")',
        'need.update(aug=f"calib_deg_{side}", deg=f"calib_aug_{side}")', "04", "calib ref terms swapped"),
    bug("robust_ctx_clean", F04, '("robust", robust, ("robust_w", "robust_l"), "prompt", "noise")',
        '("robust", robust, ("robust_w", "robust_l"), "prompt", "image")', "04", "DPO_rob scored on clean I"),
    bug("calib_prompt", F04, '("focus", focus, ("aug",), "prompt_enh", "aug")',
        '("focus", focus, ("aug",), "prompt", "aug")', "04", "I_aug scored with P, not P_enh"),
    bug("lora_scale", F04, "self.scale = alpha / r", "self.scale = r / alpha", "04",
        "LoRA scale r / alpha"),
    bug("merge_no_scale", F04, "w.float() + module.scale * (module.lora_B.float()",
        "w.float() + (module.lora_B.float()", "04", "merge without alpha / r"),
    bug("lora_everywhere", F04, "    lm = model.model.language_model\n", "    lm = model\n", "04",
        "LoRA on vision tower, projector, lm_head too"),
    bug("shard_overlap", F04, "shares = [batch[r::world] for r in range(world)]",
        "shares = [batch[r:] for r in range(world)]", "04", "ranks' shares overlap"),
    # ---- 02: pairs ----
    bug("focus_swap", F02, 'focus = {"chosen": said["focus_w"], "rejected": said["focus_l"]}',
        'focus = {"chosen": said["focus_l"], "rejected": said["focus_w"]}', "02", "focus chosen/rejected swapped"),
    bug("focus_l_prompt", F02, 'rejected = Job(key, "focus_l", prompt, [views["deg"]])',
        'rejected = Job(key, "focus_l", prompt_enh, [views["deg"]])', "02", "y_l decoded with P_enh"),
    bug("amateur_clean", F02, 'amateur_images=[views["noise"]]', "amateur_images=[image]", "02",
        "CA amateur sees the clean image"),
    bug("robust_l_clean", F02, 'rejected = Job(key, "robust_l", prompt, [views["noise"]])',
        'rejected = Job(key, "robust_l", prompt, [image])', "02", "robust y_l from the clean image"),
    bug("aug_order", F02, 'else [image, views["crop"]]', 'else [views["crop"], image]', "02",
        "I_aug shows the crop first"),
    bug("crop_xy", F02, "crop = image.crop(tuple(bbox))", "crop = image.crop((bbox[1], bbox[0], bbox[3], bbox[2]))",
        "02", "I_crop with x and y swapped"),
    bug("deg_black", F02, "out.paste(colour, tuple(bbox))", "out.paste((0, 0, 0), tuple(bbox))", "02",
        "I_deg filled black, not the mean colour"),
    bug("ca_sign", F02, "logits_ca = (1 + lambda_ca) * logits_ep - lambda_ca * logits_at",
        "logits_ca = (1 - lambda_ca) * logits_ep + lambda_ca * logits_at", "02", "contrast toward the amateur"),
    bug("head_absolute", F02, "head = p_ep >= beta_head * p_ep.max(-1, keepdim=True).values",
        "head = p_ep >= beta_head", "02", "V_head absolute, not relative to max p_EP"),
    bug("nucleus_before_ca", F02,
        "            logits = contrastive_logits(logits[:B], logits[B:], lambda_ca, beta_head)  # (B, V)\n",
        "            if temperature > 0:  # greedy decoding has no nucleus\n"
        "                p_s, o_s = torch.softmax(logits[:B] / temperature, -1).sort(-1, descending=True)\n"
        "                keep = torch.zeros_like(p_s, dtype=torch.bool).scatter(-1, o_s, p_s.cumsum(-1) - p_s < top_p)\n"
        "                logits = torch.cat([logits[:B].masked_fill(~keep, float('-inf')), logits[B:]])\n"
        "                top_p = 1.0\n"
        "            logits = contrastive_logits(logits[:B], logits[B:], lambda_ca, beta_head)  # (B, V)\n", "02", "top-p on the expert's logits before the contrast"),
    bug("no_temperature", F02, "probs = torch.softmax(logits.float() / temperature, -1)",
        "probs = torch.softmax(logits.float(), -1)", "02", "temperature ignored"),
    bug("nucleus_strict", F02, "p = torch.where(p.cumsum(-1) - p < top_p, p, 0.0)",
        "p = torch.where(p.cumsum(-1) < top_p, p, 0.0)", "02",
        "nucleus drops the token that crosses top_p"),
    bug("seed_no_role", F02, 'f"{seed}/{key}/{role}"', 'f"{seed}/{key}"', "02",
        "one sampler for all roles of an instance"),
    bug("null_never", F02, 'if said["robust_w"] != said["robust_l"]:', "if True:", "02",
        "identical responses kept as a pair"),
    bug("robust_prompt_bare", F02, "robust_pair_contexts(key, prompt_robust, image, views, args.refine_init)",
        "robust_pair_contexts(key, prompt, image, views, args.refine_init)", "02",
        "robustness responses decoded without the instruction prompt_robust records"),
    bug("refine_own_draws", F02, 'draws="init" if refine_init else None', "draws=None", "02",
        "--refine-init ignored: y_w keeps its own sampler"),
    bug("crop_unchecked", F02, 'if row.get("crop", "window") not in ("full", "window"):', "if False:", "02",
        "a crop field other than full/window read silently as window"),
    bug("resume_by_count", F02, 'mine = [r for r in rows if str(r["id"]) not in done][rank::world]',
        "mine = rows[len(done):][rank::world]",
        "02", "resume skips rows by count, not id", extra=["tests/test_shared_blocks.py"]),
    # ---- 03: scoring ----
    bug("clip_order_03", F03, 'return [{"crop": c, "image": i, "ratio": gain_ratio(c, i)} for c, i in zip(crop, full)]',
        'return [{"crop": c, "image": i, "ratio": gain_ratio(c, i)} for c, i in zip(full, crop)]', "03",
        "the two CLIP scores stored swapped (03)"),
    bug("ratio_inverted", F03, "return clip_crop / clip_image", "return clip_image / clip_crop", "03",
        "gain ratio image / crop"),
    bug("ppl_sign", F03, "return math.exp(-logp / ntok)", "return math.exp(logp / ntok)", "03", "PPL sign"),
    bug("margin_sum", F03, "return logp_w / ntok_w - logp_l / ntok_l", "return logp_w - logp_l", "03",
        "margin on summed, not per-token, log-probs"),
    bug("margin_band", F03, '("margin high", margin <= margin_high)', '("margin high", margin < margin_high)', "03",
        "margin upper bound exclusive"),
    bug("robust_expert_plain_p", F03, '"robust_expert_w": ("robust", "chosen", "prompt_robust", "image")',
        '"robust_expert_w": ("robust", "chosen", "prompt", "image")', "03",
        "robust y_w judged under P, not the instructed P' it was decoded from"),
    bug("robust_own_l_unused", F03, '"robust": ("robust_expert_w", "robust_own_l")',
        '"robust": ("robust_expert_w", "robust_l")', "03", "robust y_l judged under (I_noise, P), not P'"),
    bug("gen_instruction_dropped", F03, "return f\"{instruction} {row['prompt']}\".strip()",
        "return row[\"prompt\"]", "03", "an older pairs file's robust instruction dropped from P'"),
    bug("margin_flags_unchecked", F03, "    if args.margin_low > args.margin_high:\n",
        "    if False:\n", "03", "--margin-low above --margin-high accepted"),
    bug("bbox_bool_pixel", F03, "all(type(v) is int for v in bbox)", "all(isinstance(v, int) for v in bbox)",
        "03", "a bbox of bools read as pixels"),
    bug("false_pair_is_null", F03, "if row.get(b) is not None}", "if row.get(b)}", "03",
        '"focus": false or {} read as no pair'),
    # ---- 01: attention ----
    bug("no_direct", F01, "return (through_text + a) * img", "return through_text * img", "01",
        "A without the direct answer->image path"),
    bug("crop_no_area", F01, "score = (S[y, x] - np.mean([S[p] for p in nbrs])) / (w * h)",
        "score = S[y, x] - np.mean([S[p] for p in nbrs])", "01", "crop score not divided by the area"),
    bug("paper_map_direct", F01, "if not direct:  # the paper's A = A_tok (x) A_img",
        "if False:  # the paper's A = A_tok (x) A_img", "01", "--map paper keeps the direct term A_dir"),
    bug("focus_not_in_map", F01, "attention_maps(model, processor, [asked[i] for i in idx]",
        "attention_maps(model, processor, [batch[i]['prompt'] for i in idx]", "01",
        "--focus-prompt reaches the answer but not the map's forward"),
    bug("viz_name_clash", F01, 'safe += f"-{zlib.crc32(str(key).encode()):08x}"', "pass", "01",
        "--viz: ids 'a b' and 'a_b' share one PNG"),
    # ---- 05: POPE ----
    bug("pope_lower", F05, "words = text.split(\".\")[0].replace(\",\", \"\").split(\" \")",
        "words = text.lower().split(\".\")[0].replace(\",\", \"\").split(\" \")", "05",
        "POPE parser lower-cases (not the official rule)"),
    bug("pope_yes_ratio", F05, '"yes_ratio": ratio(tp + fp, n)', '"yes_ratio": ratio(tp + fn, n)', "05",
        "yes-ratio counts labels, not predictions"),
    # ---- 05: the other benchmarks ----
    bug("amber_positive", F05B, 'c["tp"] += (truth, response) == ("no", "No")',
        'c["tp"] += (truth, response) == ("yes", "Yes")', "05b", "AMBER's positive class Yes, not No"),
    bug("amber_eps", F05B, 'eps = 0.001 if group == "existence" else 0.0001', "eps = 0.0001", "05b",
        "AMBER's existence F1 with the others' epsilon"),
    bug("hallusion_unknown", F05B, 'right.append(verdict == truth or (verdict == "Unknown" and no_figure))',
        "right.append(verdict == truth)", "05b", "HallusionBench: Unknown on a VS question without a figure wrong"),
]


def stale(bugs=BUGS, root=ROOT):
    """The bugs whose `old` snippet does not occur exactly once in root's file: [(id, file, count)]."""
    out = []
    for b in bugs:
        path = Path(root) / b["file"]
        n = path.read_text().count(b["old"]) if path.exists() else 0
        if n != 1:
            out.append((b["id"], b["file"], n))
    return out


def check(bugs=BUGS, root=ROOT):
    """Print the stale bugs; True when there is none."""
    bad = stale(bugs, root)
    for id, file, n in bad:
        print(f"stale: {id}: its snippet occurs {n} times in {file} (must be once)", file=sys.stderr)
    return not bad


def selection(b, tests_dir):
    path, k = FAST[b["stage"]]
    files = [f for f in [NEW, path, *b["extra"]] if (tests_dir / Path(f).name).exists()]
    return files, k


def run_one(b, tests_from, timeout, plant=True):
    with tempfile.TemporaryDirectory(prefix="plant_") as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", "__pycache__", ".venv", "runs", "world"))
        if tests_from:
            shutil.rmtree(repo / "tests")
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", tests_from, "tests"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(repo)], input=archive, check=True)
        if plant:
            path = repo / b["file"]
            text = path.read_text()
            n = text.count(b["old"])
            if n != 1:
                return f"snippet found {n} times", 0.0, []
            path.write_text(text.replace(b["old"], b["new"]))
        files, k = selection(b, repo / "tests")
        if not files:
            return "no tests", 0.0, files
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *files,
                                   "-k", k], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        dt = time.time() - t0
        if rc == 0:
            return "missed" if plant else "passes", dt, files
        if rc == 1:
            return "caught" if plant else "FAILS", dt, files
        return f"rc {rc}", dt, files


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", action="append", help="bug id (repeatable)")
    p.add_argument("--list", action="store_true", help="list the bugs and exit")
    p.add_argument("--tests-from", default=None, help="a commit whose tests/ replaces the current one")
    p.add_argument("--baseline", action="store_true", help="run each selection unplanted (must pass)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per pytest run")
    p.add_argument("--check", action="store_true",
                   help="only check that every bug's snippet occurs exactly once in the current tree")
    args = p.parse_args()
    unknown = set(args.only or ()) - {b["id"] for b in BUGS}
    if unknown:
        p.error(f"unknown bug id: {', '.join(sorted(unknown))}")
    if not check():
        sys.exit(1)
    if args.check:
        print(f"{len(BUGS)} bugs, every snippet occurs once")
        return
    bugs = [b for b in BUGS if not args.only or b["id"] in args.only]
    if args.list:
        for b in bugs:
            print(f"{b['id']:20s} {b['file']:28s} {b['what']}")
        return
    print(f"| id | file | bug | {'baseline' if args.baseline else 'result'} | s |")
    print("|---|---|---|---|---|")
    done = set()
    for b in bugs:
        if args.baseline and b["stage"] + str(b["extra"]) in done:
            continue
        done.add(b["stage"] + str(b["extra"]))
        result, dt, files = run_one(b, args.tests_from, args.timeout, plant=not args.baseline)
        print(f"| {b['id']} | {b['file'].split('_')[0]} | {b['what']} | {result} | {dt:.0f} |", flush=True)


if __name__ == "__main__":
    main()

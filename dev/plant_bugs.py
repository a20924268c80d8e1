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
subprocess runs) plus tests/test_bug_classes.py and tests/test_forker_bugs.py's tests of that stage (run first);
files missing from the chosen tests/ are dropped. BUGS_24 are issue 24's (dev/PLANTED.md, second table).
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
FORKER = "tests/test_forker_bugs.py"  # issue 24: run first, a stage's own tests only (see selection)
# the fast part of each stage's test file (its subprocess stage runs left out)
FAST = {
    "01": ("tests/test_01_attention_crop.py", "not stage_writes and not toy_world_defaults and not every_line "
                                              "and not resume_after"),
    "02": ("tests/test_02_make_pairs.py", "not stage_writes and not resume_after and not every_line"),
    "03": ("tests/test_03_filter.py", "not authors_thresholds and not llava_lines and not qwen_end and not "
                                      "kill_and_resume and not bad_lines and not every_line and not score_only"),
    "04": ("tests/test_04_train.py", "not step0 and not resume_equals and not no_usable and not two_processes"),
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
    bug("focus_l_prompt", F02, 'Job(key, "focus_l", prompt, [views["deg"]])',
        'Job(key, "focus_l", prompt_enh, [views["deg"]])', "02", "y_l decoded with P_enh"),
    bug("amateur_clean", F02, 'amateur_images=[views["noise"]]', "amateur_images=[image]", "02",
        "CA amateur sees the clean image"),
    bug("robust_l_clean", F02, 'Job(key, "robust_l", prompt, [views["noise"]])',
        'Job(key, "robust_l", prompt, [image])', "02", "robust y_l from the clean image"),
    bug("aug_order", F02, 'prompt_enh, [image, views["crop"]])', 'prompt_enh, [views["crop"], image])', "02",
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
    bug("refine_own_draws", F02, 'draws = "init" if refine_init else None', "draws = None", "02",
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

# Issue 24: the twelve that survived a second planting (+ the one caught by luck), then 30+ more of their kinds.
BUGS_24 = [
    # ---- the survivors ----
    bug("lr_cosine_ahead", F04, "math.cos(math.pi * (step - warmup) / max(1, total - warmup))",
        "math.cos(math.pi * (step - warmup + 1) / max(1, total - warmup))", "04",
        "cosine one step ahead (not the peak after warm-up, lr 0 at the last step)"),
    bug("clip_per_micro", F04, "_, s = micro_step(model, processor, mb, args, ctx, world / len(batch))\n",
        "_, s = micro_step(model, processor, mb, args, ctx, world / len(batch))\n"
        '            torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], args.max_grad_norm)\n',
        "04", "gradient clipped after every micro-step, then again"),
    bug("merge_train_mode", F04, "module.scale * (module.lora_B.float() @ module.lora_A.float())",
        "module.scale * (module.lora_B.float() @ F.linear(module.dropout(torch.eye(w.shape[1])), "
        "module.lora_A.float()).T)", "04", "merge through the module in train mode (dropout on A)"),
    bug('branch_temps_swap', F02, 'args.focus_temperature if focus else args.temperature, args.top_p,',
        'args.temperature if focus else args.focus_temperature, args.top_p,', '02',
        'per-branch temperatures swapped (focus T 0.2, robust greedy)'),
    bug('pixel_corners', F01, 'u = (np.arange(n) + 0.5 + pad[axis]) * r / padded[axis] - offset[axis]',
        'u = (np.arange(n) + pad[axis]) * r / padded[axis] - offset[axis]', '01',
        'grid-to-pixel on pixel corners, not centres'),
    bug("crop_tie_last", F01, "if best is None or score > best[0]:", "if best is None or score >= best[0]:", "01",
        "a crop-score tie goes to the larger window, not the first"),
    bug("score_good_index", F03, "rows = [(i, r) for i, line in lines.items() for r in scoring_rows(line, terms)]",
        "rows = [(i, r) for i, line in enumerate(lines.values()) for r in scoring_rows(line, terms)]", "03",
        "scores at a line's index among the good lines"),
    bug("calib_aug_l_prompt", F03, '"calib_aug_l": ("focus", "rejected", "prompt_enh", "aug"),',
        '"calib_aug_l": ("focus", "rejected", "prompt", "aug"),', "03", "ref.calib_aug_l scored with P, not P_enh"),
    bug('sigma_first', F05, 'images = [noisy_image(j, args.seed) for j in batch]  # B images, each at its sigma',
        'images = [noisy_image(dict(j, sigma=args.noise_sigma[0]), args.seed) for j in batch]', '05',
        "every sigma answers on the first sigma's image"),
    bug("hallusion_by_figure", F05B, 'pairs.setdefault("_".join(stem + [str(r["question_id"])]), [])',
        'pairs.setdefault("_".join(stem + [str(r["figure_id"])]), [])', "05b",
        "HallusionBench pairs grouped by figure_id, not question_id"),
    bug("repeated_int_id", F01, "        if problem is None and str(key) in seen:\n",
        "        if problem is None and key in seen:\n", "01",
        "shared: a repeated integer id passes (raw id vs its string)"),
    bug("append_no_flush", F05, '    f.write(json.dumps(row) + "\\n")\n    f.flush()\n',
        '    f.write(json.dumps(row) + "\\n")\n', "05", "shared: append_jsonl without a flush"),
    bug("robust_ref_expert", F04, 'need.update(robust_w="robust_w", robust_l="robust_l")',
        'need.update(robust_w="robust_expert_w", robust_l="robust_l")', "04",
        "DPO_rob's y_w reference read from robust_expert_w (caught by luck before)"),
    # ---- 04: schedule and optimizer order; merge; ref keys ----
    bug("lr_warmup_from_0", F04, "return peak * ((step + 1) / (warmup + 1))", "return peak * (step / warmup)",
        "04", "warm-up starts at lr 0 (the first step does nothing)"),
    bug("lr_cosine_whole_run", F04, "math.cos(math.pi * (step - warmup) / max(1, total - warmup))",
        "math.cos(math.pi * step / max(1, total))", "04", "cosine over the whole run, warm-up not subtracted"),
    bug('lr_step_plus_1', F04, 'lr = lr_at(step, args.lr, math.ceil(args.warmup_ratio * total), total)',
        'lr = lr_at(step + 1, args.lr, math.ceil(args.warmup_ratio * total), total)', '04',
        'schedule read at step + 1 in the loop'),
    bug('warmup_int', F04, 'lr = lr_at(step, args.lr, math.ceil(args.warmup_ratio * total), total)',
        'lr = lr_at(step, args.lr, int(args.warmup_ratio * total), total)', '04',
        'warm-up steps truncated, not ceil'),
    bug("steps_floor", F04, "steps_per_epoch = math.ceil(len(lines) / per_step)",
        "steps_per_epoch = len(lines) // per_step", "04", "the short last batch of an epoch dropped"),
    bug('no_zero_grad', F04, '    optimizer.step()\n    optimizer.zero_grad(set_to_none=True)\n',
        '    optimizer.step()\n', '04',
        'gradients never zeroed between steps'),
    bug("clip_inf_norm", F04, "grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)",
        'grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm, norm_type=float("inf"))', "04",
        "clipped by the max-abs norm, not the 2-norm"),
    bug("merge_keeps_lora", F04, "            model.set_submodule(name, module.base)\n", "", "04",
        "merge leaves the LoRA wrapper in place (B A added twice)"),
    bug("calib_ref_always_w", F04, 'side = args.calib_ref[0]  # "w" or "l": whose Delta pi_ref', 'side = "w"', "04",
        "--calib-ref lose ignored"),
    bug("focus_ref_from_aug", F04, 'need.update(focus_w="focus_w", focus_l="focus_l")',
        'need.update(focus_w="calib_aug_w", focus_l="focus_l")', "04",
        "DPO_focus y_w reference from its generating context (I_aug, P_enh)"),
    # ---- 02: per-branch settings and images ----
    bug('max_tokens_swap', F02, 'args.focus_max_new_tokens if focus else args.max_new_tokens,',
        'args.max_new_tokens if focus else args.focus_max_new_tokens,', '02',
        'per-branch length caps swapped'),
    bug('focus_at_robust_t', F02, 'args.focus_temperature if focus else args.temperature, args.top_p,',
        'args.temperature, args.top_p,', '02',
        'focus sampled at the robustness temperature'),
    bug("gen_no_focus_t", F02, 'GEN_ARGS = ("temperature", "top_p", "max_new_tokens", "focus_temperature", ',
        'GEN_ARGS = ("temperature", "top_p", "max_new_tokens", ', "02",
        "pairs.jsonl's gen omits the focus temperature"),
    bug('beta_head_fixed', F02, 'args.lambda_ca if contrastive else None, args.beta_head,',
        'args.lambda_ca if contrastive else None, 0.1,', '02',
        '--beta-head ignored (0.1)'),
    bug('noise_seed_0', F02, '"noise": add_noise(image, sigma, seed, key)}',
        '"noise": add_noise(image, sigma, 0, key)}', '02',
        'I_noise ignores --seed'),
    bug('focus_instructed', F02, 'mine = focus_pair_contexts(key, prompt, prompt_enh,',
        'mine = focus_pair_contexts(key, prompt_robust, prompt_enh,', '02',
        "the robustness instruction before the focus y_l's P too"),
    bug('plain_at_focus', F02, '    focus = jobs[0].role in FOCUS\n',
        '    focus = jobs[0].amateur_images is None\n', '02',
        'robust y_l and y_init decoded with the focus settings'),
    # ---- 03: each term's context; the order of a context's images ----
    bug("robust_w_clean", F03, '"robust_w": ("robust", "chosen", "prompt", "noise"),',
        '"robust_w": ("robust", "chosen", "prompt", "image"),', "03", "ref.robust_w under I, not I_noise"),
    bug("calib_deg_l_chosen", F03, '"calib_deg_l": ("focus", "rejected", "prompt", "deg"),',
        '"calib_deg_l": ("focus", "chosen", "prompt", "deg"),', "03", "ref.calib_deg_l scores y_w"),
    bug('expert_on_noise', F03, '"robust_expert_w": ("robust", "chosen", "prompt_robust", "image"),',
        '"robust_expert_w": ("robust", "chosen", "prompt_robust", "noise"),', '03',
        "the filter's expert context of y_w is I_noise"),
    bug('aug_order_03', F03, 'else [pil["image"], pil.get("crop")]',
        'else [pil.get("crop"), pil["image"]]', '03',
        'I_aug scored crop first (03)'),
    bug('score_rows_position', F03, 'for i, a, n in zip(chunk, logp.tolist(), ntok.tolist()):',
        'for i, a, n in zip(range(k, k + len(chunk)), logp.tolist(), ntok.tolist()):', '03',
        'log-probs stored by position in their context group'),
    bug("calib_aug_w_prompt", F03, '"calib_aug_w": ("focus", "chosen", "prompt_enh", "aug"),',
        '"calib_aug_w": ("focus", "chosen", "prompt", "aug"),', "03", "ref.calib_aug_w scored with P, not P_enh"),
    # ---- 01: geometry and ties ----
    bug('offset_sign', F01, 'u = (np.arange(n) + 0.5 + pad[axis]) * r / padded[axis] - offset[axis]',
        'u = (np.arange(n) + 0.5 + pad[axis]) * r / padded[axis] + offset[axis]', '01',
        'centre-crop offset added'),
    bug('resize_round', F01, 'else (int(short * X1 / Y1), short)',
        'else (round(short * X1 / Y1), short)', '01',
        'the long side rounded, not truncated as transformers does'),
    bug("tie_first_position", F01, "k = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)", "k = 0", "01",
        "a tie of S goes to the first position, not the middle"),
    bug("grid_transposed", F01, "g = grid[1 - axis]", "g = grid[axis]", "01",
        "grid rows and columns swapped in pixel_cells"),
    # ---- 05: per-sigma images; joins; HallusionBench's rules ----
    bug("noise_key_path", F05, 'return add_noise(image, job["sigma"], seed, job["noise_key"])',
        'return add_noise(image, job["sigma"], seed, str(job["path"]))', "05",
        "noise keyed by the resolved path, not the path as written"),
    bug("noise_seed_0_05", F05, 'return add_noise(image, job["sigma"], seed, job["noise_key"])',
        'return add_noise(image, job["sigma"], 0, job["noise_key"])', "05", "05's I_noise ignores --seed"),
    bug('answers_by_id_only', F05, 'return [(n, r) for n, r in rows if wanted is None or row_key(r) in wanted]',
        'return [(n, r) for n, r in rows if wanted is None or row_key(r)[2] in {k[2] for k in wanted}]', '05',
        "a run scores every sigma's answers in its --out"),
    bug("hallusion_unknown_right", F05B, 'right.append(verdict == truth or (verdict == "Unknown" and no_figure))',
        'right.append(verdict == truth or verdict == "Unknown")', "05b",
        "HallusionBench: 'Unknown' right on any question"),
    bug("hallusion_fig0_counted", F05B, "            if not no_figure:\n", "            if True:\n", "05b",
        "HallusionBench: VS figure 0 counted as a figure"),
    bug("sigma_first_bench", F05B, 'images = [noisy_image(j, args.seed) for j in batch if j["path"] is not None]',
        'images = [noisy_image(dict(j, sigma=args.noise_sigma[0]), args.seed) for j in batch if j["path"]]',
        "05b", "a benchmark's every sigma answers on the first sigma's image"),
    bug("pope_split_ignored", F05, 'split = row.get("split", next(iter(questions)))',
        "split = next(iter(questions))", "05", "answers grouped by sigma only, not split"),
    # ---- shared ----
    bug("repeated_id_raw_key", F02, "        seen[str(key)] = n\n", "        seen[key] = n\n", "02",
        "shared: ids stored raw, checked as text (a repeated integer id passes)"),
]
BUGS = BUGS + BUGS_24


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
    """The stage's fast tests: tests/test_forker_bugs.py's tests of that stage (named f<stage>_) and of the shared
    blocks (fsh_), tests/test_bug_classes.py, the stage's own file (FAST) and the bug's extras."""
    path, k = FAST[b["stage"]]
    files = [f for f in [FORKER, NEW, path, *b["extra"]] if (tests_dir / Path(f).name).exists()]
    others = [f"not f{s}_" for s in FAST if s != b["stage"]]
    return files, " and ".join([f"({k})", *others])


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

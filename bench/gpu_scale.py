"""Benchmark: stages 01, 02 and 04 at full scale, on a random LLaVA-1.5-7B-shaped model built on the GPU.

No checkpoint is reachable, so the model is built from LLaVA-1.5-7B's config with random weights, directly on the
device (bf16 on CUDA, fp32 on a CPU, as the stages' load_model gives), nothing saved to disk. Random weights cost
the same time and memory as trained ones; decoding runs exactly --new-tokens tokens (EOS ignored) so that the
answers' content does not matter. Three parts, each calling the stage's own functions:
  01 attention  attention_maps(...) for --attn-batch instance(s), (I, P, y) with a 32-token answer y, on 01's
                default layer (the middle one): eager attention, a forward hook keeps one layer's head-averaged
                weights; also the authors' grad_att; and, for comparison, one forward with output_attentions=True,
                which keeps every layer's (B, H, T, T) weights (measured, and computed as L x B x H x T^2 x bytes)
  02 decode     decode(...) greedy, plain (B rows) vs contrastive amplification (expert + amateur: one forward of
                2B rows), at each --batch-sizes; tokens/s = B x new tokens / wall time (prefill included)
  04 train      one optimizer step of P2-DPO at the paper's effective batch (16 lines = --train-batch 4 x --accum
                4 micro-steps): prepare (LoRA r 32, gradient checkpointing), micro_step (six scored terms per line:
                focus w/l on I, robust w/l on I_noise, y_w on (I, I_crop) with P_enh and on I_deg), AdamW; first
                with 03's precomputed reference log-probs (what 04 does), then with a live reference (TRL's
                default): a second copy of the model in memory, whose no-grad forwards score the six terms first,
                on the tensors the policy then reads (images and processor once per micro-step in both variants)
Memory: on CUDA torch.cuda.max_memory_allocated (peak_gb: everything allocated, weights included; extra_mb: above
what was allocated when the part began); on a CPU (Linux) the peak resident set (VmHWM, reset per part) and its
growth. Times: torch.cuda.synchronize around each, a warm-up call first, the median of --reps for decoding.
Targets, judged on --size 7b only (the small config checks the code path): the whole run under 600 s (issue:
"one run, under 10 minutes"), contrastive / plain decoding time <= 2.1 (issue 6, as bench_decode.py), and the
training step's precomputed / live-reference peak memory <= 0.6 and time <= 0.75 (issue 6, as bench_train_step.py).
Exits 1 when one is missed.
Choices where the issue is silent: the tokenizer is the tests' word-level one (tests/conftest.py, about 70 ids),
so the config's vocab is padded to LLaVA-1.5's 32064 and image_token_id is the tokenizer's <image> id (4), not
32000; training responses are 12-20 words (bench_train_step.make_examples), so T is dominated by the 576 image
tokens (1152 for (I, I_crop)); 01's answer is fixed (31 words + EOS, 01's --max-new-tokens 32) instead of generated.
Sizes: 7b = LLaVA-1.5-7B (text Llama-2-7B: 32 x 4096, MLP 11008, 32 heads; vision CLIP ViT-L/14-336: 24 x 1024,
16 heads, 336 px, 14 px patches -> 576 image tokens; 2-layer MLP projector; vision_feature_layer -2); small = the
same family and image geometry (text 4 x 256, vision 2 x 128), which runs on a CPU.

  python bench/gpu_scale.py                                           # small config on CPU, about 40 s
  python bench/gpu_scale.py --size 7b --json runs/gpu_scale_7b.json   # one GPU (H200: 72 s; bench/results/)
  CUDA_VISIBLE_DEVICES=3 python bench/gpu_scale.py --size 7b --batch-sizes 1 8 32   # another card, larger batches
"""
import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (AutoModelForImageTextToText, AutoProcessor, CLIPVisionConfig, LlamaConfig,  # noqa: E402
                          LlavaConfig)
import transformers  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from bench_train_step import make_examples  # noqa: E402
from common import ROOT, load_stage  # noqa: E402

SIZES = {  # LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf's config) and a small model of the same family
    "7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, vision_hidden=1024, vision_intermediate=4096,
               vision_layers=24, vision_heads=16),
    "small": dict(hidden=256, intermediate=688, layers=4, heads=4, vision_hidden=128, vision_intermediate=512,
                  vision_layers=2, vision_heads=2)}
VOCAB, IMAGE, PATCH = 32064, 336, 14  # LLaVA-1.5: 32000 + 64 padding ids; CLIP ViT-L/14-336
PROMPT = "describe the image ."
ANSWER = " ".join(("there is a red circle and a blue square in the image .".split() * 3)[:31])  # + EOS: 32 tokens
TARGETS = {"wall_s_max": 600.0, "ca_over_plain_max": 2.1, "train_time": 0.75, "train_memory": 0.6}
DEFAULTS = {"7b": dict(batch_sizes=[1, 8], reps=3, train_batch=4, accum=4),  # the issue's: B 1 and 8, 16 lines
            "small": dict(batch_sizes=[1, 4], reps=1, train_batch=1, accum=2)}  # a CPU: the code path, fast


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=tuple(SIZES), default=None,
                   help="7b: LLaVA-1.5-7B's sizes; small: 4 x 256 text, 2 x 128 vision (default: 7b on CUDA, else "
                        "small)")
    p.add_argument("--parts", nargs="+", choices=("attention", "decode", "train"),
                   default=["attention", "decode", "train"],
                   help="parts to run, always in the order attention, decode, train (train adds LoRA to the model)")
    p.add_argument("--attn-batch", type=int, default=1, help="instances in 01's forward (issue: one)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="decoding: instances per batch (B) (default: 1 8 for 7b, 1 4 for small)")
    p.add_argument("--new-tokens", type=int, default=32, help="decoding: tokens per row, EOS ignored")
    p.add_argument("--reps", type=int, default=None,
                   help="decoding: timed runs per mode, interleaved, median kept (default: 3 for 7b, 1 for small)")
    p.add_argument("--lambda-ca", type=float, default=0.1, help="contrastive amplification weight (02's default)")
    p.add_argument("--train-batch", type=int, default=None,
                   help="training: lines per micro-step, 04's --batch-size (default: 4 for 7b, 1 for small)")
    p.add_argument("--accum", type=int, default=None, help="training: micro-steps per optimizer step (default: 4 "
                   "for 7b: 4 x 4 = the paper's effective batch 16; 2 for small)")
    p.add_argument("--lora-rank", type=int, default=32, help="training: LoRA r (authors: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights, images and LoRA init")
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="cuda or cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.size = args.size or ("7b" if args.device.startswith("cuda") else "small")
    for k, v in DEFAULTS[args.size].items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    return args


def build_model(size, device, seed):
    """(model, processor): a random LLaVA-1.5-shaped model of `size`, made on `device` in the dtype the stages use
    there, sdpa attention; the tests' word-level processor at 336 px, 14 px patches (576 image tokens)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_llava  # the tests' processor; its 0.1M-parameter model is thrown away
    hf_logging.disable_progress_bar()  # (saving the tiny model draws one)
    with tempfile.TemporaryDirectory() as tmp:
        processor = AutoProcessor.from_pretrained(make_tiny_llava(Path(tmp) / "p", image_size=IMAGE, patch_size=PATCH))
    hf_logging.enable_progress_bar()
    processor.tokenizer.padding_side = "left"
    tok, s = processor.tokenizer, SIZES[size]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=s["vision_hidden"], intermediate_size=s["vision_intermediate"],
                                       num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_heads"],
                                       image_size=IMAGE, patch_size=PATCH, projection_dim=768, hidden_act="quick_gelu"),
        text_config=LlamaConfig(vocab_size=VOCAB, hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                                num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                num_key_value_heads=s["heads"], max_position_embeddings=4096, rms_norm_eps=1e-5,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id),
        image_token_id=tok.convert_tokens_to_ids(processor.image_token), vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", pad_token_id=tok.pad_token_id)
    assert len(tok) <= VOCAB, f"{len(tok)} token ids for an embedding of {VOCAB}"
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32  # as the stages' load_model
    torch.manual_seed(seed)
    with torch.device(device):  # weights made where they live: a 7B model is never on the CPU
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.update(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                   bos_token_id=tok.bos_token_id)
    return model.eval().requires_grad_(False), processor


def images(n, seed):
    """n random 336 x 336 RGB images (the processor's input size: no resize)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8)) for _ in range(n)]


def part_attention(s01, model, processor, args, meter):
    """01 on one batch of (I, P, y): the hooked forward (paper's map, authors' grad_att) vs output_attentions=True."""
    model.set_attn_implementation("eager")  # 01 loads the model so: eager attention returns the weights
    B, n_layers = args.attn_batch, len(s01.decoder_layers(model))
    layers, imgs = [n_layers // 2], images(B, args.seed)  # 01's default layer
    prompts, answers = [PROMPT] * B, [ANSWER] * B
    inputs, _ = s01.build_batch(processor, prompts, answers, [[im] for im in imgs])  # (B, T): what 01 feeds
    B, T = inputs["input_ids"].shape
    H, nbytes = model.config.text_config.num_attention_heads, torch.finfo(model.dtype).bits // 8
    out = {"tokens": T, "layer": layers[0]}
    for method in ("attention", "grad_att"):
        s01.attention_maps(model, processor, prompts, answers, imgs, layers, method)  # warm-up
        with meter.part() as m:
            maps, _ = s01.attention_maps(model, processor, prompts, answers, imgs, layers, method)
        assert maps[0].shape == (IMAGE // PATCH,) * 2 and abs(maps[0].sum() - 1) < 1e-6, (maps[0].shape, maps[0].sum())
        out[method] = m
    p = next(model.parameters())
    inputs = {k: v.to(p.device, p.dtype) if v.is_floating_point() else v.to(p.device) for k, v in inputs.items()}
    with meter.part() as m, torch.no_grad():
        att = model(**inputs, use_cache=False, logits_to_keep=1, output_attentions=True).attentions
        m["kept_mb"] = sum(a.numel() * a.element_size() for a in att) / 2**20  # L x (B, H, T, T)
        del att
    out["output_attentions"] = m
    out["stack_mb"] = n_layers * B * H * T * T * nbytes / 2**20  # the formula: every layer's weights kept
    out["one_layer_mb"] = B * H * T * T * nbytes / 2**20  # what the hook holds at a time (then reduces to (B, T))
    model.set_attn_implementation("sdpa")
    return out


def part_decode(s02, model, processor, args, meter):
    """02's decode loop at each batch size: plain greedy vs contrastive amplification, interleaved reps."""
    eos, out = s02.eos_token_ids(model, processor), {}
    for B in args.batch_sizes:
        imgs = images(B, args.seed + B)
        noisy = [s02.add_noise(im, 0.2, args.seed, i) for i, im in enumerate(imgs)]  # I_noise, 02's sigma
        texts = [s02.chat_prompt(processor, PROMPT)] * B
        modes = {"plain": (processor(text=texts, images=imgs, padding=True, return_tensors="pt"), None),
                 "ca": (processor(text=texts * 2, images=imgs + noisy, padding=True, return_tensors="pt"),
                        args.lambda_ca)}  # (2B, T): experts then amateurs
        runs = {mode: [] for mode in modes}
        for rep in range(args.reps + 1):  # rep 0 warms up
            for mode, (inputs, lambda_ca) in modes.items():
                with meter.part() as m:
                    new = s02.decode(model, dict(inputs), [torch.Generator() for _ in range(B)], eos, args.new_tokens,
                                     temperature=0, lambda_ca=lambda_ca, stop_at_eos=False)
                assert all(len(r) <= args.new_tokens for r in new), [len(r) for r in new]
                runs[mode] += [m] if rep else []
        r = {}
        for mode, ms in runs.items():
            s = statistics.median(m["s"] for m in ms)
            r[mode] = {"s": s, "tok_per_s": B * args.new_tokens / s, "peak_gb": max(m["peak_gb"] for m in ms),
                       "extra_mb": max(m["extra_mb"] for m in ms)}
        r["ca_over_plain"] = r["ca"]["s"] / r["plain"]["s"]
        out[f"B{B}"] = r
    return out


def part_train(s04, model, processor, args, meter, folder):
    """One optimizer step of 04 on --train-batch x --accum lines, after a one-micro-step warm-up (which also makes
    AdamW's state, so the timed step's peak is a steady-state step's): first with 03's precomputed reference
    log-probs ("precomputed", what 04 does), then ("live_ref", TRL's default) with a second copy of the model in
    memory as the reference, whose no-grad forwards score the same six terms before every micro-step."""
    targs = s04.parse_args(["--lora-rank", str(args.lora_rank), "--grad-checkpointing", "--seed", str(args.seed),
                          "--lr", "1e-5"])  # the paper's lr: main() resolves a None default, not this
    n = args.train_batch * args.accum
    exs = make_examples(folder, n, IMAGE, args.seed)  # six terms per line; 12-20 word responses
    torch.manual_seed(args.seed)
    model = s04.prepare(model, targs, 1, torch.device(args.device))  # LoRA on the language model, checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=targs.lr, weight_decay=targs.weight_decay)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if args.device.startswith("cuda") else contextlib.nullcontext()

    def step(lines, ref=None):
        for i in range(0, len(lines), args.train_batch):  # micro-steps, gradients accumulated
            mb = lines[i:i + args.train_batch]
            batches = s04.term_batches(processor, mb)  # images and processor: once, whatever the variant
            if ref is not None:  # a live reference: its forwards on every term of the micro-batch
                with torch.no_grad():
                    logps = s04.policy_logps(ref, batches, len(mb), ctx)
                for j, ex in enumerate(mb):
                    ex["ref"] = {k: float(v[j]) for k, v in logps.items()}
            losses, _ = s04.micro_step(model, processor, [(ex, 1.0) for ex in mb], targs, ctx, 1 / len(lines),
                                       batches)
        torch.nn.utils.clip_grad_norm_(params, targs.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(losses.detach().mean())
    out, info = {}, dict(lines=n, micro_batch=args.train_batch, accum=args.accum, lora_rank=args.lora_rank,
                         trainable_m=sum(p.numel() for p in params) / 1e6)
    for variant in ("precomputed", "live_ref"):
        ref = build_model(args.size, args.device, args.seed + 1)[0] if variant == "live_ref" else None
        step(exs[:args.train_batch], ref)  # warm-up
        with meter.part() as m:
            m["loss"] = step(exs, ref)
        out[variant] = dict(m, **info, examples_per_s=n / m["s"])
        del ref
    out["ratio"] = {"time": out["precomputed"]["s"] / out["live_ref"]["s"],
                    "memory": out["precomputed"]["peak_gb"] / out["live_ref"]["peak_gb"]}
    return out


# ---- plumbing: time and peak memory of a part ----
class Meter:
    """meter.part() yields a dict filled, on exit, with "s" (wall time, synchronised), "peak_gb" (the device's
    peak: CUDA's max allocated, a CPU's peak resident set) and "extra_mb" (that peak less what was live at entry)."""
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def live(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / 2**20
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed pages back, so the baseline is what is live
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
        except OSError:
            return float("nan")  # not Linux: no resettable peak
        return status_mb("VmRSS")

    def peak(self):
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return status_mb("VmHWM") if Path("/proc/self/status").is_file() else float("nan")

    @contextlib.contextmanager
    def part(self):
        m, base = {}, self.live()
        t0 = time.perf_counter()
        yield m
        peak = self.peak()
        m.update(s=time.perf_counter() - t0, peak_gb=peak / 1024, extra_mb=peak - base)


def status_mb(field):
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def print_table(res):
    print(f"LLaVA-1.5 {res['size']} shape, {res['params_b']:.3f}B parameters ({res['dtype']}, random) on "
          f"{res['card']}; built in {res['build_s']:.1f} s; weights {res['weights_gb']:.2f} GiB; torch "
          f"{res['versions']['torch']}, transformers {res['versions']['transformers']}")
    print(f"{'part':<44} {'time s':>8} {'throughput':>16} {'peak GiB':>9} {'extra MiB':>10}")

    def row(name, m, throughput=""):
        print(f"{name:<44} {m['s']:8.3f} {throughput:>16} {m['peak_gb']:9.2f} {m['extra_mb']:10.0f}")
    if "attention" in res:
        a = res["attention"]
        row(f"01 attention, hook on layer {a['layer']}, T {a['tokens']}", a["attention"])
        row("01 grad_att, hook on the same layer", a["grad_att"])
        row("01 forward, output_attentions=True", a["output_attentions"])
        print(f"   attention weights kept: one layer {a['one_layer_mb']:.0f} MiB at a time (hook) vs every layer "
              f"{a['output_attentions']['kept_mb']:.0f} MiB (output_attentions; L x B x H x T^2 x bytes = "
              f"{a['stack_mb']:.0f} MiB)")
    for key, r in res.get("decode", {}).items():
        for mode in ("plain", "ca"):
            row(f"02 decode {mode}, {key}, {res['new_tokens']} new tokens", r[mode],
                f"{r[mode]['tok_per_s']:.1f} tok/s")
        print(f"   contrastive / plain time: {r['ca_over_plain']:.2f}")
    if "train" in res:
        for variant, t in ((v, res["train"][v]) for v in ("precomputed", "live_ref")):
            row(f"04 step, {t['lines']} lines ({t['micro_batch']} x {t['accum']}), {variant}", t,
                f"{t['examples_per_s']:.2f} ex/s")
        r = res["train"]["ratio"]
        print(f"   LoRA r {t['lora_rank']}, gradient checkpointing; precomputed / live reference: step time "
              f"{r['time']:.2f}, peak memory {r['memory']:.2f}")
    print(f"total wall time {res['wall_s']:.1f} s")


def main():
    args = parse_args()
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    meter = Meter(args.device)
    card = torch.cuda.get_device_name(torch.device(args.device)) if meter.cuda else "cpu"
    with meter.part() as m:
        model, processor = build_model(args.size, args.device, args.seed)
    res = {"size": args.size, "card": card, "dtype": str(model.dtype).replace("torch.", ""),
           "params_b": sum(p.numel() for p in model.parameters()) / 1e9, "build_s": m["s"],
           "weights_gb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
           "new_tokens": args.new_tokens, "versions": {"torch": torch.__version__,
                                                      "transformers": transformers.__version__}}

    def save(part):  # each part's numbers as soon as they exist: a crash or a kill later loses nothing
        print(f"{part} done at {time.perf_counter() - t_start:.0f} s", flush=True)
        res["wall_s"] = time.perf_counter() - t_start
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(res, indent=1))
    save("build")
    if "attention" in args.parts:
        res["attention"] = part_attention(load_stage("01_attention_crop.py"), model, processor, args, meter)
        save("attention")
    if "decode" in args.parts:
        res["decode"] = part_decode(load_stage("02_make_pairs.py"), model, processor, args, meter)
        save("decode")
    if "train" in args.parts:  # last: it adds LoRA to the model
        with tempfile.TemporaryDirectory() as tmp:
            res["train"] = part_train(load_stage("04_train_calibrated_dpo.py"), model, processor, args, meter,
                                      Path(tmp))
        save("train")
    print_table(res)
    missed = []
    if args.size == "7b":
        missed += [f"wall time {res['wall_s']:.0f} s"] if res["wall_s"] > TARGETS["wall_s_max"] else []
        missed += [f"{k}: contrastive / plain {r['ca_over_plain']:.2f}" for k, r in res.get("decode", {}).items()
                   if r["ca_over_plain"] > TARGETS["ca_over_plain_max"]]
        ratio = res["train"]["ratio"] if "train" in res else {}
        missed += [f"train {k}: precomputed / live {ratio[k]:.2f}" for k in ("time", "memory")
                   if k in ratio and ratio[k] > TARGETS[f"train_{k}"]]
    print(f"targets (7b only): wall time <= {TARGETS['wall_s_max']:.0f} s, contrastive / plain <= "
          f"{TARGETS['ca_over_plain_max']}, training step precomputed / live reference: time <= "
          f"{TARGETS['train_time']}, memory <= {TARGETS['train_memory']}: " +
          ("not judged (small config)" if args.size != "7b" else "MISSED: " + "; ".join(missed) if missed else "met"))
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()

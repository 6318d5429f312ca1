"""Low-bit inference, side by side: quality (logits SQNR vs fp32, the bundled demo's four accuracies,
perplexity of a text model this project trains) and speed (batch-1 greedy decode at the 155M shape
against omnilm bf16 and transformers bf16 on the same weights), with weight bytes and peak RSS.

    python benchmarks/bench_quant.py                      # CPU, every section
    python benchmarks/bench_quant.py --sections speed --tokens 32
    python benchmarks/bench_quant.py --device cuda        # fp8 via torch._scaled_mm, int4 via tinygemm

Speed rows load the directory `omnilm quantize` wrote (bf16 scales; embeddings/head 16-bit unless the
row says +head), generating --tokens new tokens greedily after an 8-token prompt; decode tok/s =
(N - 1) / (time(N new) - time(1 new)). Peak RSS comes from one fresh process per row; tok/s from one
process holding every row, timed in --rounds interleaved rounds (medians, min-max; ratios within a
round). transformers runs LlamaForCausalLM.generate in bf16 on the same saved weights. w8a8: int8
weights with dynamic per-token int8 activations through fbgemm's dynamic linear (torch._int_mm where
fbgemm is not the quantized engine).
fp8/nvfp4/mxfp4 on CPU dequantize every weight on every step (emulated), so their speed rows only show
what emulation costs; FP4 tensor cores need Blackwell.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import omnilm
from omnilm.config import DecoderConfig, ModelConfig
from omnilm.quant import SCHEMES, quant_modules, quantize_model
from omnilm.quant.io import save_quantized, tensor_bytes

SHAPE_155M = dict(
    vocab_size=32000, hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=4, intermediate_size=2816
)


def config_155m() -> ModelConfig:
    return ModelConfig(decoder=DecoderConfig(**SHAPE_155M, max_seq_len=2048, tie_embeddings=False))


def sqnr(ref, x) -> float:
    return float(10 * torch.log10(ref.float().pow(2).sum() / (ref.float() - x.float()).pow(2).sum()))


def group_for(name, width_gcd):
    if name != "int4":
        return None
    return next(g for g in (128, 64, 32) if width_gcd % g == 0)


# ---- quality ------------------------------------------------------------------------------------------


def section_sqnr(args) -> list[tuple]:
    model = omnilm.build(config_155m(), seed=0)
    with torch.no_grad():  # away from init so the logits are not near-uniform
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.01))
    ids = torch.randint(0, 32000, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        bf16 = model.to(torch.bfloat16)(input_ids=ids).logits
        model.float()
    dense = {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    rows = [("bf16 (no quantization)", "", f"{sqnr(ref, bf16):.1f}")]
    extra = {"int8+head": ("int8", dict(head=True)), "int4+head": ("int4", dict(head=True))}
    extra["w8a8"] = ("int8", dict(activations="int8"))
    for label, (name, kw) in {**{n: (n, {}) for n in SCHEMES}, **extra}.items():
        q = copy.deepcopy(model)
        quantize_model(q, name, group_for(name, 1024), **kw)
        mods = quant_modules(q)
        w = torch.cat([dense[n].flatten() for n in mods])
        w_hat = torch.cat([m.dequantize().flatten() for m in mods.values()])
        with torch.no_grad():
            logits = q(input_ids=ids).logits
        label = label.replace("int4", "int4 (g128)")
        rows.append((label, f"{sqnr(w, w_hat):.1f}", f"{sqnr(ref, logits):.1f}"))
        del q
    return rows


def section_demo(args) -> list[tuple]:
    import numpy as np

    from omnilm.demo import eval as ev
    from omnilm.demo.data import TaskBuilder, load_digits, render_digit, shift_images
    from omnilm.demo.train import code_offset

    processor = omnilm.load_processor("demo")
    ref = omnilm.load("demo")
    cfg = ref.config
    builder = TaskBuilder(processor, code_offset(cfg), image_size=cfg.vision.image_size)
    train_x, train_y, test_x, test_y = load_digits(0)
    render = processor.image_processor
    train_pix = render([render_digit(x, cfg.vision.image_size) for x in train_x])
    gen = torch.Generator().manual_seed(0)
    aug = torch.cat([train_pix] + [shift_images(train_pix, gen) for _ in range(2)])
    judge = ev.train_judge(aug, np.concatenate([train_y] * 3), 0)
    codec = omnilm.load_codec(omnilm.BUNDLED_MODELS["demo"] / "image_tokenizer")
    rng = np.random.default_rng(1000)  # the demo's own held-out draw (run_demo uses seed + 1000)
    image_eval = builder.image_samples(test_x, test_y, rng, prompt=0)
    audio_eval = builder.audio_samples(args.demo_n, rng, prompt=0)
    pdf_idx = rng.integers(0, len(test_x), args.demo_n)
    pdf_eval = builder.pdf_samples(test_x[pdf_idx], test_y[pdf_idx], rng)
    digits = np.repeat(np.arange(10), args.demo_n // 20)  # 400 -> 200 draws, as `omnilm demo` does
    tok = processor.tokenizer
    rows = []
    for name in ("fp32", "bf16", *SCHEMES):
        model = omnilm.load("demo", dtype="bfloat16" if name == "bf16" else None)
        if name in SCHEMES:
            quantize_model(model, name, 32 if name == "int4" else None)
        accs = [
            ev.answer_accuracy(model, image_eval, tok, max_new_tokens=3)[0],
            ev.answer_accuracy(model, audio_eval, tok, max_new_tokens=7)[0],
            ev.answer_accuracy(model, pdf_eval, tok, max_new_tokens=6)[0],
        ]
        codes = ev.draw_digits(model, [builder.draw_prompt(int(d)) for d in digits], seed=0)
        drawn = codec.decode(codes)
        accs.append(float((judge.predict(ev.pixels_to_ink(drawn.float())) == digits).mean()))
        rows.append((name + (" (g32)" if name == "int4" else ""), *[f"{100 * a:.1f}" for a in accs]))
    return rows


def section_perplexity(args, work: Path) -> list[tuple]:
    """Train the tiny preset on the Python standard library's source (offline, real text), then the
    strided perplexity of held-out modules under each scheme."""
    import os

    from omnilm.eval import strided_perplexity
    from omnilm.tokenizers.text import TextTokenizer
    from omnilm.training.config import train_config_from_dict
    from omnilm.training.loop import train

    stdlib = Path(os.__file__).parent
    files = sorted(p for p in stdlib.glob("*.py"))
    held_out = [p for p in files if p.name in ("textwrap.py", "fractions.py")]
    train_files = [p for p in files if p not in held_out][:60]
    data = work / "stdlib.jsonl"
    with open(data, "w") as f:
        for p in train_files:
            text = p.read_text(errors="replace")
            for i in range(0, len(text), 2000):
                f.write(json.dumps({"text": text[i : i + 2000]}) + "\n")
    cfg = train_config_from_dict(
        {
            "model": "tiny",
            "data": {"path": str(data), "seq_len": 128},
            "steps": args.train_steps,
            "batch_size": 8,
            "optim": {"lr": 3e-3, "warmup_steps": 10},
            "save_every": args.train_steps,
        }
    )
    t = time.time()
    history = train(cfg, work / "run", progress=False)
    print(
        f"  trained tiny on stdlib source: loss {history[0]['loss']:.2f} -> {history[-1]['loss']:.2f} "
        f"in {time.time() - t:.0f} s",
        file=sys.stderr,
    )
    ckpt = sorted((work / "run" / "checkpoints").iterdir())[-1] / "model"
    tok = TextTokenizer.default()
    ids = tok.encode("".join(p.read_text() for p in held_out), add_bos=True)[: args.ppl_tokens]
    rows = []
    for name in ("fp32", *SCHEMES):
        model = omnilm.load(ckpt)
        if name in SCHEMES:
            quantize_model(model, name, 32 if name == "int4" else None)
        r = strided_perplexity(model, ids, context=128, stride=64)
        rows.append((name + (" (g32)" if name == "int4" else ""), f"{r['perplexity']:.3f}", r["tokens"]))
    return rows


# ---- speed ----------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss would carry the parent's peak across fork + exec on Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load(kind, path, device):
    """(model, gen(n)): greedy generation of exactly n new tokens after the fixed 8-token prompt."""
    ids = torch.randint(100, 32000, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
    if kind == "transformers":
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
        return model, lambda n: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    model = omnilm.load(path, device=str(device), dtype="bfloat16")
    return model, lambda n: model.generate(ids, max_new_tokens=n)


def _timed(gen, n, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        gen(n)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _decode_tok_s(gen, n, device):
    return (n - 1) / (_timed(gen, n, device) - _timed(gen, 1, device))


def worker(args):
    """One row in its own process, for its peak RSS (and the matmul paths that ran): load, generate."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, gen = _load(args.worker, args.dir, device)
    _timed(gen, 4, device)
    paths = sorted({m.path for m in quant_modules(model).values()}) if args.worker != "transformers" else []
    print(json.dumps({"rss_mb": peak_rss_mb(), "paths": paths}))


def interleaved(args):
    """Every row loaded in this one process; each round times every row once, back to back (the order
    rotates), so each ratio compares rows measured seconds apart under the same load."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = json.loads(args.dir)
    gens = {}
    for label, path in rows.items():
        gens[label] = _load("transformers" if label.startswith("transformers") else "omnilm", path, device)[1]
        _timed(gens[label], 4, device)
    labels = list(rows)
    out = {k: [] for k in labels}
    for rnd in range(args.rounds):
        for label in labels[rnd % len(labels) :] + labels[: rnd % len(labels)]:
            out[label].append(_decode_tok_s(gens[label], args.tokens, device))
        print("  round " + str(rnd + 1) + ": " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in out.items()),
              file=sys.stderr, flush=True)  # fmt: skip
    print(json.dumps(out))


SPEED_SPECS = {  # label suffix -> quantize_model arguments (group size chosen for the 1024 width)
    "int8": dict(scheme="int8"),
    "int4": dict(scheme="int4"),
    "int8+head": dict(scheme="int8", head=True),
    "int4+head": dict(scheme="int4", head=True),
    "w8a8": dict(scheme="int8", activations="int8"),
    "w8a8+head": dict(scheme="int8", activations="int8", head=True),
    "fp8": dict(scheme="fp8"),
    "nvfp4": dict(scheme="nvfp4"),
    "mxfp4": dict(scheme="mxfp4"),
}


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _spread(xs, fmt):
    return f"{fmt.format(_median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def section_speed(args, work: Path) -> list[tuple]:
    """Peak RSS from one process per row; speed from one process holding every row, timed in --rounds
    interleaved rounds (`interleaved`); ratios are taken within a round, reported as median (min-max)."""
    model = omnilm.build(config_155m(), seed=0)
    model.to(torch.bfloat16).save_pretrained(work / "bf16")
    dirs = {"transformers bf16": work / "bf16", "omnilm bf16": work / "bf16"}
    sizes = {k: tensor_bytes(work / "bf16" / "model.safetensors") for k in dirs}
    for spec in args.speed_schemes:
        kw = dict(SPEED_SPECS[spec])
        name = kw.pop("scheme")
        q = omnilm.load(work / "bf16")
        quantize_model(q, name, group_for(name, 1024), **kw)
        tensors, _ = save_quantized(q, work / spec)
        dirs[f"omnilm {spec}"], sizes[f"omnilm {spec}"] = work / spec, tensors
        del q
    labels = list(dirs)
    info = {}
    for label in labels:  # peak RSS: one process per row
        kind = "transformers" if label.startswith("transformers") else "omnilm"
        cmd = [sys.executable, __file__, "--worker", kind, "--dir", str(dirs[label])]
        cmd += ["--threads", str(args.threads), "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{label}: " + out.stderr.strip().splitlines()[-1])
        info[label] = json.loads(out.stdout.strip().splitlines()[-1])
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "interleave",
        "--dir",
        json.dumps({k: str(v) for k, v in dirs.items()}),
    ]
    cmd += ["--tokens", str(args.tokens), "--threads", str(args.threads), "--device", args.device]
    cmd += ["--rounds", str(args.rounds)]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # rounds print to our stderr
    if out.returncode != 0:
        raise SystemExit("interleaved timing failed")
    tok = json.loads(out.stdout.strip().splitlines()[-1])
    rows = []
    for label in labels:
        vs_base = [t / b for t, b in zip(tok[label], tok["omnilm bf16"])]
        vs_hf = [t / h for t, h in zip(tok[label], tok["transformers bf16"])]
        rows.append(
            (
                label,
                _spread(tok[label], "{:.1f}"),
                _spread(vs_base, "{:.2f}x") if label != "transformers bf16" else "",
                _spread(vs_hf, "{:.2f}x") if label != "transformers bf16" else "",
                f"{sizes[label] / 1e6:.0f}",
                f"{info[label]['rss_mb']:.0f}",
                ", ".join(info[label]["paths"]),
            )
        )
    return rows


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sections", default="sqnr,demo,perplexity,speed")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per timed generation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--speed-schemes",
        default="int8,int4,int8+head,int4+head,w8a8,w8a8+head",
        help=f"comma list of {', '.join(SPEED_SPECS)} (+head: the output head too; w8a8: int8 dynamic "
        "activations); fp8/nvfp4/mxfp4 are emulated on CPU",
    )
    ap.add_argument("--rounds", type=int, default=7, help="interleaved speed rounds (medians reported)")
    ap.add_argument(
        "--demo-n", type=int, default=200, help="audio and PDF eval samples (draws: n/20 per digit)"
    )
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "interleave":
        return interleaved(args)
    if args.worker:
        return worker(args)
    torch.set_num_threads(args.threads)
    args.speed_schemes = [s for s in args.speed_schemes.split(",") if s]
    if args.device.startswith("cuda"):
        args.speed_schemes += [s for s in ("fp8", "int4") if s not in args.speed_schemes]
    sections = args.sections.split(",")
    print(f"torch {torch.__version__}, {args.device}, {args.threads} thread(s)\n")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "sqnr" in sections:
            print("## logits SQNR vs fp32, Llama 155M shape, 64 tokens (dB, higher is better)\n")
            print(
                table(["scheme", "weights SQNR dB", "logits SQNR dB"], section_sqnr(args)), "\n", flush=True
            )
        if "demo" in sections:
            print("## bundled demo accuracies under each scheme (%)\n")
            header = ["weights", "image->text", "audio->text", "PDF QA", "text->image"]
            print(table(header, section_demo(args)), "\n", flush=True)
        if "perplexity" in sections:
            print("## perplexity of `tiny` trained on the Python stdlib source, held-out modules\n")
            print(
                table(["weights", "perplexity", "tokens"], section_perplexity(args, work)), "\n", flush=True
            )
        if "speed" in sections:
            print(f"## batch-1 greedy decode, 155M shape, {args.tokens} new tokens, {args.device}\n")
            header = [
                "model",
                "decode tok/s",
                "vs omnilm bf16",
                "vs transformers bf16",
                "weights MB",
                "peak RSS MB",
                "matmul path",
            ]
            print(table(header, section_speed(args, work)), flush=True)


if __name__ == "__main__":
    main()

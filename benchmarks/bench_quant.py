"""Low-bit inference, side by side: quality (logits SQNR vs fp32, the bundled demo's four accuracies,
perplexity of a text model this project trains) and speed (batch-1 greedy decode at the 155M shape
against omnilm bf16 and transformers bf16 on the same weights), with weight bytes and peak RSS.

    python benchmarks/bench_quant.py                      # CPU, every section
    python benchmarks/bench_quant.py --sections speed --tokens 32
    python benchmarks/bench_quant.py --device cuda        # fp8 via torch._scaled_mm, int4 via tinygemm

Speed rows run one fresh process each (so peak RSS is that row's alone), loading the directory
`omnilm quantize` wrote (bf16 scales and 16-bit embeddings/head) with mmap, generating --tokens new
tokens greedily after an 8-token prompt; decode tok/s = (N - 1) / (time(N new) - time(1 new)), best of
--repeats. transformers runs LlamaForCausalLM.generate in bf16 on the same saved weights.
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
    for name in SCHEMES:
        q = copy.deepcopy(model)
        quantize_model(q, name, group_for(name, 1024))
        mods = quant_modules(q)
        w = torch.cat([dense[n].flatten() for n in mods])
        w_hat = torch.cat([m.dequantize().flatten() for m in mods.values()])
        with torch.no_grad():
            logits = q(input_ids=ids).logits
        label = name + (" (g128)" if name == "int4" else "")
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


def worker(args):
    """One speed row in its own process: load, warm up, time; prints one JSON line."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ids = torch.randint(100, 32000, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
    if args.worker == "transformers":
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(args.dir, dtype=torch.bfloat16).to(device).eval()

        def gen(n):
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    else:
        model = omnilm.load(args.dir, device=args.device, dtype="bfloat16")

        def gen(n):
            return model.generate(ids, max_new_tokens=n)

    def timed(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            gen(n)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(4)
    one = min(timed(1) for _ in range(args.repeats))
    full = min(timed(args.tokens) for _ in range(args.repeats))
    paths = sorted({m.path for m in quant_modules(model).values()}) if args.worker != "transformers" else []
    print(
        json.dumps(
            {
                "tok_s": (args.tokens - 1) / (full - one),
                "rss_mb": peak_rss_mb(),
                "paths": paths,
            }
        )
    )


def section_speed(args, work: Path) -> list[tuple]:
    model = omnilm.build(config_155m(), seed=0)
    model.to(torch.bfloat16).save_pretrained(work / "bf16")
    dirs = {"transformers bf16": work / "bf16", "omnilm bf16": work / "bf16"}
    sizes = {k: tensor_bytes(work / "bf16" / "model.safetensors") for k in dirs}
    for name in args.speed_schemes:
        q = omnilm.load(work / "bf16")
        quantize_model(q, name, group_for(name, 1024))
        tensors, _ = save_quantized(q, work / name)
        dirs[f"omnilm {name}"], sizes[f"omnilm {name}"] = work / name, tensors
        del q
    rows, base, hf = [], None, None
    for label, d in dirs.items():
        kind = "transformers" if label.startswith("transformers") else "omnilm"
        cmd = [sys.executable, __file__, "--worker", kind, "--dir", str(d), "--tokens", str(args.tokens)]
        cmd += ["--threads", str(args.threads), "--device", args.device, "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            rows.append((label, "failed: " + out.stderr.strip().splitlines()[-1], "", "", "", ""))
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if label == "omnilm bf16":
            base = r["tok_s"]
        if kind == "transformers":
            hf = r["tok_s"]
        rows.append(
            (
                label,
                f"{r['tok_s']:.1f}",
                f"{r['tok_s'] / base:.2f}x" if base else "",
                f"{r['tok_s'] / hf:.2f}x" if hf else "",
                f"{sizes[label] / 1e6:.0f}",
                f"{r['rss_mb']:.0f}",
                ", ".join(r["paths"]),
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
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--speed-schemes", default="int8,int4", help="comma list; fp8/nvfp4/mxfp4 are emulated on CPU"
    )
    ap.add_argument(
        "--demo-n", type=int, default=200, help="audio and PDF eval samples (draws: n/20 per digit)"
    )
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    torch.set_num_threads(args.threads)
    args.speed_schemes = [s for s in args.speed_schemes.split(",") if s]
    if args.device.startswith("cuda"):
        args.speed_schemes = sorted(set(args.speed_schemes) | {"fp8", "int4"}, key=SCHEMES.index)
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

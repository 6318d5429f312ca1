"""Image generation speed of a unified (discrete early-fusion) model: seconds per image with guidance.

    python benchmarks/bench_image_gen.py                          # CUDA: 1B-scale, 32x32 codes, bf16, batch 1 and 8
    python benchmarks/bench_image_gen.py --small --device cpu     # CPU: a small model, 16x16 codes, fp32

The model is `unified-8b`'s layout (pre-LayerNorm, GELU FFN, RoPE; text 50,261 ids + 16,384 image
codes + 1,024 audio codes, each with its own table and head) scaled to ~1B parameters, with random
weights. A prompt of 16 text tokens ending in <|image_start|> is completed by exactly one image span
(grid^2 codes) sampled at temperature 1 with classifier-free guidance (scale 3): the conditional
and unconditional rows run as one batch of 2 x batch rows.

Peers in the same run: the same generation without guidance (batch rows only), and OmniLM's text
engine (omnilm/generation/engine.py) on a text-only model of the same decoder shape generating the
same number of tokens at 2 x batch rows, i.e. what the guided image costs if the span controller,
the per-modality tables/heads and the guidance added nothing. Every number is the best of --repeats
runs after a warm-up run (which compiles the decode step on CUDA).
"""

from __future__ import annotations

import argparse
import time

import torch

import omnilm
from omnilm.config import DecoderConfig, DiscreteConfig, ModelConfig
from omnilm.generation import generate as engine
from omnilm.generation.generate import generate_image

TEXT_VOCAB = 50261  # unified-8b: GPT-2's 50257 + four span markers


def unified_config(hidden, layers, heads, ffn, grid, max_seq_len) -> ModelConfig:
    discrete = DiscreteConfig(
        text_vocab_size=TEXT_VOCAB, image_vocab_size=16384, image_grid=grid, audio_vocab_size=1024,
        audio_codebooks=4, audio_frames=375, image_start_id=50257, image_end_id=50258,
        audio_start_id=50259, audio_end_id=50260,
    )  # fmt: skip
    decoder = DecoderConfig(
        vocab_size=TEXT_VOCAB, hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=ffn,
        max_seq_len=max_seq_len, norm="layernorm", mlp="gelu", rope_theta=10000.0, tie_embeddings=False,
    )  # fmt: skip
    return ModelConfig(
        decoder=decoder, discrete=discrete, source="bench_image_gen (unified-8b layout, scaled down)"
    )


def timed(fn, device, repeats):
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="a small model and a 16x16 grid (CPU)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8; --small 1,2)")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--compile", choices=("auto", "on", "off"), default="auto", help="compile the decode step"
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.small:
        cfg = unified_config(hidden=256, layers=4, heads=4, ffn=1024, grid=16, max_seq_len=1024)
        dtype, batches = torch.float32, [1, 2]
    else:
        # unified-8b is 4096 x 36 with 32 heads; 2048 x 16 with 16 heads of 128 gives ~1.1B parameters
        cfg = unified_config(hidden=2048, layers=16, heads=16, ffn=8192, grid=32, max_seq_len=2048)
        dtype, batches = (torch.bfloat16 if device.type == "cuda" else torch.float32), [1, 8]
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
    compile = {"auto": None, "on": True, "off": False}[args.compile]
    model = omnilm.build(cfg, device=device, dtype=dtype, seed=0)
    text_model = omnilm.build(ModelConfig(decoder=cfg.decoder), device=device, dtype=dtype, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    d = cfg.discrete
    n_tok = d.tokens_per_image
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), {dtype}, "
          f"{n_params / 1e9:.2f}B params, image {d.image_grid}x{d.image_grid} = {n_tok} codes, "
          f"guidance {args.guidance}, best of {args.repeats}")  # fmt: skip

    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        prompt = torch.randint(3, 50000, (batch, 16), generator=g).to(device)

        def image(scale, prompt=prompt):
            codes = generate_image(
                model, prompt, guidance_scale=scale, temperature=1.0, seed=0, compile=compile
            )
            assert codes.shape == (prompt.shape[0], d.image_grid, d.image_grid)

        def text(prompt=prompt):
            ids = torch.cat([prompt, prompt])  # 2 x batch rows, as the guided batch
            engine.generate(text_model, ids, max_new_tokens=n_tok, temperature=1.0, seed=0, eos_token_id=[],
                            compile=compile)  # fmt: skip

        results = {}
        for name, fn in (
            ("guided", lambda: image(args.guidance)),
            ("unguided", lambda: image(None)),
            ("text", text),
        ):
            fn()  # warm-up (compiles / records CUDA graphs)
            results[name] = timed(fn, device, args.repeats)
        rows.append((batch, results))

    print()
    print(
        "| batch | tokens/image | guided s/image | guided image tok/s | unguided s/image | text engine, 2x rows, s/batch |"
    )
    print("|---|---|---|---|---|---|")
    for batch, r in rows:
        print(f"| {batch} | {n_tok} | {r['guided'] / batch:.3f} | {batch * n_tok / r['guided']:.0f} | "
              f"{r['unguided'] / batch:.3f} | {r['text']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()

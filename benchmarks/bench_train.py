"""Training throughput: OmniLM's decoder vs transformers' LlamaForCausalLM, same shape, same optimizer.

Both models get the same config (a preset, default llama-3.2-1b), random weights, the same random token
batch, bf16 autocast with fp32 master weights on CUDA (fp32 on CPU), and the same AdamW
(omnilm.training.optim.build_optimizer: betas 0.9/0.95, eps 1e-8, wd 0.1 off norms/embeddings).
A step is forward + cross-entropy + backward + clip(1.0) + optimizer step, timed after warmup.
MFU = tokens/s x training FLOPs per token (6N + attention, PaLM appendix B) / the GPU's dense bf16 peak.

    python benchmarks/bench_train.py                      # GPU: llama-3.2-1b, seq 2048
    python benchmarks/bench_train.py --small --device cpu # CPU: a small Llama shape
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
import torch.nn.functional as F

import omnilm
from omnilm.config import DecoderConfig, ModelConfig, get_preset
from omnilm.convert.hf import decoder_config_to_hf
from omnilm.training.config import OptimConfig
from omnilm.training.loop import apply_activation_checkpointing, apply_compile, flops_per_token, peak_flops
from omnilm.training.optim import build_optimizer

SMALL = ModelConfig(
    decoder=DecoderConfig(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2,
                          intermediate_size=768, rope_theta=500000.0, tie_embeddings=True),
    source="bench_train --small",
)  # fmt: skip


def build_pair(cfg: ModelConfig, which: str, device):
    if which == "omnilm":
        return omnilm.build(cfg, seed=0).to(device=device, dtype=torch.float32).train()
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = decoder_config_to_hf(cfg.decoder)
    hf.pop("architectures"), hf.pop("model_type"), hf.pop("torch_dtype")
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(**hf)
    hf_cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_cfg).to(device=device, dtype=torch.float32).train()


def run(which: str, cfg: ModelConfig, args, device) -> dict:
    model = build_pair(cfg, which, device)
    if which == "omnilm":
        if args.ac:
            apply_activation_checkpointing(model)
        if args.compile:
            apply_compile(model)
    elif args.ac:
        model.gradient_checkpointing_enable()
    opt = build_optimizer(model, OptimConfig(lr=1e-4))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.decoder.vocab_size, (args.batch, args.seq_len), generator=g).to(device)
    bf16 = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step():
        with autocast:
            logits = model(input_ids=ids).logits  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss = float(loss.detach())
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    tokens_per_s = args.batch * args.seq_len / dt
    fpt = flops_per_token(cfg.decoder, args.seq_len)
    peak = peak_flops(device)
    out = {"impl": which, "step_ms": dt * 1e3, "tokens_per_s": tokens_per_s, "loss": loss,
           "mfu": tokens_per_s * fpt / peak if peak else None,
           "mem_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None}  # fmt: skip
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-3.2-1b")
    p.add_argument("--small", action="store_true", help="a small Llama shape (CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--seq-len", type=int, default=None, help="default 2048 (256 with --small)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile OmniLM's blocks")
    p.add_argument("--ac", action="store_true", help="activation checkpointing in both models")
    p.add_argument("--only", choices=("omnilm", "transformers"), default=None)
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = SMALL if args.small else get_preset(args.preset)
    args.seq_len = args.seq_len or (256 if args.small else 2048)
    name = "small" if args.small else args.preset
    gpu = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(f"# bench_train: {name}, batch {args.batch} x seq {args.seq_len}, {gpu}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, AdamW, {args.steps} timed steps, torch {torch.__version__}")  # fmt: skip

    rows = []
    for which in ("omnilm", "transformers"):
        if args.only in (None, which):
            rows.append(run(which, cfg, args, device))
            gc.collect()  # the first model and its optimizer state go before the second is built
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print("| impl | step ms | tokens/s | MFU | peak mem GB | loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (CPU)"
        mem = f"{r['mem_gb']:.1f}" if r["mem_gb"] is not None else "-"
        print(
            f"| {r['impl']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {mfu} | {mem} | {r['loss']:.4f} |"
        )
    if len(rows) == 2:
        print(f"\nOmniLM / transformers tokens/s: {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()

"""Sizing a model exactly: parameters (built on the meta device), memory, KV cache, FLOPs, GPU-days.

Conventions, so the numbers can be checked by hand:
- Training FLOPs = 6 * N_matmul * tokens + attention, N_matmul = every parameter used in a matmul
  (all but the input embedding lookup; a tied head counts once, as the head) and attention
  12 * L * (heads * head_dim) * seq_len per token (PaLM's MFU convention: forward + backward, no
  causal halving).
- AdamW in mixed precision keeps fp32 master weights (4 B), fp32 gradients (4 B) and two fp32
  moments (8 B): 16 bytes per parameter, divided evenly across GPUs under FSDP (full sharding).
  Activations are not included (they depend on checkpointing and micro-batch).
- fp4 counts NVFP4: 4-bit values plus one fp8 scale per 16 values (0.5625 B per parameter).
"""

from __future__ import annotations

import math

from .config import ModelConfig, get_preset

H100_BF16_DENSE_FLOPS = 989e12  # H100 SXM dense bf16 peak, NVIDIA datasheet
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0, "fp4": 0.5 + 1 / 16}
DEFAULT_TRAIN_SEQ = 8192  # the 88B design's training sequence length; long-context presets train shorter
ADAMW_BYTES = {"weights": 4, "grads": 4, "adam_moments": 8}


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts by group, from a model built on the meta device."""
    from .convert.hf import init_empty_weights
    from .models.builder import model_class

    # parameters on the meta device, buffers real and init skipped: meta-device kernels import
    # torch._dynamo (seconds of start-up)
    with init_empty_weights():
        model = model_class(cfg)(cfg)
    groups = {
        "embeddings": 0,
        "attention": 0,
        "mlp": 0,
        "norms": 0,
        "head": 0,
        "encoders": 0,
        "discrete": 0,
        "other": 0,
    }
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        groups[_group(name)] += p.numel()
    groups["total"] = sum(groups.values())
    return groups


def _group(name: str) -> str:
    if name.startswith("discrete."):  # image/audio tables and heads, modality embedding
        return "discrete"
    if not name.startswith("language_model."):
        return "encoders" if any(t in name for t in ("tower", "projector", "vision_model")) else "other"
    if "embed_tokens" in name:
        return "embeddings"
    if "lm_head" in name:
        return "head"
    if ".self_attn." in name or ".cross_attn" in name:  # cross_attn.*, cross_attn_*_gate
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if "norm" in name:
        return "norms"
    return "other"


def plan(
    cfg: ModelConfig, seq_len: int | None = None, tokens: float = 2e12, gpus: int = 8, mfu: float = 0.4
) -> dict:
    d = cfg.decoder
    seq_len = seq_len or min(d.max_seq_len, DEFAULT_TRAIN_SEQ)
    params = count_params(cfg)
    n = params["total"]
    n_matmul = n - (params["embeddings"] if not d.tie_embeddings else 0)
    # cross-attention layers (Mllama) cache the image tokens once, not a K/V per text token
    kv_layers = d.num_layers - len(cfg.cross_attention.layers if cfg.cross_attention else ())
    kv_per_token = 2 * kv_layers * d.num_kv_heads * d.head_dim * 2  # K and V, bf16
    attn_flops_per_token = 12 * d.num_layers * d.num_heads * d.head_dim * seq_len
    train_flops = 6 * n_matmul * tokens + attn_flops_per_token * tokens
    gpu_seconds = train_flops / (H100_BF16_DENSE_FLOPS * mfu)
    train_total = {k: v * n for k, v in ADAMW_BYTES.items()}
    return {
        "preset_source": cfg.source,
        "params": n,
        "params_breakdown": params,
        "weight_bytes": {k: int(math.ceil(n * v)) for k, v in BYTES_PER_PARAM.items()},
        "kv_bytes_per_token": kv_per_token,
        "kv_bytes_full_context": kv_per_token * d.max_seq_len,
        "context": d.max_seq_len,
        "seq_len": seq_len,
        "train_memory_bytes": {**train_total, "total": sum(train_total.values())},
        "train_memory_bytes_per_gpu": sum(train_total.values()) // gpus,
        "gpus": gpus,
        "tokens": tokens,
        "train_flops": train_flops,
        "train_flops_breakdown": {"6ND": 6 * n_matmul * tokens, "attention": attn_flops_per_token * tokens},
        "mfu": mfu,
        "gpu_days": gpu_seconds / 86400,
        "wall_days": gpu_seconds / 86400 / gpus,
        "notes": design_notes(cfg, n, n_matmul, tokens),
    }


def design_notes(cfg: ModelConfig, n: int, n_matmul: int, tokens: float) -> list[str]:
    """Where a design document's back-of-envelope arithmetic differs from the exact figures."""
    d = cfg.decoder
    notes = []
    estimate = 12 * d.num_layers * d.hidden_size**2
    if abs(estimate - n) / n > 0.02:
        why = []
        if d.num_kv_heads < d.num_heads:
            kv = "multi-query" if d.num_kv_heads == 1 else "grouped-query"
            why.append(
                f"{kv} attention has {d.num_kv_heads} K/V head(s), so K and V projections are "
                f"{d.num_kv_heads * d.head_dim} wide instead of {d.hidden_size} (12*L*D^2 assumes 4*D^2 of attention)"
            )
        if d.mlp == "swiglu":
            why.append(
                f"SwiGLU has three {d.hidden_size}x{d.intermediate_size} matrices, not two 4*D-wide ones"
            )
        elif d.intermediate_size != 4 * d.hidden_size:
            why.append(f"the FFN is {d.intermediate_size} wide, not 4*D")
        why.append("embeddings and head are not in 12*L*D^2")
        notes.append(
            f"12*L*D^2 = {estimate / 1e9:.2f}B but the exact count is {n / 1e9:.2f}B: " + "; ".join(why) + "."
        )
    notes.append(
        f"training on {tokens:.3g} tokens takes 6*N*D = 6 * {n_matmul / 1e9:.1f}e9 * {tokens:.3g} = "
        f"{6 * n_matmul * tokens:.3g} FLOPs plus attention (a design figure of ~1e20 FLOPs for 88B params "
        "and 2T tokens is off by about four orders of magnitude: 6 * 88e9 * 2e12 = 1.06e24)."
    )
    return notes


def plan_preset(name: str, **kwargs) -> dict:
    out = plan(get_preset(name), **kwargs)
    out["preset"] = name
    return out


def format_plan(p: dict) -> str:
    gib = 1024**3
    lines = [f"preset {p.get('preset', '?')}  ({p['preset_source']})", "", "parameters"]
    for k, v in p["params_breakdown"].items():
        if v or k == "total":
            lines.append(f"  {k:<12} {v:>18,}  ({v / 1e9:.3f}B)")
    lines += ["", "weights"]
    lines += [f"  {k:<12} {v / gib:>12.2f} GiB" for k, v in p["weight_bytes"].items()]
    lines += [
        "",
        f"KV cache (bf16)  {p['kv_bytes_per_token']:,} B/token; {p['kv_bytes_full_context'] / gib:.3f} GiB "
        f"per full context of {p['context']:,} tokens",
        "",
        "training memory with AdamW (fp32 master weights, grads, 2 moments; activations excluded)",
    ]
    lines += [f"  {k:<12} {v / gib:>12.1f} GiB" for k, v in p["train_memory_bytes"].items()]
    lines += [
        f"  per GPU with FSDP over {p['gpus']} GPUs: {p['train_memory_bytes_per_gpu'] / gib:.1f} GiB",
        "",
        f"training compute for {p['tokens']:.3g} tokens at seq {p['seq_len']:,}",
        f"  6*N*D        {p['train_flops_breakdown']['6ND']:.4g} FLOPs",
        f"  attention    {p['train_flops_breakdown']['attention']:.4g} FLOPs",
        f"  total        {p['train_flops']:.4g} FLOPs",
        f"  H100 at {p['mfu']:.0%} MFU of {H100_BF16_DENSE_FLOPS / 1e12:.0f} TFLOP/s: {p['gpu_days']:,.0f} GPU-days "
        f"({p['wall_days']:,.1f} days on {p['gpus']} GPUs)",
        "",
        "notes",
    ]
    lines += [f"  - {n}" for n in p["notes"]]
    return "\n".join(lines)

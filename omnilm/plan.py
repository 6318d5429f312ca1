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
- `schemes` is exact instead: the bytes `omnilm quantize` writes for each scheme (the decoder's linears in
  the scheme's compressed-tensors layout with bf16 scales, everything else in bf16; the safetensors
  header excluded), plus the bf16 KV cache of one sequence of `context` tokens, against one GPU's
  memory (activations and workspace excluded).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path

from .config import PRESETS, ModelConfig, config_to_dict, get_preset
from .errors import ConfigError

H100_BF16_DENSE_FLOPS = 989e12  # H100 SXM dense bf16 peak, NVIDIA datasheet
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0, "fp4": 0.5 + 1 / 16}
DEFAULT_TRAIN_SEQ = 8192  # the 88B design's training sequence length; long-context presets train shorter
ADAMW_BYTES = {"weights": 4, "grads": 4, "adam_moments": 8}


# Parameter counts and scheme bytes of every preset, computed by the functions below and stored so
# that `omnilm plan --preset NAME` answers without importing torch (1-4 s on a 2-core machine).
# Keyed by a fingerprint of the whole config, so an edited preset misses the cache and is counted
# live; tests/test_plan.py recounts every preset and fails if this file is stale
# (regenerate: python -c "import omnilm.plan as p; p.write_count_cache()").
COUNT_CACHE = Path(__file__).parent / "assets" / "plan_counts.json"


def fingerprint(cfg: ModelConfig) -> str:
    text = json.dumps(config_to_dict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@functools.lru_cache(maxsize=1)
def _count_cache() -> dict:
    return json.loads(COUNT_CACHE.read_text()) if COUNT_CACHE.is_file() else {}


def _cached(cfg: ModelConfig, what: str):
    entry = _count_cache().get(fingerprint(cfg))
    return None if entry is None else dict(entry[what])


def write_count_cache():
    entries = {}
    for name in PRESETS:
        cfg = get_preset(name)
        entries[fingerprint(cfg)] = {
            "preset": name,
            "params": count_params(cfg, cached=False),
            "schemes": scheme_bytes(cfg, cached=False),
        }
    COUNT_CACHE.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
    _count_cache.cache_clear()


def count_params(cfg: ModelConfig, cached: bool = True) -> dict[str, int]:
    """Exact parameter counts by group, from a model built on the meta device."""
    hit = _cached(cfg, "params") if cached else None
    if hit is not None:
        return hit
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


def parse_bytes(text: str) -> int:
    """ "141GB" (10^9), "80GiB" (2^30), "512MB", or a plain number of bytes."""
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "TB": 1e12, "GB": 1e9, "MB": 1e6, "B": 1}
    t = text.strip().upper()
    unit = next((u for u in units if t.endswith(u)), None)  # longest suffixes first
    number, scale = (t[: -len(unit)], units[unit]) if unit else (t, 1)
    try:
        value = float(number) * scale
    except ValueError:
        raise ConfigError(f"--gpu-mem {text!r}: expected a size such as 141GB, 80GiB or 24000MB") from None
    if value <= 0:
        raise ConfigError(f"--gpu-mem {text!r}: must be positive")
    return int(value)


def scheme_bytes(cfg: ModelConfig, int4_group: int = 128, cached: bool = True) -> dict[str, int | None]:
    """Exact weight bytes per scheme as `omnilm quantize` writes them (None where a width does not
    divide the scheme's group)."""
    hit = _cached(cfg, "schemes") if cached and int4_group == 128 else None
    if hit is not None:
        return hit
    import torch
    from torch import nn

    from .convert.hf import init_empty_weights
    from .models.builder import model_class
    from .quant.formats import SCHEMES, check_shape, get_scheme, stored_bytes
    from .quant.linear import quantizable

    with init_empty_weights():  # as count_params: meta parameters without importing torch._dynamo
        model = model_class(cfg)(cfg)
    linears = {name: model.get_submodule(name) for name in quantizable(model)}
    quantized_ids = {id(m.weight) for m in linears.values()}
    rest, seen = 0, set()
    for p in model.parameters():
        if id(p) not in seen and id(p) not in quantized_ids:
            seen.add(id(p))
            rest += 2 * p.numel()  # bf16
    out: dict[str, int | None] = {"bf16": 2 * count_params(cfg, cached=cached)["total"]}
    for name in SCHEMES:
        scheme = get_scheme(name, int4_group if name == "int4" else None)
        try:
            for lname, m in linears.items():
                check_shape(scheme, lname, m.out_features, m.in_features)
        except ConfigError:
            out[name] = None
            continue
        out[name] = rest + sum(
            stored_bytes(scheme, m.out_features, m.in_features, torch.bfloat16)
            + (2 * m.out_features if m.bias is not None else 0)
            for m in linears.values()
            if isinstance(m, nn.Linear)
        )
    return out


def scheme_fit(cfg: ModelConfig, gpu_mem: int, context: int | None = None, int4_group: int = 128) -> dict:
    d = cfg.decoder
    context = context or d.max_seq_len
    kv = 2 * d.num_layers * d.num_kv_heads * d.head_dim * 2 * context
    rows = {}
    for name, weights in scheme_bytes(cfg, int4_group).items():
        if weights is None:
            rows[name] = {"weight_bytes": None, "fits": None}
            continue
        rows[name] = {
            "weight_bytes": weights,
            "kv_bytes": kv,
            "total": weights + kv,
            "fits": weights + kv <= gpu_mem,
        }
    return {"gpu_mem": gpu_mem, "context": context, "int4_group_size": int4_group, "schemes": rows}


def plan(
    cfg: ModelConfig,
    seq_len: int | None = None,
    tokens: float = 2e12,
    gpus: int = 8,
    mfu: float = 0.4,
    gpu_mem: int | None = None,
    context: int | None = None,
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
        **({"inference": scheme_fit(cfg, gpu_mem, context)} if gpu_mem else {}),
    }


def design_notes(cfg: ModelConfig, n: int, n_matmul: int, tokens: float) -> list[str]:
    """Where a design document's back-of-envelope arithmetic differs from the exact figures."""
    d = cfg.decoder
    notes = []
    estimate = 12 * d.num_layers * d.hidden_size**2
    # MQA shrinks attention below the rule's 4*D^2 while a wide SwiGLU grows the FFN past its 8*D^2: the
    # totals can agree while every term differs, so the note stays whenever MQA/GQA breaks the rule
    if abs(estimate - n) / n > 0.02 or d.num_kv_heads < d.num_heads:
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
        close = abs(estimate - n) / n <= 0.02
        notes.append(
            f"12*L*D^2 = {estimate / 1e9:.2f}B "
            + (
                f"and the exact count is {n / 1e9:.2f}B, close only because the terms offset: "
                if close
                else f"but the exact count is {n / 1e9:.2f}B: "
            )
            + "; ".join(why)
            + "."
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
    if "inference" in p:
        inf = p["inference"]
        lines += [
            "",
            f"inference on one GPU of {inf['gpu_mem'] / 1e9:.1f} GB: weights as `omnilm quantize` writes them "
            f"+ bf16 KV cache of {inf['context']:,} tokens (activations excluded)",
        ]
        for name, r in inf["schemes"].items():
            if r["weight_bytes"] is None:
                lines.append(f"  {name:<6} n/a (a width is not divisible by the group size)")
                continue
            lines.append(
                f"  {name:<6} weights {r['weight_bytes']:>18,} B  + KV {r['kv_bytes'] / 1e9:.2f} GB  = "
                f"{r['total'] / 1e9:8.2f} GB  {'fits' if r['fits'] else 'does not fit'}"
            )
    return "\n".join(lines)

"""Hugging Face interop for Qwen2 / Qwen2.5 (`model_type: qwen2`, Qwen2ForCausalLM).

A Qwen2 checkpoint is a Llama one with three differences: q/k/v projections carry a bias (o_proj does
not), RMSNorm eps and rope theta differ by default, and layers may use sliding-window attention
(`use_sliding_window`, `sliding_window`, `max_window_layers`, or an explicit `layer_types`). Keys are
identical to Llama's, so the state dict maps by identity (plus the tied head).
"""

from __future__ import annotations

from ..config import DecoderConfig
from ..errors import CheckpointError
from .hf import decoder_config_from_hf, decoder_config_to_hf, load_llama, save_llama


def qwen2_layer_types(d: dict) -> tuple[int | None, list[str] | None]:
    """(sliding_window, layer_types) by transformers' Qwen2Config rule: layers from max_window_layers on
    slide when use_sliding_window is set; an explicit layer_types list wins."""
    window = d.get("sliding_window") if d.get("use_sliding_window", False) else None
    n = d["num_hidden_layers"]
    types = d.get("layer_types")
    if types is None:
        start = d.get("max_window_layers", 28)
        types = [
            "sliding_attention" if window is not None and i >= start else "full_attention" for i in range(n)
        ]
    if "sliding_attention" not in types:
        return None, None
    if window is None:  # layer_types given explicitly with a window but use_sliding_window unset
        window = d.get("sliding_window")
    return window, list(types)


# transformers' Qwen2Config defaults, for keys a config leaves out (Qwen2-Audio's text_config on the Hub
# lists only what differs from them)
QWEN2_DEFAULTS = dict(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=22016,
    num_hidden_layers=32,
    num_attention_heads=32,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
)


def qwen2_decoder_config_from_hf(d: dict) -> DecoderConfig:
    d = {**QWEN2_DEFAULTS, **d}
    d.setdefault("num_key_value_heads", d["num_attention_heads"])
    d.setdefault("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    base = decoder_config_from_hf(d)
    window, types = qwen2_layer_types(d)
    base.qkv_bias, base.attention_bias, base.mlp_bias = True, False, False
    try:
        return DecoderConfig(**{**base.__dict__, "sliding_window": window, "layer_types": types})
    except ValueError as e:
        raise CheckpointError(f"config.json: {e}") from None


def qwen2_decoder_config_to_hf(cfg: DecoderConfig) -> dict:
    if not cfg.qkv_bias or cfg.attention_bias or cfg.mlp_bias or cfg.rope_scaling is not None:
        raise CheckpointError(
            "only decoders with q/k/v bias, no o/mlp bias and default rope have a Hugging Face qwen2 format"
        )
    hf = decoder_config_to_hf(cfg)
    for k in ("attention_bias", "mlp_bias", "head_dim", "rope_scaling"):
        hf.pop(k)
    sliding = cfg.layer_types is not None and "sliding_attention" in cfg.layer_types
    hf.update(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        use_sliding_window=sliding,
        sliding_window=cfg.sliding_window,
        max_window_layers=cfg.layer_types.index("sliding_attention") if sliding else cfg.num_layers,
        layer_types=cfg.layer_types or ["full_attention"] * cfg.num_layers,
    )
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        raise CheckpointError(f"qwen2 configs have no head_dim; {cfg.head_dim} is not hidden/heads")
    return hf


def load_qwen2(path, hf_config: dict, device=None, dtype=None):
    """The Llama loader (validation, meta build, strict keys) with Qwen2's config reader."""
    return load_llama(path, hf_config, device, dtype, config_from_hf=qwen2_decoder_config_from_hf)


def save_qwen2(model, path):
    save_llama(model, path, config_to_hf=qwen2_decoder_config_to_hf)

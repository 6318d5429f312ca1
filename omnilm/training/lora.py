"""LoRA (Hu et al. 2021), applied from outside: chosen nn.Linear modules are swapped for LoRALinear.

LoRALinear keeps the base layer's `weight` and `bias` under the same names, so the base state-dict
keys do not change; it adds `lora_A` (rank x in) and `lora_B` (out x rank), initialised as PEFT does
(A Kaiming-uniform, B zero, so training starts from the base model). Adapters are saved in PEFT's
layout: adapter_config.json + adapter_model.safetensors with keys such as
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, which `peft.PeftModel` loads onto
transformers' LlamaForCausalLM.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..convert.validate import read_json, read_safetensors
from ..errors import CheckpointError, ConfigError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class LoRALinear(nn.Module):
    """y = x W^T + b + dropout(x) A^T B^T * alpha / rank (the update is folded into W when merged)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=base.weight.device)
        self.lora_A.to(base.weight.dtype)
        self.lora_B.to(base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        return out + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, in)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets=DEFAULT_TARGETS,
    scope: str = "language_model",
    modules: list[str] | None = None,
) -> list[str]:
    """Swap nn.Linear leaves named in `targets` under `scope` (or exactly the named `modules`) for
    LoRALinear and freeze everything else. A target is a leaf name (q_proj) or a dotted tail of the
    module name (cross_attn.q_proj: only Mllama's cross-attention). Returns the wrapped module names."""
    if rank < 1:
        raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
    if modules is None:
        modules = [
            name
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear)
            and any(name == t or name.endswith("." + t) for t in targets)  # a leaf or a dotted tail
            and (not scope or name.startswith(scope + "."))
        ]
        if not modules:
            raise ConfigError(f"LoRA: no nn.Linear named {list(targets)} under {scope!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in modules:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, leaf)
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"LoRA: {name} is a {type(base).__name__}, not an nn.Linear")
        setattr(parent, leaf, LoRALinear(base, rank, alpha, dropout))
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_A.weight.requires_grad_(True)
            m.lora_B.weight.requires_grad_(True)
    model.lora_config = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": list(targets)}
    return modules


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module):
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module):
    for m in lora_modules(model).values():
        m.unmerge()


def is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


# ---- PEFT layout --------------------------------------------------------------------------------------


def _peft_prefixes(hf_format: str) -> list[tuple[str, str]]:
    """(OmniLM prefix, PEFT prefix) pairs: PEFT wraps the transformers model as `base_model.model`."""
    # transformers 5: LlavaForConditionalGeneration.model.language_model (Mllama alike)
    if hf_format in ("llava", "mllama"):
        return [
            ("language_model.model.", "base_model.model.model.language_model."),
            ("language_model.lm_head.", "base_model.model.lm_head."),
        ]
    return [("language_model.", "base_model.model.")]


def _rename(key: str, pairs) -> str:
    for src, dst in pairs:
        if key.startswith(src):
            return dst + key[len(src) :]
    raise CheckpointError(f"LoRA key {key!r} has no PEFT name (expected it under {[s for s, _ in pairs]})")


def adapter_state(model: nn.Module, state: dict | None = None) -> dict[str, torch.Tensor]:
    """The LoRA tensors of `model` (or of a full `state` dict) under PEFT key names."""
    pairs = _peft_prefixes(getattr(model, "hf_format", "llama"))
    state = model.state_dict() if state is None else state
    return {_rename(k, pairs): v.detach().cpu().contiguous() for k, v in state.items() if is_lora_key(k)}


def save_adapter(
    model: nn.Module, path, state: dict | None = None, base_model_name_or_path: str | None = None
):
    """adapter_config.json + adapter_model.safetensors (only the adapter) in PEFT's layout."""
    mods = lora_modules(model)
    if not mods:
        raise ConfigError("save_adapter: the model has no LoRA layers (apply_lora first)")
    if any(m.merged for m in mods.values()):
        raise ConfigError("save_adapter: the LoRA layers are merged; unmerge_lora(model) before saving")
    first = next(iter(mods.values()))
    leaves = sorted({name.rsplit(".", 1)[-1] for name in mods})
    hf_format = getattr(model, "hf_format", "llama")
    # PEFT matches a list of names against every module; LLaVA's vision tower has q_proj too, so
    # there the targets are a regex limited to the language model.
    targets = leaves if hf_format != "llava" else rf".*language_model.*\.({'|'.join(leaves)})"
    # Mllama: exactly the wrapped modules (both towers and self/cross layers share leaf names)
    if hf_format == "mllama":
        pairs = _peft_prefixes(hf_format)
        targets = sorted(_rename(n + ".", pairs)[len("base_model.model.") : -1] for n in mods)
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "base_model_name_or_path": base_model_name_or_path,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2))
    save_file(adapter_state(model, state), path / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def load_adapter(model: nn.Module, path) -> list[str]:
    """Wrap exactly the modules the adapter has weights for and load them (strict)."""
    path = Path(path)
    cfg_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (expected a PEFT adapter directory)")
    cfg = read_json(cfg_file)
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or cfg.get("use_rslora"):
        raise CheckpointError(f"{cfg_file}: only plain LoRA adapters are supported")
    pairs = [(dst, src) for src, dst in _peft_prefixes(getattr(model, "hf_format", "llama"))]
    weights = {}
    for key, value in read_safetensors(weights_file).items():
        key = key.replace(".default.", ".")  # files written with the adapter name left in
        weights[_rename(key, pairs)] = value
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in weights if is_lora_key(k)})
    if not modules:
        raise CheckpointError(f"{weights_file}: no lora_A / lora_B tensors")
    apply_lora(model, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), modules=modules)
    expected = {k for k in model.state_dict() if is_lora_key(k)}
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{weights_file}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for key, value in weights.items():
        param = model.get_parameter(key)
        if param.shape != value.shape:
            raise CheckpointError(
                f"{weights_file}: {key} has shape {tuple(value.shape)}, model {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(value)
    return modules


# ---- QLoRA: adapters over a frozen 4-bit base -------------------------------------------------------------

QUANTIZED_BASES = ("nf4", "int4")


class _FrozenQuantLinear(torch.autograd.Function):
    """y = x W^T with W dequantized in forward and again in backward, so no layer's dense weight is
    kept alive between the two (what makes the 4-bit base cheaper than a 16-bit one while training)."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return F.linear(x, module.base_weight(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.module.base_weight(grad.dtype), None


class QLoRALinear(LoRALinear):
    """LoRALinear whose frozen base weight is stored in 4 bits: NF4 (`weight_nf4`, `weight_absmax`, blocks
    of 64) or the int4 scheme of omnilm.quant (`weight_packed`, `weight_scale`, groups of 64 or 32).
    The adapter (lora_A, lora_B) trains in the base's original dtype."""

    def __init__(self, lora: LoRALinear, quantize_base: str = "nf4"):
        nn.Module.__init__(self)  # takes over `lora`'s adapter; only the base weight changes form
        self.in_features, self.out_features = lora.in_features, lora.out_features
        self.bias, self.lora_A, self.lora_B, self.dropout = lora.bias, lora.lora_A, lora.lora_B, lora.dropout
        self.rank, self.alpha, self.scaling, self.merged = lora.rank, lora.alpha, lora.scaling, False
        w = lora.weight.detach()
        self.quantize_base, self.weight_shape = quantize_base, tuple(w.shape)
        if quantize_base == "nf4":
            from ..quant.nf4 import quantize_nf4

            packed, absmax = quantize_nf4(w)
            self.register_buffer("weight_nf4", packed)
            self.register_buffer("weight_absmax", absmax)
        elif quantize_base == "int4":
            from ..quant.formats import get_scheme, quantize_weight

            k = w.shape[1]
            group = next((g for g in (64, 32) if k % g == 0), None)
            if group is None:
                raise ConfigError(f"lora.quantize_base int4: input width {k} is not divisible by 32")
            self.scheme = get_scheme("int4", group)
            t = quantize_weight(self.scheme, w)
            self.register_buffer("weight_packed", t["weight_packed"])
            self.register_buffer("weight_scale", t["weight_scale"])
        else:
            raise ConfigError(f"lora.quantize_base {quantize_base!r}: expected one of {QUANTIZED_BASES}")
        self.base_dtype = w.dtype

    def base_weight(self, dtype=None) -> torch.Tensor:
        dtype = dtype or self.base_dtype
        if self.quantize_base == "nf4":
            from ..quant.nf4 import dequantize_nf4

            return dequantize_nf4(self.weight_nf4, self.weight_absmax, self.weight_shape, dtype)
        from ..quant.formats import dequantize_weight

        return dequantize_weight(
            self.scheme, {n: getattr(self, n) for n in ("weight_packed", "weight_scale")}, dtype
        )

    def forward(self, x):
        out = _FrozenQuantLinear.apply(x, self)
        if self.bias is not None:
            out = out + self.bias
        return out + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def merge(self):
        raise ConfigError("QLoRA: the base is quantized; load the adapter onto the unquantized base to merge")

    def base_keys(self) -> tuple[str, ...]:
        return (
            ("weight_nf4", "weight_absmax")
            if self.quantize_base == "nf4"
            else ("weight_packed", "weight_scale")
        )


def apply_qlora(
    model: nn.Module, rank=8, alpha=16.0, dropout=0.0, targets=DEFAULT_TARGETS, quantize_base="nf4"
):
    """apply_lora, then the wrapped bases stored in 4 bits (frozen). Returns the wrapped module names."""
    if quantize_base not in QUANTIZED_BASES:
        raise ConfigError(f"lora.quantize_base {quantize_base!r}: expected one of {QUANTIZED_BASES}")
    names = apply_lora(model, rank, alpha, dropout, targets)
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, QLoRALinear(getattr(parent, leaf), quantize_base))
    model.lora_config["quantize_base"] = quantize_base
    return names


def dense_base_state(model: nn.Module, state: dict) -> dict:
    """A (full) state dict with each QLoRA base's 4-bit tensors replaced by its dequantized `weight`, so
    the base saves as an ordinary checkpoint."""
    state = dict(state)
    for name, m in lora_modules(model).items():
        if isinstance(m, QLoRALinear):
            for key in m.base_keys():
                state.pop(f"{name}.{key}", None)
            state[f"{name}.weight"] = m.base_weight(torch.float32).cpu()
    return state

"""compressed-tensors directories: write a quantized model (the state dict already holds the file's
tensors) with `quantization_config` in its config, and load one back (ours, or one llm-compressor wrote
in a format we run) by swapping QuantLinear in on the meta device before the tensors are assigned.

A Llama model is written as a Hugging Face Llama directory (config.json, what vLLM and transformers
read); other models in the OmniLM format, with the same dict in quantization_config.json beside
omnilm_config.json (which stays a plain ModelConfig that processors and tools read).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..convert.hf import (
    OMNILM_CONFIG,
    checkpoint_dir,
    decoder_config_from_hf,
    init_empty_weights,
    llama_state_from_hf,
    load_strict,
    read_config,
    read_state_dict,
    retie,
    save_llama,
    save_omnilm,
    write_state_dict,
)
from ..errors import CheckpointError, ConfigError
from .formats import ALSO_READ, INT8_WEIGHT_ONLY_FORMAT, SCHEMES, Scheme, get_scheme, pack_int8, unpack_int8
from .linear import QuantEmbedding, QuantLinear, quant_modules

QUANT_CONFIG = "quantization_config.json"  # OmniLM-format directories
# what save_pretrained writes; everything else in the source directory (tokenizer, processor, media
# tokenizers) is copied along
WEIGHT_FILES = re.compile(
    r"(model.*\.safetensors|model\.safetensors\.index\.json|(omnilm_|quantization_)?config\.json)$"
)


def is_quantized_dir(path) -> bool:
    path = Path(path)
    if (path / QUANT_CONFIG).is_file():
        return True
    f = path / "config.json"
    if not f.is_file():
        return False
    from ..convert.validate import read_json  # bounded and typed: a hostile config.json is refused there

    return "quantization_config" in read_json(f)


def _file_format(model) -> str:
    """A plain decoder is written as a Hugging Face Llama directory, anything else (LLaVA-shaped too: its
    converter does not know QuantLinear) in the OmniLM format."""
    return "llama" if model.config.hf_format == "llama" else "omnilm"


def _file_prefix(fmt: str) -> str:
    """What OmniLM module names lose in the file: a Llama directory has LlamaForCausalLM's names."""
    return "language_model." if fmt == "llama" else ""


def quantization_config(model: nn.Module) -> dict:
    """compressed-tensors `quantization_config`: one group targeting Linear, every unquantized Linear
    named in `ignore` (in the file's module names)."""
    mods = quant_modules(model)
    schemes = {m.scheme for m in mods.values()}
    if len(schemes) != 1:
        raise ConfigError(
            f"save_quantized: expected one quantization scheme in the model, found {len(schemes)}"
        )
    scheme = schemes.pop()
    prefix = _file_prefix(_file_format(model))
    targets = ["Linear"]
    kinds = (nn.Linear,)
    if any(isinstance(m, QuantEmbedding) for m in mods.values()):
        targets, kinds = ["Linear", "Embedding"], (nn.Linear, nn.Embedding)
    ignore = [n.removeprefix(prefix) for n, m in model.named_modules() if type(m) in kinds]
    acts = {m.activations for m in mods.values() if not isinstance(m, QuantEmbedding)}
    if len(acts) > 1:
        raise ConfigError("save_quantized: some linears quantize their activations and some do not")
    inputs = None
    if acts == {"int8"}:
        inputs = {
            "num_bits": 8,
            "type": "int",
            "symmetric": True,
            "strategy": "token",
            "dynamic": True,
            "group_size": None,
        }
    fmt = scheme.format
    # weight-only int8 is packed as compressed-tensors writes it, but not with quantized embeddings: transformers
    # cannot load a packed nn.Embedding (tests/test_quant_head.py), so those stay int-quantized
    if scheme.name == "int8" and inputs is None and targets == ["Linear"]:
        fmt = INT8_WEIGHT_ONLY_FORMAT
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": targets,
                "weights": scheme.args(),
                "input_activations": inputs,
                "output_activations": None,
                "format": fmt,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def save_quantized(model: nn.Module, out, source=None) -> int:
    """Write the quantized model to `out` through a temporary directory renamed into place at the end
    (a failure leaves no half-written `out`), copying the tokenizer, processor and media tokenizer files
    of `source`. Returns (tensor bytes, file bytes) of the weight files; the difference is the
    safetensors JSON headers."""
    from ..models.builder import model_class

    if type(model) is not model_class(model.config):  # Qwen2-Audio, Emu3: their own converters
        raise ConfigError(f"save_quantized: {type(model).__name__} models cannot be written quantized yet")
    out = Path(out)
    qc = quantization_config(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (save_llama if _file_format(model) == "llama" else save_omnilm)(model, tmp)
        if (
            qc["format"] == INT8_WEIGHT_ONLY_FORMAT
            and qc["config_groups"]["group_0"]["weights"]["num_bits"] == 8
        ):
            _pack_int8_files(tmp)
        if (tmp / "config.json").is_file():
            cfg = json.loads((tmp / "config.json").read_text())
            cfg["quantization_config"] = qc
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        else:
            (tmp / QUANT_CONFIG).write_text(json.dumps(qc, indent=2))
        if source is not None:
            for f in Path(source).iterdir():
                if WEIGHT_FILES.match(f.name) or f.name.startswith("."):
                    continue
                if f.is_dir():
                    shutil.copytree(f, tmp / f.name)
                else:
                    shutil.copy2(f, tmp / f.name)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = list(out.glob("model*.safetensors"))
    return sum(tensor_bytes(f) for f in files), sum(f.stat().st_size for f in files)


def _pack_int8_files(path: Path):
    """Weight-only int8 as compressed-tensors writes it: each int8 `weight` beside a `weight_scale` becomes
    `weight_packed` int32 + `weight_shape`; every other tensor is written back unchanged."""
    state = read_state_dict(path)
    for key in [k for k, v in state.items() if k.endswith(".weight") and v.dtype == torch.int8]:
        if f"{key}_scale" in state:
            q = state.pop(key)
            state[f"{key}_packed"] = pack_int8(q)
            state[f"{key}_shape"] = torch.tensor(q.shape, dtype=torch.int64)
    for f in path.glob("model*.safetensors*"):
        f.unlink()
    write_state_dict(state, path)


def _unpack_int8(state: dict, source: str) -> dict:
    """pack-quantized int8 (weight_packed + weight_shape) -> the int8 `weight` QuantLinear holds."""
    for key in [k for k in state if k.endswith(".weight_packed")]:
        base = key.removesuffix("_packed")
        packed, shape = state.pop(key), state.pop(f"{base}_shape", None)
        if shape is None:
            raise CheckpointError(f"{source}: {key} has no {base}_shape")
        if packed.dtype != torch.int32 or packed.dim() != 2:
            raise CheckpointError(f"{source}: {key}: dtype {packed.dtype}, expected torch.int32 (2-D)")
        n, k = shape.tolist() if shape.numel() == 2 and not shape.is_floating_point() else (-1, -1)
        if n != packed.shape[0] or k < 0 or (k + 3) // 4 != packed.shape[1]:
            raise CheckpointError(
                f"{source}: {base}_shape {shape.tolist()} does not match {key} {tuple(packed.shape)}"
            )
        state[base] = unpack_int8(packed, k)
    return state


def tensor_bytes(f: Path) -> int:
    """Bytes of tensor data in a safetensors file: its size less the 8-byte length and the JSON header."""
    with open(f, "rb") as fh:
        header = int.from_bytes(fh.read(8), "little")
    return f.stat().st_size - 8 - header


# ---- loading ----------------------------------------------------------------------------------------------


def scheme_from_config(qc: dict, source: str) -> tuple[Scheme, list[str], list[str], str | None]:
    """(scheme, targets, ignore, activations) of a compressed-tensors config, activations "int8" for
    dynamic per-token int8 inputs over int8 weights (W8A8); anything else is a CheckpointError naming
    the key."""
    where = f"{source}: quantization_config"
    if qc.get("quant_method") != "compressed-tensors":
        raise CheckpointError(
            f"{where}.quant_method {qc.get('quant_method')!r} is not supported (expected 'compressed-tensors')"
        )
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise CheckpointError(
            f"{where}.quantization_status {status!r} is not supported (expected 'compressed')"
        )
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise CheckpointError(f"{where}.config_groups: expected one group, found {len(groups)}")
    ((gname, group),) = groups.items()
    w = group.get("weights") or {}
    key = f"{where}.config_groups.{gname}.weights"
    if not w.get("symmetric", True):
        raise CheckpointError(f"{key}.symmetric: asymmetric weights (zero points) are not supported")
    if w.get("actorder") not in (None, "static", False):
        raise CheckpointError(f"{key}.actorder {w.get('actorder')!r} is not supported")
    sig = (w.get("type"), w.get("num_bits"), w.get("strategy"))
    name = {
        ("int", 8, "channel"): "int8",
        ("int", 4, "group"): "int4",
        ("float", 8, "channel"): "fp8",
        ("float", 4, "tensor_group"): "nvfp4",
        ("float", 4, "group"): "mxfp4",
    }.get(sig)
    if name is None:
        raise CheckpointError(
            f"{key}: type/num_bits/strategy {sig} is not a scheme OmniLM runs ({', '.join(SCHEMES)})"
        )
    try:
        scheme = get_scheme(name, w.get("group_size"))
    except ConfigError as e:
        raise CheckpointError(f"{key}.group_size: {e}") from None
    fmt = group.get("format") or qc.get("format")
    formats = [scheme.format, *ALSO_READ.get(name, ())]
    if fmt not in formats:
        raise CheckpointError(
            f"{where}.format {fmt!r} is not supported for {name} (expected {' or '.join(map(repr, formats))})"
        )
    inputs = group.get("input_activations")
    acts = None
    if inputs:
        akey = f"{where}.config_groups.{gname}.input_activations"
        if not inputs.get("dynamic"):
            raise CheckpointError(f"{akey}: static activation scales are not supported")
        asig = (inputs.get("type"), inputs.get("num_bits"), inputs.get("strategy"), inputs.get("symmetric"))
        if asig == ("int", 8, "token", True) and name == "int8":
            acts = "int8"
        # other dynamic activation schemes: run weight-only (activations unquantized, a closer result)
    return scheme, list(group.get("targets") or []), list(qc.get("ignore") or []), acts


def _matches(name: str, patterns: list[str], module: nn.Module) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif p == name or p == type(module).__name__:
            return True
    return False


def load_quantized(path, device=None, dtype=None):
    from ..models.builder import model_class

    path = checkpoint_dir(path)
    cfg_json = dict(read_config(path))
    if (path / QUANT_CONFIG).is_file():
        try:
            qc = json.loads((path / QUANT_CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path / QUANT_CONFIG}: not valid JSON ({e})") from None
    else:
        qc = cfg_json.pop("quantization_config")
    scheme, targets, ignore, acts = scheme_from_config(qc, str(path))
    if (path / OMNILM_CONFIG).is_file() and not (path / "config.json").is_file():
        cfg, fmt = ModelConfig.from_dict(cfg_json), "omnilm"
    elif cfg_json.get("model_type") == "llama":
        cfg, fmt = ModelConfig(decoder=decoder_config_from_hf(cfg_json), source=str(path)), "llama"
    else:
        raise CheckpointError(
            f"{path}/config.json: a quantized model_type {cfg_json.get('model_type')!r} is not supported "
            "(expected 'llama' or an OmniLM checkpoint)"
        )
    with init_empty_weights():
        model = model_class(cfg)(cfg)
    prefix = _file_prefix(fmt)
    for name, m in list(model.named_modules()):
        file_name = name.removeprefix(prefix)
        if type(m) not in (nn.Linear, nn.Embedding):
            continue
        if _matches(file_name, targets, m) and not _matches(file_name, ignore, m):
            if type(m) is nn.Embedding:
                q = QuantEmbedding(m.embedding_dim, m.num_embeddings, False, scheme, device="meta")
            else:
                q = QuantLinear(m.in_features, m.out_features, m.bias is not None, scheme, device="meta")
                q.activations = acts
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name), leaf, q)
    lm = model.language_model
    if cfg.decoder.tie_embeddings and isinstance(lm.model.embed_tokens, QuantEmbedding):
        raise CheckpointError(
            f"{path}: quantized embeddings in a model with tied embeddings are not supported (the head "
            "shares their tensor)"
        )
    state = read_state_dict(path)
    if scheme.name == "int8":
        state = _unpack_int8(state, str(path))
    if fmt == "llama":
        state, module = llama_state_from_hf(state, cfg.decoder), model.language_model
    else:
        if cfg.decoder.tie_embeddings and "language_model.model.embed_tokens.weight" in state:
            state.setdefault(
                "language_model.lm_head.weight", state["language_model.model.embed_tokens.weight"]
            )
        module = model
    quant_keys = {
        f"{n.removeprefix('language_model.') if fmt == 'llama' else n}.{b}"
        for n, m in quant_modules(model).items()
        for b, _ in m.named_buffers(recurse=False)
    }
    if dtype is not None:  # the quantized tensors and their scales stay as stored
        state = {
            k: v.to(dtype) if v.is_floating_point() and k not in quant_keys else v for k, v in state.items()
        }
    load_strict(module, state, source=str(path), device=device)
    for m in quant_modules(model).values():
        if m.bias is not None:
            m.bias.requires_grad_(False)
        if isinstance(m, QuantEmbedding):
            m.set_dtype(model.dtype, model.device)
    if not isinstance(model.language_model.lm_head, QuantLinear):
        retie(model)
    return model.eval()

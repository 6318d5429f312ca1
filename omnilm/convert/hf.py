"""Hugging Face checkpoint interop: safetensors IO, strict loading, the Llama key/config maps, and
`load` / `save_pretrained` dispatch by `model_type`.

Weights from outside load only from safetensors; pickle files (.bin, .pt, .pth, .ckpt) are refused
without being opened. Models are built with parameters on the meta device and the checkpoint's
memory-mapped tensors are assigned in, so loading never holds two copies of the weights.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import DecoderConfig, ModelConfig, RopeScaling
from ..errors import CheckpointError
from . import validate
from .files import honour_umask

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
OMNILM_CONFIG = "omnilm_config.json"
MAX_SHARD_BYTES = 5 * 1024**3


# ---- files ------------------------------------------------------------------------------------------


def checkpoint_dir(path) -> Path:
    path = Path(path)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickle checkpoints are refused (they can run code); convert it to safetensors"
        )
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    return path


def read_config(path) -> dict:
    """config.json of a Hugging Face directory (or omnilm_config.json of an OmniLM one)."""
    path = checkpoint_dir(path)
    for name in ("config.json", OMNILM_CONFIG):
        f = path / name
        if f.is_file():
            return validate.read_json(f)
    raise CheckpointError(f"{path}: no config.json or {OMNILM_CONFIG}")


def read_state_dict(path, prefix: str = "") -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors or a sharded index, memory-mapped (keys starting with prefix)."""
    path = checkpoint_dir(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = validate.index_files(path, validate.read_json(index), index)
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(
                f"{path}: only pickle weights found ({', '.join(pickles)}); pickle checkpoints are "
                "refused (they can run code): convert them to safetensors"
            )
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    for name in files:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: shard named in the index is missing")
    validate.check_shards(path, files)
    state = {}
    for name in files:
        f = path / name
        try:
            with safe_open(f, framework="pt", device="cpu") as sf:
                for key in sf.keys():
                    if key.startswith(prefix):
                        state[key] = sf.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    return state


def write_state_dict(state: dict[str, torch.Tensor], path, max_shard_bytes: int = MAX_SHARD_BYTES):
    """model.safetensors, or shards plus model.safetensors.index.json when over max_shard_bytes."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    shards, current, size = [], {}, 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += n
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors", metadata={"format": "pt"})
        honour_umask(path / "model.safetensors")  # safetensors writes a 0600 temporary file and renames it
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        honour_umask(path / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


# ---- building and strict loading ----------------------------------------------------------------------


@contextlib.contextmanager
def init_empty_weights():
    """Create parameters on the meta device (no memory, no init) while buffers stay real, so
    non-persistent buffers computed from the config (RoPE frequencies, position ids) exist after
    the checkpoint's tensors are assigned in."""
    original = nn.Module.register_parameter

    def register_parameter(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    # Initializing meta tensors does nothing useful and, through torch's reference kernels, imports
    # torch._dynamo (seconds of start-up): skip the init functions while building.
    inits = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    nn.Module.register_parameter = register_parameter
    for name in inits:
        setattr(nn.init, name, _skip_init)
    try:
        yield
    finally:
        nn.Module.register_parameter = original
        for name, fn in inits.items():
            setattr(nn.init, name, fn)


_INIT_FUNCTIONS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "zeros_",
    "ones_",
    "constant_",
    "orthogonal_",
)


def _skip_init(tensor, *args, **kwargs):
    return tensor


def load_strict(
    module: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint", dtype=None, device=None
):
    """Assign `state` into `module`; any missing or unexpected key or shape mismatch is a CheckpointError."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short(unexpected)}")
        raise CheckpointError(f"{source}: {'; '.join(parts)}")
    bad = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise CheckpointError(f"{source}: shape mismatch for {_short(bad)}")
    params = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    state = validate.check_state(expected, state, source, params)
    if dtype is not None or device is not None:
        state = {
            k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in state.items()
        }
    module.load_state_dict(state, strict=True, assign=True)
    for buf_module in module.modules():  # buffers follow the weights' device
        for name, buf in list(buf_module.named_buffers(recurse=False)):
            if device is not None and buf.device != torch.device(device):
                setattr(buf_module, name, buf.to(device))
    return module


def _short(items, n=8):
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def retie(model):
    """assign=True replaces Parameters, which unties a tied head; tie it again."""
    lm = model.language_model
    if lm.cfg.tie_embeddings:
        lm.lm_head.weight = lm.model.embed_tokens.weight


# ---- Llama ---------------------------------------------------------------------------------------------


def decoder_config_from_hf(d: dict) -> DecoderConfig:
    validate.check_hf_decoder(d, "config.json")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"config.json: hidden_act {act!r} is not supported for llama (expected 'silu')")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise CheckpointError(
            f"config.json: rope_type {rope_type!r} is not supported (expected 'default' or 'llama3')"
        )
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=rope["factor"],
            low_freq_factor=rope["low_freq_factor"],
            high_freq_factor=rope["high_freq_factor"],
            original_max_position_embeddings=rope["original_max_position_embeddings"],
        )
    return DecoderConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        num_kv_heads=d.get("num_key_value_heads"),
        intermediate_size=d["intermediate_size"],
        head_dim=d.get("head_dim"),
        max_seq_len=d.get("max_position_embeddings", 2048),
        norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=d.get("tie_word_embeddings", False),
        attention_bias=d.get("attention_bias", False),
        mlp_bias=d.get("mlp_bias", False),
        initializer_range=d.get("initializer_range", 0.02),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
    )


def decoder_config_to_hf(cfg: DecoderConfig) -> dict:
    if cfg.norm != "rmsnorm" or cfg.mlp != "swiglu" or not cfg.use_rope:
        raise CheckpointError(
            "only Llama-shaped decoders (rmsnorm, swiglu, rope) have a Hugging Face llama format"
        )
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope.update(
            rope_type="llama3",
            factor=s.factor,
            low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
            original_max_position_embeddings=s.original_max_position_embeddings,
        )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.intermediate_size,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope if cfg.rope_scaling is not None else None,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "float32",
    }


def llama_state_from_hf(state: dict, cfg: DecoderConfig, prefix: str = "") -> dict:
    """HF LlamaForCausalLM keys (under `prefix`) -> CausalLM keys (identity, plus the tied head)."""
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if cfg.tie_embeddings:
        out.setdefault("lm_head.weight", out.get("model.embed_tokens.weight"))
        if out["lm_head.weight"] is None:
            out.pop("lm_head.weight")
    return out


def load_llama(path, hf_config: dict, device=None, dtype=None, config_from_hf=None):
    """A Llama-layout decoder directory (config_from_hf: the family's config reader, e.g. Qwen2's)."""
    from ..models.omni import OmniModel

    with validate.config_errors(f"{path}/config.json"):
        cfg = ModelConfig(decoder=(config_from_hf or decoder_config_from_hf)(hf_config), source=str(path))
    validate.check_model_size(cfg.decoder, f"{path}/config.json", dtype)
    with init_empty_weights():
        model = OmniModel(cfg)
    state = llama_state_from_hf(read_state_dict(path), cfg.decoder)
    load_strict(model.language_model, state, source=str(path), dtype=dtype, device=device)
    retie(model)
    return model.eval()


def save_llama(model, path, config_to_hf=None):
    path = Path(path)
    lm = model.language_model
    state = dict(lm.state_dict())
    if lm.cfg.tie_embeddings:
        state.pop("lm_head.weight")
    path.mkdir(parents=True, exist_ok=True)
    hf = (config_to_hf or decoder_config_to_hf)(lm.cfg)
    hf["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    write_state_dict(state, path)


# ---- OmniLM format ---------------------------------------------------------------------------------------


def save_omnilm(model, path):
    """omnilm_config.json + model.safetensors: for models with no Hugging Face equivalent."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / OMNILM_CONFIG).write_text(json.dumps(model.config.to_dict(), indent=2))
    state = dict(model.state_dict())
    if model.config.decoder.tie_embeddings:
        state.pop("language_model.lm_head.weight")
    write_state_dict(state, path)


def load_omnilm(path, device=None, dtype=None):
    from ..models.builder import model_class

    path = checkpoint_dir(path)
    source = str(path / OMNILM_CONFIG)
    with validate.config_errors(source):
        cfg = ModelConfig.from_dict(validate.read_json(path / OMNILM_CONFIG))
    validate.check_config_types(cfg, source)
    validate.check_model_size(cfg.decoder, source, dtype)
    if cfg.vision is not None or cfg.audio is not None or cfg.discrete is not None:  # sized by a meta build
        validate.check_config(cfg, source, lambda: model_class(cfg)(cfg), dtype)
    with init_empty_weights():
        model = model_class(cfg)(cfg)
    state = read_state_dict(path)
    if cfg.decoder.tie_embeddings and "language_model.model.embed_tokens.weight" in state:
        state.setdefault("language_model.lm_head.weight", state["language_model.model.embed_tokens.weight"])
    load_strict(model, state, source=str(path), dtype=dtype, device=device)
    retie(model)
    return model.eval()

"""Hugging Face interop for Emu3 (`model_type: emu3`, Emu3ForConditionalGeneration) and its VQ-VAE.

Key layouts (both map by prefix): what transformers writes, `text_model.model.*`, `text_model.lm_head.*`,
`vqmodel.*`; and the runtime names `model.text_model.*`, `model.vqmodel.*`, `lm_head.*`.
`load_emu3_codec` reads the VQ-VAE alone from the same directory (omnilm.load_codec).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..config import ModelConfig
from ..errors import CheckpointError
from ..models.vq.emu3_vqvae import Emu3VQConfig, Emu3VQVAE
from .hf import (
    decoder_config_from_hf,
    decoder_config_to_hf,
    init_empty_weights,
    load_strict,
    read_state_dict,
    retie,
    write_state_dict,
)

_PREFIXES = (
    ("model.text_model.", "language_model.model."),
    ("text_model.model.", "language_model.model."),
    ("text_model.lm_head.", "language_model.lm_head."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vqmodel.", "vqmodel."),
)


# transformers' Emu3TextConfig defaults, for keys a config leaves out
EMU3_TEXT_DEFAULTS = dict(
    vocab_size=184622,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=9216,
    rms_norm_eps=1e-5,
    pad_token_id=151643,
    bos_token_id=151849,
    eos_token_id=151850,
)


def vq_config_from_hf(d: dict) -> Emu3VQConfig:
    names = {f.name for f in dataclasses.fields(Emu3VQConfig)}
    try:
        return Emu3VQConfig(**{k: v for k, v in d.items() if k in names})
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"config.json: vq_config: {e}") from None


def emu3_config_from_hf(d: dict, source: str = ""):
    for key in ("vq_config", "text_config", "vocabulary_map"):
        if not isinstance(d.get(key), dict):
            raise CheckpointError(f"config.json: emu3 needs a {key} object")
    text = {**EMU3_TEXT_DEFAULTS, **d["text_config"]}
    text.setdefault("rope_theta", (text.get("rope_parameters") or {}).get("rope_theta", 1000000.0))
    text.setdefault("tie_word_embeddings", d.get("tie_word_embeddings", False))
    cfg = ModelConfig(decoder=decoder_config_from_hf(text), source=source)
    return cfg, vq_config_from_hf(d["vq_config"]), d["vocabulary_map"]


def _vq_state(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for old in ("model.vqmodel.", "vqmodel."):
            if k.startswith(old):
                out[k[len(old) :]] = v
    return out


def load_emu3(path, hf_config: dict, device=None, dtype=None):
    from ..models.emu3 import Emu3Model

    cfg, vq, vocab = emu3_config_from_hf(hf_config, str(path))
    with init_empty_weights():
        model = Emu3Model(cfg, vq, vocab)
    state = {}
    for k, v in read_state_dict(path).items():
        for old, new in _PREFIXES:
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        state[k] = v
    if cfg.decoder.tie_embeddings:
        state.setdefault(
            "language_model.lm_head.weight", state.get("language_model.model.embed_tokens.weight")
        )
    load_strict(model, state, source=str(path), dtype=dtype, device=device)
    retie(model)
    model.img2bpe = model.img2bpe.to(model.device)
    return model.eval()


def load_emu3_codec(path, hf_config: dict, device=None, dtype=None) -> Emu3VQVAE:
    if not isinstance(hf_config.get("vq_config"), dict):
        raise CheckpointError(f"{path}/config.json: emu3 needs a vq_config object")
    vq = vq_config_from_hf(hf_config["vq_config"])
    with init_empty_weights():
        model = Emu3VQVAE(vq)
    load_strict(model, _vq_state(read_state_dict(path)), source=str(path), dtype=dtype, device=device)
    return model.eval()


def save_emu3(model, path):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("language_model."):
            k = "text_model." + k[len("language_model.") :]
        state[k] = v
    if model.config.decoder.tie_embeddings:
        state.pop("text_model.lm_head.weight")
    text = decoder_config_to_hf(model.config.decoder)
    for k in ("architectures", "torch_dtype", "rope_scaling"):
        text.pop(k, None)
    text["model_type"] = "emu3_text_model"
    hf = {
        "architectures": ["Emu3ForConditionalGeneration"],
        "model_type": "emu3",
        "text_config": text,
        "vq_config": {"model_type": "emu3_vqgan", **dataclasses.asdict(model.vqmodel.config)},
        "vocabulary_map": model.vocabulary_map,
        "tie_word_embeddings": model.config.decoder.tie_embeddings,
        "torch_dtype": str(model.dtype).removeprefix("torch."),
    }
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    write_state_dict(state, path)

"""Loading and saving discrete tokenizers: OmniLM codec dirs and Hugging Face EnCodec dirs.

An OmniLM codec dir holds omnilm_codec.json ({"kind": "image_vq" | "audio_codec", "config": {...}})
and model.safetensors. A Hugging Face dir whose config.json says `model_type: encodec` loads into
the EnCodec port (omnilm/models/vq/encodec.py) through the same strict loader as every other model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..config import AudioCodecConfig, ImageVQConfig, from_dict
from ..errors import CheckpointError, ConfigError
from ..models.vq.codec import AudioCodec
from ..models.vq.encodec import EncodecCodec, EncodecConfig, encodec_state_from_hf
from ..models.vq.image_vqvae import ImageVQVAE
from . import validate
from .hf import checkpoint_dir, load_strict, read_state_dict, write_state_dict
from .validate import read_json

CODEC_CONFIG = "omnilm_codec.json"
KINDS = {"image_vq": (ImageVQVAE, ImageVQConfig), "audio_codec": (AudioCodec, AudioCodecConfig)}


def save_codec(model, path) -> Path:
    """Write an OmniLM codec dir (an ImageVQVAE or AudioCodec) that load_codec reads back."""
    kind = getattr(model, "kind", None)
    if kind not in KINDS:
        raise ConfigError(f"save_codec: can only save {sorted(KINDS)} models, got {type(model).__name__}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"kind": kind, "config": dataclasses.asdict(model.config)}
    (path / CODEC_CONFIG).write_text(json.dumps(meta, indent=2))
    write_state_dict(model.state_dict(), path)
    return path


def load_codec(path, device=None, dtype=None):
    """An image VQ-VAE or audio codec from an OmniLM codec dir, or EnCodec from a Hugging Face dir; eval mode."""
    path = checkpoint_dir(path)
    if (path / CODEC_CONFIG).is_file():
        meta = _read_json(path / CODEC_CONFIG)
        kind = meta.get("kind")
        if kind not in KINDS:
            raise CheckpointError(
                f"{path / CODEC_CONFIG}: 'kind' must be one of {sorted(KINDS)}, got {kind!r}"
            )
        model_cls, cfg_cls = KINDS[kind]
        with validate.config_errors(str(path / CODEC_CONFIG)):
            cfg = from_dict(cfg_cls, meta.get("config") or {})
        validate.check_config(cfg, str(path / CODEC_CONFIG), lambda: model_cls(cfg), dtype)
        model = model_cls(cfg)
        state = read_state_dict(path)
    elif (path / "config.json").is_file():
        hf = _read_json(path / "config.json")
        if hf.get("model_type") == "emu3":  # the VQ-VAE inside an Emu3 checkpoint
            from .emu3 import load_emu3_codec

            return load_emu3_codec(path, hf, device=device, dtype=dtype)
        if hf.get("model_type") != "encodec":
            raise CheckpointError(
                f"{path / 'config.json'}: model_type {hf.get('model_type')!r} is not a codec "
                f"(expected 'encodec', or an OmniLM dir with {CODEC_CONFIG})"
            )
        with validate.config_errors(str(path / "config.json")):
            cfg = EncodecConfig.from_hf(hf)
        validate.check_config(cfg, str(path / "config.json"), lambda: EncodecCodec(cfg), dtype)
        model = EncodecCodec(cfg)
        state = encodec_state_from_hf(read_state_dict(path))
    else:
        raise CheckpointError(f"{path}: no {CODEC_CONFIG} or config.json")
    load_strict(model, state, source=str(path), dtype=dtype)
    return model.to(device=device).eval()


def _read_json(f: Path) -> dict:
    return read_json(f)


def codec_device(model) -> torch.device:
    return next(model.parameters()).device

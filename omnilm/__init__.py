"""OmniLM: multimodal decoder-only language models in PyTorch.

The public API (kept stable; see ARCHITECTURE.md): load, build, load_encoder, load_processor, load_codec.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"
__all__ = ["load", "build", "load_encoder", "load_processor", "load_codec", "BUNDLED_MODELS"]

_ASSETS = Path(__file__).parent / "assets"
# names that stand for checkpoints shipped inside the package
BUNDLED_MODELS = {"demo": _ASSETS / "demo"}


def _resolve(path) -> Path:
    """A bundled name, a local directory, or a Hugging Face hub id (`owner/name[@revision]`, resolved
    through the hub cache; see omnilm.convert.hub)."""
    if isinstance(path, str) and path in BUNDLED_MODELS:
        return BUNDLED_MODELS[path]
    from .convert.hub import is_hub_id, resolve

    if is_hub_id(path):
        return resolve(path)
    return Path(path)


def _dtype(dtype):
    import torch

    from .errors import ConfigError

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {', '.join(names)}")
    return names[dtype]


def load(path, device=None, dtype=None):
    """A model from a Hugging Face directory (llama, llava) or an OmniLM checkpoint directory."""
    from .convert.hf import load as _load

    return _load(_resolve(path), device=device, dtype=_dtype(dtype))


def build(preset="tiny", device=None, dtype=None, seed: int | None = 0):
    """A model with fresh weights from a preset name or a ModelConfig."""
    import torch

    from .config import ModelConfig, get_preset
    from .models.omni import OmniModel

    cfg = preset if isinstance(preset, ModelConfig) else get_preset(preset)
    if seed is not None:
        torch.manual_seed(seed)
    model = OmniModel(cfg).init_weights()
    model.hf_format = (
        "llama" if cfg.vision is None and cfg.audio is None and cfg.discrete is None else "omnilm"
    )
    return model.to(device=device, dtype=_dtype(dtype)).eval()


def load_encoder(path, device=None, dtype=None):
    """A vision (SigLIP/CLIP) or audio (Whisper/wav2vec2) encoder; encoder(x) -> last hidden state [B, N, D]."""
    from .convert.hf import read_config
    from .errors import CheckpointError

    path = _resolve(path)
    hf = read_config(path)
    model_type = hf.get("model_type")
    if model_type in ("siglip_vision_model", "clip_vision_model", "siglip", "clip"):
        from .convert.vision import load_vision_encoder

        return load_vision_encoder(path, hf, device=device, dtype=_dtype(dtype))
    if model_type in ("whisper", "wav2vec2"):
        from .convert.audio import load_audio_encoder

        return load_audio_encoder(path, hf, device=device, dtype=_dtype(dtype))
    raise CheckpointError(
        f"{path}/config.json: model_type {model_type!r} is not an encoder OmniLM loads "
        "(expected siglip_vision_model, clip_vision_model, whisper or wav2vec2)"
    )


def load_processor(path, tokenizer=None):
    """The processor of a model directory: text tokenizer plus image/audio preprocessing.

    A directory without tokenizer.json is an error naming what is missing (a default tokenizer would
    give a real model garbage) unless `tokenizer` is given: a directory (or hub id) holding one, or a
    TextTokenizer. Encoder directories (SigLIP/CLIP, Whisper/wav2vec2) need none: their processor
    reads images or audio, and its text side is the bundled default."""
    from .convert.files import has_tokenizer, require_tokenizer
    from .processing.multimodal import PROCESSOR_CONFIG, Processor, _model_config, _read_json
    from .processing.multimodal import load_processor as _load_processor

    path = _resolve(path)
    processor = _load_processor(path)  # configs are read (and refused) first
    if tokenizer is None:
        if not has_tokenizer(path) and not _is_encoder_dir(path):
            require_tokenizer(path)
        return processor
    from .tokenizers.text import TextTokenizer

    if not isinstance(tokenizer, TextTokenizer):
        tok_dir = _resolve(tokenizer)
        require_tokenizer(tok_dir, what="tokenizer directory")
        tokenizer = TextTokenizer.from_dir(tok_dir)
    # placeholder ids the directory names win; else they are the given tokenizer's (not the default's)
    meta = _read_json(path / PROCESSOR_CONFIG) or {}
    _, _, image_token_id, audio_token_id = _model_config(path)
    return Processor(
        tokenizer,
        image_processor=processor.image_processor,
        audio_processor=processor.audio_processor,
        tokens_per_image=processor.tokens_per_image,
        tokens_per_audio_window=processor.tokens_per_audio_window,
        image_token_id=meta.get("image_token_id", image_token_id),
        audio_token_id=meta.get("audio_token_id", audio_token_id),
        prompt_format=processor.prompt_format,
    )


def _is_encoder_dir(path) -> bool:
    import json

    f = Path(path) / "config.json"
    if (Path(path) / "omnilm_config.json").is_file() or not f.is_file():
        return False
    try:
        model_type = json.loads(f.read_text()).get("model_type")
    except (OSError, ValueError):
        return False
    return model_type in ("siglip_vision_model", "clip_vision_model", "siglip", "clip", "whisper", "wav2vec2")


def load_codec(path):
    """An image VQ-VAE or audio codec (OmniLM directory, or a Hugging Face EnCodec directory)."""
    from .convert.codec import load_codec as _load_codec

    return _load_codec(_resolve(path))

"""The public API's functions (load, build, load_encoder, load_processor, load_codec) and the model
methods registered for models/ (see hooks.py). Importing this module is cheap: torch and the layers
below are imported inside the functions."""

from __future__ import annotations

from pathlib import Path

from . import hooks

_ASSETS = Path(__file__).parent / "assets"
# names that stand for checkpoints shipped inside the package
BUNDLED_MODELS = {"demo": _ASSETS / "demo"}


def resolve(path) -> Path:
    """A bundled name, a local path, or a Hugging Face hub id `owner/name[@revision]` (convert/hub.py)."""
    if isinstance(path, str) and path in BUNDLED_MODELS:
        return BUNDLED_MODELS[path]
    from .convert.hub import local_path

    return local_path(path)


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


def load(path, device=None, dtype=None, quantize=None, check_weights: bool = False):
    """A model from a Hugging Face directory (llama, llava, ...), an OmniLM checkpoint directory or a
    compressed-tensors quantized directory; quantize="int8" (any scheme in omnilm.quant.SCHEMES)
    quantizes the decoder's linears after loading; check_weights: also refuse weights holding NaN or
    Inf (a scan of every tensor)."""
    from .convert.formats import load as _load
    from .convert.validate import checking_weights

    with checking_weights(check_weights):
        model = _load(resolve(path), device=device, dtype=_dtype(dtype))
    if quantize is not None:
        from .quant import quantize_model

        quantize_model(model, quantize)
    return model


def build(preset="tiny", device=None, dtype=None, seed: int | None = 0):
    """A model with fresh weights from a preset name or a ModelConfig."""
    import torch

    from .config import ModelConfig, get_preset
    from .models.builder import model_class

    cfg = preset if isinstance(preset, ModelConfig) else get_preset(preset)
    if seed is not None:
        torch.manual_seed(seed)
    model = model_class(cfg)(cfg).init_weights()
    return model.to(device=device, dtype=_dtype(dtype)).eval()


def _generate(model, input_ids, **settings):
    from .generation.generate import generate

    return generate(model, input_ids, **settings)


def _stream(model, input_ids, **settings):
    from .generation.generate import stream

    return stream(model, input_ids, **settings)


def _save_pretrained(model, path):
    from .convert.formats import save_pretrained

    return save_pretrained(model, path)


# model.generate / model.stream / model.save_pretrained (see omnilm/hooks.py)
hooks.MODEL_METHODS.update(generate=_generate, stream=_stream, save_pretrained=_save_pretrained)


def load_encoder(path, device=None, dtype=None):
    """A vision (SigLIP/CLIP) or audio (Whisper/wav2vec2) encoder; encoder(x) -> last hidden state [B, N, D]."""
    from .convert.hf import read_config
    from .errors import CheckpointError

    path = resolve(path)
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
    """The processor of a model directory: text tokenizer plus image/audio preprocessing. A directory
    without a tokenizer is an error unless `tokenizer` (a directory, hub id or TextTokenizer) is given."""
    from .processing.loading import load_processor as _load_processor
    from .processing.mllama import MllamaProcessor, is_mllama_dir

    path = resolve(path)
    if is_mllama_dir(path):  # Llama-3.2-Vision, or a model composed with cross-attention
        return MllamaProcessor.from_pretrained(
            path, resolve(tokenizer) if isinstance(tokenizer, str) else tokenizer
        )
    model_type = _model_type(path)
    if model_type in ("qwen2_audio", "emu3"):
        from .processing.loading import require_own_tokenizer

        require_own_tokenizer(path, tokenizer, model_type)
    if model_type == "qwen2_audio":  # families whose prompts follow their own rules
        from .processing.qwen2_audio import Qwen2AudioProcessor

        return Qwen2AudioProcessor.from_pretrained(path)
    if model_type == "emu3":
        from .processing.emu3 import Emu3Processor

        return Emu3Processor.from_pretrained(path)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = resolve(tokenizer)
    return _load_processor(path, tokenizer=tokenizer)


def _model_type(path) -> str | None:
    """config.json's model_type, or None (unreadable configs are reported by the loader that needs them)."""
    import json

    f = Path(path) / "config.json"
    try:
        return json.loads(f.read_text()).get("model_type") if f.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, RecursionError):
        return None


def load_codec(path):
    """An image VQ-VAE or audio codec (OmniLM directory, or a Hugging Face EnCodec directory)."""
    from .convert.codec import load_codec as _load_codec

    return _load_codec(resolve(path))

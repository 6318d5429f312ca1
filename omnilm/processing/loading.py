"""`omnilm.load_processor` with its tokenizer checked: a model directory without tokenizer.json is an
error naming what is missing, unless a tokenizer is given. The bundled default tokenizer would
otherwise stand in silently, and a real model (a Llama) would read garbage ids.

Encoder directories (SigLIP/CLIP, Whisper/wav2vec2) need no tokenizer of their own: their processor
reads images or audio and its text side is the bundled default.
"""

from __future__ import annotations

from pathlib import Path

from ..convert.files import has_tokenizer, require_tokenizer
from ..tokenizers.text import TextTokenizer
from . import multimodal

ENCODER_TYPES = ("siglip_vision_model", "clip_vision_model", "siglip", "clip", "whisper", "wav2vec2")


def load_processor(path, tokenizer=None) -> multimodal.Processor:
    """path: a model directory. tokenizer: None (the directory's own, required), a directory holding
    tokenizer.json, or a TextTokenizer."""
    path = Path(path)
    processor = multimodal.load_processor(path)  # configs are read (and refused) first
    if tokenizer is None:
        if not has_tokenizer(path) and not _is_encoder_dir(path):
            require_tokenizer(path)
        return processor
    if not isinstance(tokenizer, TextTokenizer):
        require_tokenizer(tokenizer, what="tokenizer directory")
        tokenizer = TextTokenizer.from_dir(tokenizer)
    # placeholder counts and ids from the directory's configs; the ones they leave open, the tokenizer's
    cfg = multimodal._model_config(path)
    meta = multimodal._read_json(path / multimodal.PROCESSOR_CONFIG) or {}
    return multimodal.Processor.from_model_config(
        cfg,
        tokenizer,
        processor.image_processor,
        processor.audio_processor,
        meta=meta,
        source=str(path / multimodal.PROCESSOR_CONFIG),
    )


def require_own_tokenizer(path, tokenizer, model_type: str) -> None:
    """Families with their own processor (qwen2_audio, emu3) read the directory's tokenizer only."""
    if tokenizer is not None:
        from ..errors import ConfigError

        raise ConfigError(
            f"{path}: a {model_type} processor reads its own directory's tokenizer; copy the tokenizer "
            "files into the model directory instead of passing one"
        )
    require_tokenizer(path)


def _is_encoder_dir(path: Path) -> bool:
    if (path / "omnilm_config.json").is_file():
        return False
    hf = multimodal._read_json(path / "config.json") or {}
    return hf.get("model_type") in ENCODER_TYPES

"""Audio encoders behind one interface, plus the projector to the decoder width.

`build_audio_tower(cfg)` gives a module mapping one batch of windows to encoder frames (N, frames, D):
Whisper takes log-mel features (N, n_mels, 3000) made by `LogMel`; wav2vec2 takes the raw 16 kHz
waveform (N, samples). `build_audio_projector` stacks `cfg.projector_stack` frames per decoder token.
"""

from __future__ import annotations

from torch import nn

from ...config import AudioConfig
from ..projector import FrameStackProjector
from .logmel import LogMel, mel_filter_bank
from .qwen2_audio import Qwen2AudioEncoder, Qwen2AudioProjector
from .wav2vec2 import Wav2Vec2Encoder
from .whisper import WhisperEncoder

__all__ = [
    "LogMel",
    "Qwen2AudioEncoder",
    "Qwen2AudioProjector",
    "Wav2Vec2Encoder",
    "WhisperEncoder",
    "build_audio_projector",
    "build_audio_tower",
    "mel_filter_bank",
]


def build_audio_tower(cfg: AudioConfig) -> nn.Module:
    if cfg.kind == "whisper":
        return WhisperEncoder(cfg)
    if cfg.kind == "qwen2_audio":
        return Qwen2AudioEncoder(cfg)
    return Wav2Vec2Encoder(cfg)  # AudioConfig validated kind


def build_audio_projector(cfg: AudioConfig, decoder_hidden: int) -> nn.Module:
    if cfg.kind == "qwen2_audio":
        return Qwen2AudioProjector(cfg.hidden_size, decoder_hidden)
    return FrameStackProjector(cfg.hidden_size, decoder_hidden, stack=cfg.projector_stack)

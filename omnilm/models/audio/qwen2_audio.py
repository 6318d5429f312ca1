"""Qwen2-Audio: a Whisper-large-style encoder with an average pool, a linear projector, a Qwen2 decoder.

The encoder is Whisper's (conv1, conv2 with stride 2, fixed sinusoidal positions, pre-norm layers)
over a full 30 s window of 3000 mel frames, with two changes (transformers' Qwen2AudioEncoder):
keys past a short clip's frames are masked in every layer, and an average pool (kernel 2, stride 2)
halves the 1500 frames to 750 before the final LayerNorm. A clip of L mel frames then fills
`output_lengths(L)` decoder tokens; the rest of its 750 rows are dropped. Parameter names are
transformers' (`audio_tower.*`, `multi_modal_projector.linear.*` becomes `audio_projector.linear.*`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import AudioConfig
from ...errors import ConfigError
from .whisper import WhisperEncoder, WhisperEncoderLayer


def output_lengths(mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder frames after conv2, decoder tokens after the pool) for clips of mel_lengths frames."""
    frames = (mel_lengths - 1) // 2 + 1
    return frames, (frames - 2) // 2 + 1


class Qwen2AudioEncoderLayer(WhisperEncoderLayer):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # x (B, T, D)
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x)), approximate=self.approximate))


class Qwen2AudioEncoder(WhisperEncoder):
    """log-mel (N, n_mels, 3000) and feature_attention_mask (N, 3000) -> (N, 750, D)."""

    def __init__(self, cfg: AudioConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleList(Qwen2AudioEncoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor | None = None):
        n_frames = 2 * self.embed_positions.num_embeddings
        if input_features.dim() != 3 or input_features.shape[1:] != (self.config.num_mel_bins, n_frames):
            raise ConfigError(
                f"Qwen2-Audio encoder expects log-mel features (N, {self.config.num_mel_bins}, {n_frames}) "
                f"padded to 30 s, got shape {tuple(input_features.shape)}"
            )
        x = F.gelu(self.conv1(input_features.to(self.conv1.weight.dtype)))  # (N, D, 3000)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (N, 1500, D)
        x = x + self.embed_positions.weight.to(x.dtype)
        mask = None
        if feature_attention_mask is not None:  # keys past each clip's frames are hidden from every query
            frames, _ = output_lengths(feature_attention_mask.sum(-1))
            mask = (torch.arange(x.shape[1], device=x.device)[None] < frames[:, None].to(x.device))[
                :, None, None
            ]
        for layer in self.layers:
            x = layer(x, mask)  # (N, 1500, D)
        x = F.avg_pool1d(x.transpose(1, 2), kernel_size=2, stride=2).transpose(1, 2)  # (N, 750, D)
        return self.layer_norm(x)


class Qwen2AudioProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

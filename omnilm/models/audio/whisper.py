"""Whisper-style audio encoder: log-mel (B, n_mels, 3000) -> (B, 1500, D).

Two convolutions with GELU (the second halves the frame rate to 50 Hz), fixed sinusoidal positions,
pre-norm transformer layers and a final LayerNorm. Parameter names are those of Hugging Face's
`WhisperEncoder`, so its keys load with the `encoder.` prefix removed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...config import AudioConfig
from ...errors import ConfigError
from ..common.attention import EncoderAttention
from ..common.norms import LayerNorm


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's position table (length, channels): sin of every timescale, then cos of every timescale."""
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2, dtype=torch.float32))
    scaled_time = (
        torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    )  # (length, channels/2)
    return torch.cat([scaled_time.sin(), scaled_time.cos()], dim=1)


class WhisperEncoderLayer(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        d = cfg.hidden_size
        self.self_attn = EncoderAttention(
            d, cfg.num_heads, bias=True, k_bias=False
        )  # Whisper's k_proj has no bias
        self.self_attn_layer_norm = LayerNorm(d, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(d, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, d)
        self.final_layer_norm = LayerNorm(d, eps=cfg.layer_norm_eps)
        self.approximate = "tanh" if cfg.activation == "gelu_new" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, D)
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x)), approximate=self.approximate))


class WhisperEncoder(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        # A fixed table stored as a weight, as Hugging Face checkpoints hold it; never trained.
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.reset_fixed_parameters()
        self.embed_positions.requires_grad_(False)
        self.layers = nn.ModuleList(WhisperEncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.layer_norm = LayerNorm(d, eps=cfg.layer_norm_eps)

    def reset_fixed_parameters(self):
        with torch.no_grad():
            w = self.embed_positions.weight
            w.copy_(sinusoids(w.shape[0], w.shape[1]).to(w.dtype))

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:  # (B, n_mels, n_frames)
        if input_features.dim() != 3 or input_features.shape[1] != self.config.num_mel_bins:
            raise ConfigError(
                f"Whisper encoder expects log-mel features (B, {self.config.num_mel_bins}, frames), "
                f"got shape {tuple(input_features.shape)}"
            )
        dtype = self.conv1.weight.dtype
        x = F.gelu(self.conv1(input_features.to(dtype)))  # (B, D, n_frames)
        x = F.gelu(self.conv2(x))  # (B, D, n_frames / 2)
        x = x.transpose(1, 2)  # (B, T, D)
        T = x.shape[1]
        if T > self.embed_positions.num_embeddings:
            raise ConfigError(
                f"{input_features.shape[-1]} mel frames give {T} encoder frames, more than "
                f"max_source_positions {self.embed_positions.num_embeddings}; cut audio into 30 s windows"
            )
        x = x + self.embed_positions.weight[:T].to(x.dtype)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)  # (B, T, D)

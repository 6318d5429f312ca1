"""Projectors from encoder features to the decoder width."""

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


class MLPProjector(nn.Module):
    """LLaVA's multi_modal_projector: linear_1 -> GELU -> linear_2, optionally after a pixel shuffle.

    Pixel shuffle (factor s) folds each s x s block of patch features into one token of s*s times the
    width, cutting the token count by s*s (s=2: by 4) before the MLP.
    """

    def __init__(self, in_dim: int, out_dim: int, pixel_shuffle: int = 1, bias: bool = True):
        super().__init__()
        self.pixel_shuffle = pixel_shuffle
        self.linear_1 = nn.Linear(in_dim * pixel_shuffle**2, out_dim, bias=bias)
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, N, in_dim)
        if self.pixel_shuffle > 1:
            x = pixel_shuffle(x, self.pixel_shuffle)
        return self.linear_2(F.gelu(self.linear_1(x)))

    def num_tokens(self, n_features: int) -> int:
        return n_features // self.pixel_shuffle**2


def pixel_shuffle(x: torch.Tensor, s: int) -> torch.Tensor:
    """(B, N, D) patch grid (N a square) -> (B, N / s^2, D * s^2)."""
    B, N, D = x.shape
    side = int(round(N**0.5))
    if side * side != N or side % s:
        raise ConfigError(f"pixel shuffle needs a square grid divisible by {s}, got {N} tokens")
    x = x.view(B, side // s, s, side // s, s, D)  # (B, h, s, w, s, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, h, w, s, s, D)
    return x.reshape(B, (side // s) ** 2, s * s * D)


class FrameStackProjector(nn.Module):
    """Audio projector: stack k adjacent frames, then a 2-layer GELU MLP to the decoder width.

    With a fixed frame rate this gives a known number of tokens per second of audio, so the
    processor can place the right number of placeholders before the forward pass.
    """

    def __init__(self, in_dim: int, out_dim: int, stack: int = 4, bias: bool = True):
        super().__init__()
        self.stack = stack
        self.linear_1 = nn.Linear(in_dim * stack, out_dim, bias=bias)
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, in_dim)
        B, T, D = x.shape
        T = T - T % self.stack  # drop a ragged tail of fewer than `stack` frames
        x = x[:, :T].reshape(B, T // self.stack, self.stack * D)  # (B, T/k, k*D)
        return self.linear_2(F.gelu(self.linear_1(x)))

    def num_tokens(self, n_frames: int) -> int:
        return n_frames // self.stack

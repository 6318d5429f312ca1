"""Vector quantizers: one EMA codebook (VQ-VAE-2 style updates), and a residual stack of them (SoundStream).

Inputs are channel-last, (..., dim). The codebook is not trained by gradients: it follows an exponential
moving average of the encoder outputs assigned to each code, which is more stable than the codebook loss
of the original VQ-VAE. The encoder is pulled towards its codes by the commitment loss, and gradients
pass through the quantization with the straight-through estimator. Buffer names (`embed`,
`cluster_size`, `embed_avg`) follow EnCodec's codebook so the two read alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (..., dim), straight-through: value of the codes, gradient of the input
    codes: torch.Tensor  # (...,) int64, or (n_q, ...) for ResidualVQ
    loss: torch.Tensor  # commitment loss (scalar), already weighted by beta
    usage: float  # fraction of codes hit in this batch (first codebook for ResidualVQ)


class VectorQuantizer(nn.Module):
    def __init__(
        self,
        codebook_size: int,
        dim: int,
        decay: float = 0.99,
        beta: float = 0.25,
        dead_code_threshold: float = 1.0,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.codebook_size = codebook_size
        self.dim = dim
        self.decay = decay
        self.beta = beta
        self.dead_code_threshold = dead_code_threshold
        self.eps = eps
        self.register_buffer("embed", torch.randn(codebook_size, dim))
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed_avg", self.embed.clone())
        # 0 until the first training batch seeds the codebook from encoder outputs.
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of x (N, dim)."""
        # ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2; ||x||^2 does not change the argmin.
        dist = -2 * x @ self.embed.t() + self.embed.pow(2).sum(1)  # (N, K)
        return dist.argmin(dim=-1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return F.embedding(codes, self.embed)  # (..., dim)

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        flat = x.reshape(-1, self.dim)  # (N, dim)
        if self.training and not bool(self.initialized):
            self._seed(flat.detach())
        codes = self.quantize(flat.detach())
        quantized = self.lookup(codes).view_as(x)
        if self.training:
            self._ema_update(flat.detach(), codes)
        loss = self.beta * F.mse_loss(x, quantized.detach())
        quantized = x + (quantized - x).detach()  # straight-through estimator
        usage = codes.unique().numel() / self.codebook_size
        return QuantizerOutput(quantized, codes.view(x.shape[:-1]), loss, usage)

    @torch.no_grad()
    def _seed(self, flat: torch.Tensor):
        # Codes drawn from the first batch start inside the data's range, so none are born dead.
        self.embed.copy_(_sample_rows(flat, self.codebook_size))
        self.embed_avg.copy_(self.embed)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor):
        onehot = F.one_hot(codes, self.codebook_size).type(flat.dtype)  # (N, K)
        self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(onehot.t() @ flat, alpha=1 - self.decay)
        # Laplace smoothing keeps codes with a tiny count from dividing by ~0.
        n = self.cluster_size.sum()
        size = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embed.copy_(self.embed_avg / size.unsqueeze(1))
        self.restart_dead_codes(flat)

    @torch.no_grad()
    def restart_dead_codes(self, flat: torch.Tensor) -> int:
        """Re-seed codes whose EMA count fell below the threshold with encodings of the current batch."""
        dead = self.cluster_size < self.dead_code_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        new = _sample_rows(flat, n_dead)
        self.embed[dead] = new
        self.embed_avg[dead] = new * self.dead_code_threshold
        self.cluster_size[dead] = self.dead_code_threshold
        return n_dead


def _sample_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """n rows of x at random (with replacement when x has fewer), with a little noise so repeats differ."""
    if x.shape[0] >= n:
        idx = torch.randperm(x.shape[0], device=x.device)[:n]
    else:
        idx = torch.randint(0, x.shape[0], (n,), device=x.device)
    rows = x[idx]
    return rows + 1e-3 * rows.std() * torch.randn_like(rows)


class ResidualVQ(nn.Module):
    """n_q quantizers in sequence, each coding what the previous ones left over (SoundStream, EnCodec)."""

    def __init__(self, n_q: int, codebook_size: int, dim: int, **kwargs):
        super().__init__()
        self.layers = nn.ModuleList([VectorQuantizer(codebook_size, dim, **kwargs) for _ in range(n_q)])

    @property
    def n_q(self) -> int:
        return len(self.layers)

    def forward(self, x: torch.Tensor, n_q: int | None = None) -> QuantizerOutput:
        residual = x
        quantized = torch.zeros_like(x)
        codes, losses, usage = [], [], None
        for layer in self.layers[: n_q or self.n_q]:
            out = layer(residual)
            q = out.quantized.detach()  # the code vectors' value
            residual = residual - q
            quantized = quantized + q
            codes.append(out.codes)
            losses.append(out.loss)
            usage = out.usage if usage is None else usage
        # One straight-through for the whole stack, so the encoder's gradient is not counted n_q times.
        quantized = x + (quantized - x).detach()
        return QuantizerOutput(quantized, torch.stack(codes), torch.stack(losses).sum(), usage)

    def encode(self, x: torch.Tensor, n_q: int | None = None) -> torch.Tensor:
        """(..., dim) -> codes (n_q, ...)."""
        residual, codes = x, []
        for layer in self.layers[: n_q or self.n_q]:
            c = layer.quantize(residual.reshape(-1, layer.dim)).view(residual.shape[:-1])
            residual = residual - layer.lookup(c)
            codes.append(c)
        return torch.stack(codes)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (n_q, ...) -> (..., dim), the sum of each stage's code vectors."""
        return sum(layer.lookup(c) for layer, c in zip(self.layers, codes))

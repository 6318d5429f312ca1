"""VQ-VAE image tokenizer: a conv encoder to a grid of vectors, an EMA codebook, a conv decoder back.

Pixels are in [-1, 1] (the tokenizer wrapper converts PIL images). An image of image_size^2 pixels
becomes grid_size^2 codes, grid_size = image_size / downsample; the unified model writes those codes
row-major as image tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ImageVQConfig
from ...errors import MediaError
from .quantizers import VectorQuantizer


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class Encoder(nn.Module):
    def __init__(self, cfg: ImageVQConfig):
        super().__init__()
        levels = int(math.log2(cfg.downsample))
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        blocks = []
        for _ in range(levels):
            blocks += [ResBlock(ch) for _ in range(cfg.num_res_blocks)]
            blocks += [nn.SiLU(), nn.Conv2d(ch, ch * 2, 4, stride=2, padding=1)]  # halves H and W
            ch *= 2
        blocks += [ResBlock(ch) for _ in range(cfg.num_res_blocks)]
        self.blocks = nn.Sequential(*blocks)
        self.conv_out = nn.Conv2d(ch, cfg.code_dim, 1)

    def forward(self, x):
        return self.conv_out(F.silu(self.blocks(self.conv_in(x))))  # (B, code_dim, h, w)


class Decoder(nn.Module):
    def __init__(self, cfg: ImageVQConfig):
        super().__init__()
        levels = int(math.log2(cfg.downsample))
        ch = cfg.channels * 2**levels
        self.conv_in = nn.Conv2d(cfg.code_dim, ch, 3, padding=1)
        blocks = [ResBlock(ch) for _ in range(cfg.num_res_blocks)]
        for _ in range(levels):
            blocks += [nn.SiLU(), nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1)]  # doubles H and W
            ch //= 2
            blocks += [ResBlock(ch) for _ in range(cfg.num_res_blocks)]
        self.blocks = nn.Sequential(*blocks)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z):
        return self.conv_out(F.silu(self.blocks(self.conv_in(z))))  # (B, C, H, W)


@dataclass
class VQOutput:
    reconstruction: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor  # reconstruction MSE + commitment
    recon_loss: torch.Tensor
    usage: float


class ImageVQVAE(nn.Module):
    kind = "image_vq"

    def __init__(self, cfg: ImageVQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(
            cfg.codebook_size,
            cfg.code_dim,
            decay=cfg.ema_decay,
            beta=cfg.commitment_beta,
            dead_code_threshold=cfg.dead_code_threshold,
        )
        self.decoder = Decoder(cfg)

    def forward(self, x: torch.Tensor) -> VQOutput:
        z = self.encoder(x).permute(0, 2, 3, 1)  # (B, h, w, code_dim)
        q = self.quantizer(z)
        recon = self.decoder(q.quantized.permute(0, 3, 1, 2))  # (B, C, H, W)
        recon_loss = F.mse_loss(recon, x)
        return VQOutput(recon, q.codes, recon_loss + q.loss, recon_loss, q.usage)

    def _check(self, x: torch.Tensor):
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise MediaError(f"expected images [B, {cfg.in_channels}, H, W], got shape {tuple(x.shape)}")
        if x.shape[2] % cfg.downsample or x.shape[3] % cfg.downsample:
            raise MediaError(
                f"image side {tuple(x.shape[2:])} is not a multiple of downsample {cfg.downsample}"
            )

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> codes (B, H / downsample, W / downsample)."""
        self._check(x)
        p = next(self.parameters())
        z = self.encoder(x.to(p.device, p.dtype)).permute(0, 2, 3, 1)  # (B, h, w, code_dim)
        return self.quantizer.quantize(z.reshape(-1, z.shape[-1])).view(z.shape[:-1])

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> images (B, C, h * downsample, w * downsample) in [-1, 1]."""
        if codes.dim() != 3:
            raise MediaError(f"expected image codes [B, h, w], got shape {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size):
            raise MediaError(
                f"image codes must be in [0, {self.config.codebook_size}), got "
                f"[{int(codes.min())}, {int(codes.max())}]"
            )
        z = self.quantizer.lookup(codes.to(self.quantizer.embed.device)).permute(
            0, 3, 1, 2
        )  # (B, code_dim, h, w)
        return self.decoder(z).clamp(-1, 1)

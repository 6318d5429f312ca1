"""Emu3's image VQ-VAE (transformers' Emu3VQVAE) as an OmniLM image codec.

A MoVQ-style autoencoder built for video: a 2D conv encoder (ResNet blocks, stride-2 downsampling,
self-attention at the deepest levels), then temporal layers over a clip of frames (Conv3d
downsampling and BatchNorm3d ResNet blocks), and the mirror-image decoder whose norms are
"spatial norms" conditioned on the quantized codes. An image is a clip of
`temporal_downsample_factor` copies of itself, which the temporal layers fold into one latent frame.
Parameter names are transformers' so `model.vqmodel.*` keys load by prefix.

    codes = vq.encode(pixels)   # (B, 3, H, W) in [-1, 1] -> (B, H / f, W / f) ints, f = 2 ** (levels - 1)
    pixels = vq.decode(codes)   # -> (B, 3, H, W)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError


@dataclass
class Emu3VQConfig:
    """transformers' Emu3VQVAEConfig fields (its defaults are Emu3's released tokenizer)."""

    codebook_size: int = 32768
    embed_dim: int = 4
    latent_channels: int = 4
    double_latent: bool = False
    in_channels: int = 3
    out_channels: int = 3
    temporal_downsample_factor: int = 4
    base_channels: int = 256
    channel_multiplier: list[int] = field(default_factory=lambda: [1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [3])
    hidden_size: int = 1024
    num_attention_heads: int = 1

    def __post_init__(self):
        self.channel_multiplier = list(self.channel_multiplier)
        self.attn_resolutions = list(self.attn_resolutions or [])
        if self.temporal_downsample_factor < 1 or self.temporal_downsample_factor & (
            self.temporal_downsample_factor - 1
        ):
            raise ConfigError(
                f"temporal_downsample_factor must be a power of 2, got {self.temporal_downsample_factor}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("Emu3 VQ hidden_size must be divisible by num_attention_heads")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.channel_multiplier) - 1)


def _swish(x):
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class Conv3d(nn.Module):
    """Conv3d causal in time (two frames of left padding), 'same' padding in space."""

    def __init__(self, c_in: int, c_out: int, kernel_size: tuple, stride: tuple):
        super().__init__()
        self.padding = ()
        for k, s in reversed(list(zip(kernel_size[1:], stride[1:]))):
            self.padding += ((k - s) // 2 + (k - s) % 2, (k - s) // 2)
        self.padding += (2, 0)
        self.conv = nn.Conv3d(c_in, c_out, kernel_size, stride=stride)

    def forward(self, x):  # (B, C, T, H, W)
        return self.conv(F.pad(x, self.padding))


class SpatialNorm(nn.Module):
    """GroupNorm whose scale and shift come from the quantized codes (resized to the features)."""

    def __init__(self, quant_channels: int, channels: int):
        super().__init__()
        self.norm_layer = group_norm(channels)
        self.conv_y = nn.Conv2d(quant_channels, channels, 1)
        self.conv_b = nn.Conv2d(quant_channels, channels, 1)

    def forward(self, x, quant):
        quant = F.interpolate(quant, size=x.shape[-2:], mode="nearest")
        return self.norm_layer(x) * self.conv_y(quant) + self.conv_b(quant)


class QuantNorm(nn.GroupNorm):
    """Plain GroupNorm that takes (and ignores) the codes, so encoder and decoder blocks share code."""

    def forward(self, x, quant=None):
        return super().forward(x)


def _norm(channels: int, quant_channels: int | None) -> nn.Module:
    if quant_channels is None:
        return QuantNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)
    return SpatialNorm(quant_channels, channels)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int | None = None, quant_channels: int | None = None):
        super().__init__()
        c_out = c_in if c_out is None else c_out
        self.norm1 = _norm(c_in, quant_channels)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, quant_channels)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x, quant=None):
        h = self.conv1(_swish(self.norm1(x, quant)))
        h = self.conv2(_swish(self.norm2(h, quant)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class TemporalResnetBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.BatchNorm3d(channels)
        self.conv1 = Conv3d(channels, channels, (3, 3, 3), (1, 1, 1))
        self.norm2 = nn.BatchNorm3d(channels)
        self.conv2 = Conv3d(channels, channels, (3, 3, 3), (1, 1, 1))

    def forward(self, x):  # (B, C, T, H, W)
        return x + self.conv2(_swish(self.norm2(self.conv1(_swish(self.norm1(x))))))


class AttentionBlock(nn.Module):
    def __init__(self, cfg: Emu3VQConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.q_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):  # (B, N, D)
        B, N, D = x.shape
        q, k, v = (
            p(x).view(B, N, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D))


def _attend(attn, norm, x, quant=None):
    """Residual self-attention over the H x W positions of x (B, C, H, W)."""
    B, C, H, W = x.shape
    h = norm(x, quant).view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
    return x + attn(h).reshape(B, H, W, C).permute(0, 3, 1, 2)


class MiddleBlock(nn.Module):
    def __init__(self, cfg: Emu3VQConfig, channels: int, quant_channels: int | None = None):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, quant_channels)
        self.attn_1 = AttentionBlock(cfg)
        self.attn_norm = _norm(channels, quant_channels)
        self.block_2 = ResnetBlock(channels, channels, quant_channels)

    def forward(self, x, quant=None):
        x = _attend(self.attn_1, self.attn_norm, self.block_1(x, quant), quant)
        return self.block_2(x, quant)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks, attn, attn_norms) -> nn.Module:
    level = nn.Module()
    level.block, level.attn, level.attn_norms = blocks, attn, attn_norms
    return level


class DownBlock(nn.Module):
    def __init__(self, cfg: Emu3VQConfig):
        super().__init__()
        mult_in = [1] + cfg.channel_multiplier
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.channel_multiplier):
            c_in, c_out = cfg.base_channels * mult_in[i], cfg.base_channels * mult
            blocks, attn, norms = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c_in, c_out))
                c_in = c_out
                if i in cfg.attn_resolutions:
                    attn.append(AttentionBlock(cfg))
                    norms.append(QuantNorm(num_groups=32, num_channels=c_in, eps=1e-6, affine=True))
            level = _level(blocks, attn, norms)
            if i != len(cfg.channel_multiplier) - 1:
                level.downsample = Downsample(c_in)
            self.down.append(level)

    def forward(self, x):
        for level in self.down:
            for j, block in enumerate(level.block):
                x = block(x)
                if len(level.attn):
                    x = _attend(level.attn[j], level.attn_norms[j], x)
            if hasattr(level, "downsample"):
                x = level.downsample(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, cfg: Emu3VQConfig):
        super().__init__()
        q = cfg.embed_dim
        c_in = cfg.base_channels * cfg.channel_multiplier[-1]
        self.up = nn.ModuleList()
        for i in reversed(range(len(cfg.channel_multiplier))):
            c_out = cfg.base_channels * cfg.channel_multiplier[i]
            blocks, attn, norms = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c_in, c_out, q))
                c_in = c_out
                if i in cfg.attn_resolutions:
                    attn.append(AttentionBlock(cfg))
                    norms.append(SpatialNorm(q, c_in))
            level = _level(blocks, attn, norms)
            if i != 0:
                level.upsample = Upsample(c_in)
            self.up.insert(0, level)  # up[i] is level i, run deepest first

    def forward(self, x, quant):
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                x = block(x, quant)
                if len(level.attn):
                    x = _attend(level.attn[j], level.attn_norms[j], x, quant)
            if hasattr(level, "upsample"):
                x = level.upsample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: Emu3VQConfig):
        super().__init__()
        c = cfg.base_channels * cfg.channel_multiplier[-1]
        out = 2 * cfg.latent_channels if cfg.double_latent else cfg.latent_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        self.down_block = DownBlock(cfg)
        self.middle_block = MiddleBlock(cfg, c)
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, out, 3, padding=1)
        n_time = int(math.log2(cfg.temporal_downsample_factor))
        self.time_conv = nn.ModuleList(_TemporalDown(out) for _ in range(n_time))
        self.time_res_stack = nn.ModuleList(TemporalResnetBlock(out) for _ in range(cfg.num_res_blocks))

    def forward(self, frames):  # (B, T, C, H, W)
        B, T = frames.shape[:2]
        x = self.middle_block(self.down_block(self.conv_in(frames.flatten(0, 1))))
        x = self.conv_out(_swish(self.norm_out(x)))  # (B T, C', h, w)
        x = x.reshape(B, T, *x.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, C', T, h, w)
        for conv in self.time_conv:
            x = _swish(conv(x))
        for block in self.time_res_stack:
            x = block(x)
        return x.permute(0, 2, 1, 3, 4)  # (B, T / factor, C', h, w)


class _TemporalDown(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv3d(channels, channels, (4, 3, 3), (2, 1, 1))

    def forward(self, x):
        return self.conv(x)


class _TemporalUp(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv3d(channels, channels, (3, 3, 3), (1, 1, 1))

    def forward(self, x):  # (B, C, T, H, W): nearest x2 in time
        return self.conv(x.repeat_interleave(2, dim=2))


class Decoder(nn.Module):
    def __init__(self, cfg: Emu3VQConfig):
        super().__init__()
        q, lat = cfg.embed_dim, cfg.latent_channels
        c = cfg.base_channels * cfg.channel_multiplier[-1]
        self.time_res_stack = nn.ModuleList(TemporalResnetBlock(lat) for _ in range(cfg.num_res_blocks))
        n_time = int(math.log2(cfg.temporal_downsample_factor))
        self.time_conv = nn.ModuleList(_TemporalUp(lat) for _ in range(n_time))
        self.conv_in = nn.Conv2d(lat, c, 3, padding=1)
        self.middle_block = MiddleBlock(cfg, c, quant_channels=q)
        self.up_block = UpBlock(cfg)
        c0 = cfg.base_channels * cfg.channel_multiplier[0]
        self.norm_out = SpatialNorm(q, c0)
        self.conv_out = nn.Conv2d(c0, cfg.out_channels, 3, padding=1)

    def forward(self, x, quant):  # both (B, T, C, h, w): post-quant latents and the codes' vectors
        xq = torch.cat((x, quant), dim=0).permute(0, 2, 1, 3, 4)  # (2B, C, T, h, w), shared temporal layers
        for block in self.time_res_stack:
            xq = block(xq)
        for conv in self.time_conv:
            xq = _swish(conv(xq))
        x, quant = xq.permute(0, 2, 1, 3, 4).chunk(2, dim=0)  # (B, T', C, h, w) each
        x, quant = x.flatten(0, 1), quant.flatten(0, 1)
        x = self.up_block(self.middle_block(self.conv_in(x), quant), quant)
        return self.conv_out(_swish(self.norm_out(x, quant)))  # (B T', C_out, H, W)


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: Emu3VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.embed_dim)

    def forward(self, z):  # (B, T, C, h, w) -> nearest code ids (B, T, h, w)
        B, T, C, H, W = z.shape
        flat = z.permute(0, 1, 3, 4, 2).reshape(-1, C)
        w = self.embedding.weight
        # the expansion transformers uses, so ties and rounding pick the same code
        d = flat.pow(2).sum(1, keepdim=True) + w.pow(2).sum(1) - 2 * flat @ w.t()
        return d.argmin(1).view(B, T, H, W)


class Emu3VQVAE(nn.Module):
    kind = "emu3_vq"

    def __init__(self, cfg: Emu3VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = Conv3d(cfg.latent_channels, cfg.embed_dim, (3, 1, 1), (1, 1, 1))
        self.post_quant_conv = Conv3d(cfg.embed_dim, cfg.latent_channels, (3, 1, 1), (1, 1, 1))

    def train(self, mode: bool = True):
        """Always eval: the tokenizer is frozen, and BatchNorm3d in training mode would change the codes."""
        return super().train(False)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1], H and W multiples of the spatial factor -> codes (B, H / f, W / f)."""
        f = self.config.spatial_factor
        if (
            pixels.dim() != 4
            or pixels.shape[1] != self.config.in_channels
            or pixels.shape[-1] % f
            or pixels.shape[-2] % f
        ):
            raise ConfigError(
                f"Emu3 VQ encode expects (B, {self.config.in_channels}, H, W) with H and W multiples of {f}, "
                f"got {tuple(pixels.shape)}"
            )
        p = self.quant_conv.conv.weight
        frames = pixels.to(p.dtype)[:, None].repeat(1, self.config.temporal_downsample_factor, 1, 1, 1)
        z = self.encoder(frames).permute(0, 2, 1, 3, 4)  # (B, C, 1, h, w)
        z = self.quant_conv(z).permute(0, 2, 1, 3, 4)  # (B, 1, C, h, w)
        return self.quantize(z)[:, 0]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> pixels (B, 3, h f, w f), roughly in [-1, 1] (the first decoded frame)."""
        n = self.config.codebook_size
        if codes.dim() != 3:
            raise ConfigError(f"Emu3 VQ decode expects codes (B, h, w), got shape {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= n):
            raise ConfigError(
                f"codes outside the codebook: values range {int(codes.min())}..{int(codes.max())}, "
                f"the codebook has ids 0..{n - 1}"
            )
        B, h, w = codes.shape
        quant = self.quantize.embedding(codes.long()).permute(0, 3, 1, 2)[:, :, None]  # (B, C, 1, h, w)
        post = self.post_quant_conv(quant).permute(0, 2, 1, 3, 4)  # (B, 1, C, h, w)
        video = self.decoder(post, quant.permute(0, 2, 1, 3, 4))  # (B T', 3, H, W)
        video = video.reshape(B, -1, *video.shape[1:])
        return video[:, 0]

"""wav2vec 2.0-style audio encoder: raw 16 kHz waveform (B, samples) -> (B, frames, D).

A stack of strided 1-D convolutions turns the waveform into ~50 Hz frames (base: 320x downsampling),
a feature projection maps them to the model width, a grouped convolution adds relative position
information, and a transformer encodes them: post-norm layers (base) or pre-norm layers with a final
LayerNorm ("stable layer norm", large-lv60). Parameter names are those of Hugging Face's
`Wav2Vec2Model`, so its keys load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import AudioConfig
from ...errors import ConfigError
from ..common.attention import EncoderAttention
from ..common.norms import LayerNorm


class ConvLayer(nn.Module):
    """conv -> optional norm over channels -> GELU. `norm`: None, "group" (one group per channel) or "layer"."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int, bias: bool, norm: str | None):
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, kernel_size=kernel, stride=stride, bias=bias)
        self.norm = norm
        if norm == "group":
            self.layer_norm = nn.GroupNorm(num_groups=out_dim, num_channels=out_dim, affine=True)
        elif norm == "layer":
            self.layer_norm = LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, C_in, L)
        x = self.conv(x)  # (B, C_out, L')
        if self.norm == "group":
            x = self.layer_norm(x)
        elif self.norm == "layer":
            x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)  # normalise channels at each frame
        return F.gelu(x)


class FeatureEncoder(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        dims = [1, *cfg.conv_dim]
        layers = []
        for i, (k, s) in enumerate(zip(cfg.conv_kernel, cfg.conv_stride)):
            norm = "layer" if cfg.feat_extract_norm == "layer" else ("group" if i == 0 else None)
            layers.append(ConvLayer(dims[i], dims[i + 1], k, s, cfg.conv_bias, norm))
        self.conv_layers = nn.ModuleList(layers)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:  # (B, samples)
        x = waveform[:, None]  # (B, 1, samples)
        for layer in self.conv_layers:
            x = layer(x)
        return x  # (B, conv_dim[-1], frames)


class FeatureProjection(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.layer_norm = LayerNorm(cfg.conv_dim[-1], eps=cfg.layer_norm_eps)
        self.projection = nn.Linear(cfg.conv_dim[-1], cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, frames, conv_dim[-1])
        return self.projection(self.layer_norm(x))


class WeightNormConv1d(nn.Module):
    """Conv1d whose weight is weight_v scaled to norm weight_g along the kernel axis (weight_norm, dim=2).

    Kept as the two factors, not folded, so fine-tuning keeps the parametrisation the checkpoint was
    trained with. Hugging Face stores them as weight_g/weight_v or parametrizations.weight.original0/1.
    """

    def __init__(self, dim: int, kernel: int, groups: int):
        super().__init__()
        self.padding, self.groups = kernel // 2, groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.empty(dim, dim // groups, kernel))
        self.bias = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.weight_v, std=(2.0 / (kernel * dim)) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, D, T)
        v = self.weight_v
        norm = v.float().pow(2).sum(dim=(0, 1), keepdim=True).sqrt()  # (1, 1, kernel)
        weight = (v.float() * (self.weight_g.float() / norm)).to(x.dtype)
        return F.conv1d(x, weight, self.bias.to(x.dtype), padding=self.padding, groups=self.groups)


class PositionalConvEmbedding(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_conv_pos_embedding_groups:
            raise ConfigError(
                f"audio hidden_size {cfg.hidden_size} is not divisible by num_conv_pos_embedding_groups "
                f"{cfg.num_conv_pos_embedding_groups}"
            )
        self.conv = WeightNormConv1d(
            cfg.hidden_size, cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups
        )
        # padding k // 2 on both sides gives one frame too many for an even kernel: drop the last
        self.num_pad_remove = 1 if cfg.num_conv_pos_embeddings % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, D)
        y = self.conv(x.transpose(1, 2))  # (B, D, T + pad_extra)
        if self.num_pad_remove:
            y = y[:, :, : -self.num_pad_remove]
        return F.gelu(y).transpose(1, 2)  # (B, T, D)


class FeedForward(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.intermediate_dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output_dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.approximate = "tanh" if cfg.activation == "gelu_new" else "none"

    def forward(self, x):
        return self.output_dense(F.gelu(self.intermediate_dense(x), approximate=self.approximate))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.pre_norm = cfg.do_stable_layer_norm
        self.attention = EncoderAttention(cfg.hidden_size, cfg.num_heads, bias=True)
        self.layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, D)
        if self.pre_norm:
            x = x + self.attention(self.layer_norm(x))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.attention(x))
        return self.final_layer_norm(x + self.feed_forward(x))


class Encoder(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.pre_norm = cfg.do_stable_layer_norm
        self.pos_conv_embed = PositionalConvEmbedding(cfg)
        self.layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, D)
        x = x + self.pos_conv_embed(x)
        if not self.pre_norm:  # post-norm: normalise the input; pre-norm: normalise the output
            x = self.layer_norm(x)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x) if self.pre_norm else x


class Wav2Vec2Encoder(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.config = cfg
        self.feature_extractor = FeatureEncoder(cfg)
        self.feature_projection = FeatureProjection(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:  # (B, samples) raw waveform
        if input_values.dim() != 2:
            raise ConfigError(
                f"wav2vec2 encoder expects a raw waveform (B, samples), got shape {tuple(input_values.shape)}"
            )
        x = self.feature_extractor(
            input_values.to(self.feature_projection.projection.weight.dtype)
        )  # (B, C, T)
        x = self.feature_projection(x.transpose(1, 2))  # (B, T, D)
        return self.encoder(x)

"""The tiled vision encoder of Llama-3.2-Vision (Mllama).

An image arrives as up to max_num_tiles square tiles (the processor picks the grid, the
"aspect ratio", from a supported list). Each tile is patch-embedded with a class token; learned
embeddings per aspect ratio are added before the class token (pre-tile), with the patch positions
(gated), and after the local layers (post-tile). Local layers see one image's tiles jointly, then
gated global layers run over the same tokens; the output concatenates the last global layer with
chosen intermediate local layers (the projector's input).

Parameter names follow transformers' MllamaVisionModel (`patch_embedding`, `transformer.layers.N`,
`global_transformer.layers.N.gate_attn`, ...) so conversion is a prefix map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MllamaVisionConfig
from .common.attention import SelfAttention
from .common.mlp import GeluMLP
from .common.norms import LayerNorm


class AspectRatioEmbedding(nn.Module):
    """One learned vector per (aspect ratio, tile), added to every token of the tile, gated."""

    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.max_num_tiles, self.hidden_size = cfg.max_num_tiles, cfg.hidden_size
        self.embedding = nn.Embedding(cfg.max_aspect_ratio_id + 1, cfg.max_num_tiles * cfg.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x, aspect_ratio_ids):
        """x (BN, tiles, P, D); aspect_ratio_ids (BN,)."""
        emb = self.embedding(aspect_ratio_ids).reshape(-1, self.max_num_tiles, 1, self.hidden_size)
        return x + emb * self.gate.tanh()


class GatedPositionalEmbedding(nn.Module):
    """(1 - tanh g) * patch positions + tanh g * per-(aspect ratio, tile, patch) positions."""

    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.max_num_tiles, self.num_patches, self.hidden_size = (
            cfg.max_num_tiles,
            cfg.num_patches,
            cfg.hidden_size,
        )
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(cfg.hidden_size**-0.5 * torch.randn(cfg.num_patches, cfg.hidden_size))
        self.tile_embedding = nn.Embedding(
            cfg.max_aspect_ratio_id + 1, cfg.max_num_tiles * cfg.num_patches * cfg.hidden_size
        )

    def forward(self, x, aspect_ratio_ids):
        """x (BN, tiles, P, D)."""
        gate = self.gate.tanh()
        x = x + (1 - gate) * self.embedding.view(1, 1, self.num_patches, self.hidden_size)
        tile = self.tile_embedding(aspect_ratio_ids).reshape(
            -1, self.max_num_tiles, self.num_patches, self.hidden_size
        )
        return x + gate * tile


class VisionLayer(nn.Module):
    """Pre-LayerNorm encoder layer; the global ones scale both branches by tanh of a learned gate."""

    def __init__(self, cfg: MllamaVisionConfig, gated: bool):
        super().__init__()
        D, H = cfg.hidden_size, cfg.num_heads
        self.self_attn = SelfAttention(D, H, H, D // H, bias=False)
        self.mlp = GeluMLP(D, cfg.intermediate_size, bias=True)
        self.input_layernorm = LayerNorm(D, eps=cfg.norm_eps)
        self.post_attention_layernorm = LayerNorm(D, eps=cfg.norm_eps)
        self.gated = gated
        if gated:  # transformers initialises these to pi/4 (tanh ~ 0.66)
            self.gate_attn = nn.Parameter(torch.full((1,), math.pi / 4))
            self.gate_ffn = nn.Parameter(torch.full((1,), math.pi / 4))

    def forward(self, x, mask):
        h = self.self_attn(self.input_layernorm(x), None, mask)
        x = x + (self.gate_attn.tanh() * h if self.gated else h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * h if self.gated else h)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig, num_layers: int, gated: bool):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg, gated) for _ in range(num_layers))


def tile_attention_mask(aspect_ratio_mask: torch.Tensor, num_patches: int, padded_len: int) -> torch.Tensor:
    """Boolean (BN, 1, tiles * L, tiles * L) for the encoder layers, transformers' rule.

    A token is "padding" when its tile is a padding tile or it is one of the tokens added to round a
    tile up to L = padded_len; padding tokens may not attend to padding tokens, every other pair may
    (so real tokens do see padding: the checkpoints were trained that way).
    """
    BN, tiles = aspect_ratio_mask.shape
    real = aspect_ratio_mask.bool()[:, :, None].expand(BN, tiles, padded_len).clone()  # (BN, tiles, L)
    real[:, :, num_patches:] = False
    pad = ~real.reshape(BN, tiles * padded_len)
    return ~(pad[:, :, None] & pad[:, None, :])[:, None]


class MllamaVisionModel(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, D, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.class_embedding = nn.Parameter(D**-0.5 * torch.randn(D))
        self.gated_positional_embedding = GatedPositionalEmbedding(cfg)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(cfg)
        self.post_tile_positional_embedding = AspectRatioEmbedding(cfg)
        self.layernorm_pre = LayerNorm(D)  # eps 1e-5, as transformers' nn.LayerNorm default
        self.layernorm_post = LayerNorm(D)
        self.transformer = VisionEncoder(cfg, cfg.num_layers, gated=False)
        self.global_transformer = VisionEncoder(cfg, cfg.num_global_layers, gated=True)

    def forward(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        """pixel_values (B, N, tiles, C, H, W); aspect_ratio_ids (B, N); aspect_ratio_mask (B, N, tiles)
        -> (B, N, tiles, P, output_dim), P = num_patches tokens per tile (class token first)."""
        B, N, tiles, C, H, W = pixel_values.shape
        BN = B * N
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.reshape(BN * tiles, C, H, W).to(w.device, w.dtype))
        x = x.flatten(2).transpose(1, 2)  # (BN * tiles, patches, D)
        D = x.shape[-1]
        ids = aspect_ratio_ids.reshape(BN)
        x = self.pre_tile_positional_embedding(x.reshape(BN, tiles, -1, D), ids)
        cls = self.class_embedding.expand(BN * tiles, 1, D)
        x = torch.cat([cls, x.reshape(BN * tiles, -1, D)], dim=1)  # (BN * tiles, P, D)
        P = x.shape[1]
        x = self.gated_positional_embedding(x.reshape(BN, tiles, P, D), ids)
        x = self.layernorm_pre(x)
        L = P + (8 - P % 8) % 8  # each tile padded to a multiple of 8 tokens, as the checkpoints
        x = F.pad(x, (0, 0, 0, L - P))  # (BN, tiles, L, D)
        mask = tile_attention_mask(aspect_ratio_mask.reshape(BN, tiles), P, L)
        x = x.reshape(BN, tiles * L, D)
        wanted = set(self.cfg.intermediate_layers_indices)
        kept = {}
        for i, layer in enumerate(self.transformer.layers):
            x = layer(x, mask)
            if i in wanted:
                kept[i] = x
        x = self.layernorm_post(x)
        x = self.post_tile_positional_embedding(x.reshape(BN, tiles, L, D), ids)
        x = x.reshape(BN, tiles * L, D)
        for layer in self.global_transformer.layers:
            x = layer(x, mask)
        x = x.reshape(BN, tiles, L, D)[:, :, :P]
        # (BN, tiles * L, D, k) flattened to D * k features per token, the order the projector expects
        inter = torch.stack([kept[i] for i in self.cfg.intermediate_layers_indices], dim=-1)
        inter = inter.reshape(BN, tiles, L, -1)[:, :, :P]
        return torch.cat([x, inter], dim=-1).reshape(B, N, tiles, P, -1)

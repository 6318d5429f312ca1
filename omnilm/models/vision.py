"""The vision tower: a ViT as SigLIP and CLIP build it, plus the builders OmniModel calls.

Parameter names are Hugging Face's SiglipVisionModel / CLIPVisionModel leaves (`embeddings.patch_embedding`,
`encoder.layers.N.self_attn.q_proj`, `post_layernorm`, CLIP's `pre_layrnorm` typo included), so a
checkpoint converts by stripping a prefix.

Shapes: pixel_values (N, C, H, W) -> patches (N, h*w, D) with h = H / patch_size; CLIP prepends a CLS
token, so its sequences are 1 + h*w long.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .common.attention import EncoderAttention
from .common.mlp import GeluMLP
from .common.norms import LayerNorm
from .projector import MLPProjector


class VisionMLP(GeluMLP):
    """fc1 -> activation -> fc2, with CLIP's quick_gelu besides the two GELUs GeluMLP knows."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__(dim, hidden, bias=True, approximate="tanh" if act == "gelu_pytorch_tanh" else "none")
        self.quick = act == "quick_gelu"

    def forward(self, x):
        if self.quick:  # OpenAI CLIP's sigmoid approximation of GELU
            h = self.fc1(x)
            return self.fc2(h * torch.sigmoid(1.702 * h))
        return super().forward(x)


class VisionEmbeddings(nn.Module):
    """Conv patch embedding plus learned positions, bicubically resized for other image sizes."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.grid = cfg.image_size // cfg.patch_size
        self.has_cls = cfg.kind == "clip"
        if self.has_cls:
            self.class_embedding = nn.Parameter(
                torch.randn(cfg.hidden_size) * cfg.hidden_size**-0.5
            )  # CLIP's init
        # SigLIP's patch conv has a bias, CLIP's has none
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=not self.has_cls
        )
        self.position_embedding = nn.Embedding(self.grid**2 + self.has_cls, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        N, _, H, W = pixel_values.shape
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (N, h*w, D)
        if self.has_cls:
            x = torch.cat([self.class_embedding.expand(N, 1, -1).to(x.dtype), x], dim=1)  # (N, 1 + h*w, D)
        return x + self.positions(H // self.patch_size, W // self.patch_size)

    def positions(self, h: int, w: int) -> torch.Tensor:
        """(1, [1 +] h*w, D): the learned table, resized when the patch grid is not the trained one."""
        table = self.position_embedding.weight[None]  # (1, P, D)
        if (h, w) == (self.grid, self.grid):
            return table
        cls, patches = table[:, : self.has_cls], table[:, self.has_cls :]
        D = table.shape[-1]
        patches = patches.reshape(1, self.grid, self.grid, D).permute(0, 3, 1, 2)  # (1, D, grid, grid)
        # bicubic, align_corners=False: what transformers' interpolate_pos_encoding does
        patches = F.interpolate(patches, size=(h, w), mode="bicubic", align_corners=False)
        patches = patches.permute(0, 2, 3, 1).reshape(1, h * w, D)  # (1, h*w, D)
        return torch.cat([cls, patches], dim=1)


class EncoderLayer(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = EncoderAttention(cfg.hidden_size, cfg.num_heads, bias=True)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))


class AttentionPoolingHead(nn.Module):
    """SigLIP's multihead attention pooling (a learned probe attends over the patches): (N, n, D) -> (N, D)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, cfg.hidden_size))
        self.attention = nn.MultiheadAttention(cfg.hidden_size, cfg.num_heads, batch_first=True)
        self.layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x):
        probe = self.probe.expand(x.shape[0], -1, -1)  # (N, 1, D)
        h = self.attention(probe, x, x, need_weights=False)[0]
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


class VisionTower(nn.Module):
    """pixel_values (N, C, H, W) -> features (N, n_features, feature_dim), selected as cfg says."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        if cfg.kind == "clip":
            self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = VisionEncoder(cfg)
        # present even when an earlier layer is selected, so every checkpoint key has a home
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = AttentionPoolingHead(cfg) if cfg.use_head else None

    def hidden_states(self, pixel_values: torch.Tensor, upto: int) -> list[torch.Tensor]:
        """[embeddings, block 1 out, ..., block `upto` out]: transformers' hidden_states, cut short so
        blocks after the selected layer never run."""
        x = self.embeddings(pixel_values)  # (N, n, D)
        if self.cfg.kind == "clip":
            x = self.pre_layrnorm(x)
        states = [x]
        for layer in self.encoder.layers[:upto]:
            x = layer(x)
            states.append(x)
        return states

    def last_hidden_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """transformers' last_hidden_state: SigLIP applies post_layernorm to every token, CLIP only to the pooled CLS."""
        x = self.hidden_states(pixel_values, len(self.encoder.layers))[-1]
        return self.post_layernorm(x) if self.cfg.kind == "siglip" else x

    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """transformers' pooler_output (N, D): SigLIP's attention-pooling head, CLIP's normed CLS token."""
        if self.cfg.kind == "clip":
            return self.post_layernorm(self.last_hidden_state(pixel_values)[:, 0])
        if self.head is None:
            raise ValueError("this SigLIP tower was built without its pooling head (use_head=False)")
        return self.head(self.last_hidden_state(pixel_values))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        layers = self.cfg.feature_layers
        if not layers:
            x = self.last_hidden_state(pixel_values)
        else:
            L = len(self.encoder.layers)
            index = [i if i >= 0 else L + 1 + i for i in layers]  # -1 -> L (the last block's output)
            states = self.hidden_states(pixel_values, max(index))
            x = torch.cat([states[i] for i in index], dim=-1)  # (N, n, D * len(layers))
        if self.cfg.feature_select == "default":
            x = x[:, 1:]  # LLaVA drops the first token (CLIP's CLS) whatever the tower
        return x


def build_vision_tower(cfg: VisionConfig) -> VisionTower:
    return VisionTower(cfg)


def build_vision_projector(cfg: VisionConfig, decoder_hidden: int) -> MLPProjector:
    return MLPProjector(
        cfg.feature_dim, decoder_hidden, pixel_shuffle=cfg.pixel_shuffle, bias=cfg.projector_bias
    )

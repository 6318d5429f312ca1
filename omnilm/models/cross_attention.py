"""Gated cross-attention layers (Llama-3.2-Vision / Flamingo style fusion) and their per-request state.

A cross-attention layer takes the place of a decoder block: the text attends to the projected image
tokens (no RoPE; q and k RMS-normed per head), and the attention and MLP branches are scaled by
tanh of learned scalar gates, so with the gates at 0 the layer is the identity. Names follow
transformers' MllamaCrossAttentionDecoderLayer (`cross_attn.q_proj`, `cross_attn_attn_gate`, ...).

The image keys/values depend only on the images, so they are computed once per request (at prefill)
into a `CrossAttentionState` and reused by every decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DecoderConfig
from .common.attention import attention
from .common.mlp import SwiGLU
from .common.norms import RMSNorm, make_norm


class CrossAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        D = cfg.hidden_size
        self.q_proj = nn.Linear(D, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(D, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(D, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, D, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)

    def kv(self, states: torch.Tensor):
        """Image tokens (B, S, D) -> k, v (B, H_kv, S, hd): once per request."""
        B, S, _ = states.shape
        k = self.k_proj(states).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(states).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return self.k_norm(k), v

    def forward(self, x, k, v, mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        out = attention(self.q_norm(q), k, v, mask=mask)  # (B, H, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class CrossAttentionBlock(nn.Module):
    """x + tanh(g_attn) * cross_attn(norm(x)); then x + tanh(g_mlp) * mlp(norm(x))."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.cross_attn = CrossAttention(cfg)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_layernorm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x, k, v, state: CrossAttentionState):
        h = self.cross_attn(self.input_layernorm(x), k, v, state.mask)
        if state.attn_scale is not None:
            h = h * state.attn_scale.to(h.dtype)
        x = x + self.cross_attn_attn_gate.tanh() * h
        h = self.mlp(self.post_attention_layernorm(x))
        if state.mlp_scale is not None:
            h = h * state.mlp_scale.to(h.dtype)
        return x + self.cross_attn_mlp_gate.tanh() * h


@dataclass
class CrossAttentionState:
    """What the cross-attention layers need for a batch of requests, computed once at prefill.

    kv: {layer index: (k, v)}, each (B, H_kv, S, hd) over all image tokens of the row (images x tiles
    x tokens per tile). mask (B, 1, T, S) bool, True where a text token may attend; attn_scale and
    mlp_scale (B, T, 1): 0 for text rows that see no image (transformers' full_text_row_masked_out
    zeroes their MLP branch). None means "no masking". For decoding, `last_row()` keeps the rules of
    the prompt's last token, which every generated token inherits (as transformers does).
    """

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor | None = None
    attn_scale: torch.Tensor | None = None
    mlp_scale: torch.Tensor | None = None

    def last_row(self) -> CrossAttentionState:
        def last(t):
            return None if t is None else t[..., -1:, :]

        return CrossAttentionState(self.kv, last(self.mask), last(self.attn_scale), last(self.mlp_scale))

    def rows(self, index) -> CrossAttentionState:
        """The state of some batch rows (a request taken out of, or put into, a batch)."""

        def pick(t):
            return None if t is None else t[index]

        kv = {i: (k[index], v[index]) for i, (k, v) in self.kv.items()}
        return CrossAttentionState(kv, pick(self.mask), pick(self.attn_scale), pick(self.mlp_scale))


def cross_attention_masks(
    cross_attention_mask: torch.Tensor | None,
    tokens_per_tile: int,
    image_valid: torch.Tensor | None = None,
):
    """transformers' rules, as boolean masks: -> (mask (B, 1, T, S), attn_scale, mlp_scale).

    cross_attention_mask (B, T, N_images, tiles): 1 where text token t may see tile j of image i (the
    processor opens an image's tiles from its <|image|> token on). A text row that sees no tile (text
    before the first image) gets its MLP branch zeroed and attends to every token of the row's images,
    as transformers does; `image_valid` (B, N_images) marks which images of a row are real rather than
    batch padding, so such a row does not depend on other requests in the batch (transformers lets
    it see the padding images too). A row with no real image at all gets no cross-attention output.
    """
    if cross_attention_mask is None:
        return None, None, None
    B, T, N, tiles = cross_attention_mask.shape
    m = cross_attention_mask.bool().repeat_interleave(tokens_per_tile, dim=3).reshape(B, T, -1)  # (B, T, S)
    sees_image = m.any(-1, keepdim=True)  # (B, T, 1)
    if image_valid is None:
        valid = torch.ones(B, 1, m.shape[-1], dtype=torch.bool, device=m.device)
    else:
        valid = image_valid.bool().repeat_interleave(tiles * tokens_per_tile, dim=1)[:, None]  # (B, 1, S)
    mask = torch.where(sees_image, m, valid)
    has_keys = mask.any(-1, keepdim=True)  # (B, T, 1)
    mask = mask | ~has_keys  # an all-False row would give NaN; its output is zeroed by attn_scale
    dtype = torch.float32
    attn_scale = None if bool(has_keys.all()) else has_keys.to(dtype)
    return mask[:, None], attn_scale, sees_image.to(dtype)


def state_rows(state: CrossAttentionState, start: int, end: int) -> CrossAttentionState:
    """The mask rules of prompt tokens [start, end) (a prefill chunk); k/v are shared."""

    def cut(t):
        return None if t is None else t[..., start:end, :]

    return CrossAttentionState(state.kv, cut(state.mask), cut(state.attn_scale), cut(state.mlp_scale))


def batch_states(states: list[CrossAttentionState | None]) -> CrossAttentionState | None:
    """One-row decode states of different requests -> one batched state (None: no row has images).

    Image token counts differ per request: k/v are zero-padded to the longest and the padding is
    masked; a row without images gets attn/mlp scales of 0, which leaves it exactly as if the
    cross-attention layers were skipped (what a text-only request gets alone)."""
    real = [s for s in states if s is not None]
    if not real:
        return None
    S = max(k.shape[2] for k, _ in (s.kv[next(iter(s.kv))] for s in real))
    kv = {}
    for i, (k0, _) in real[0].kv.items():
        ks, vs = [], []
        for s in states:
            if s is None:
                k = v = k0.new_zeros(1, k0.shape[1], S, k0.shape[3])
            else:
                k, v = s.kv[i]
                pad = S - k.shape[2]
                k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))  # (1, H_kv, S, hd)
            ks.append(k)
            vs.append(v)
        kv[i] = (torch.cat(ks), torch.cat(vs))
    device = real[0].kv[next(iter(real[0].kv))][0].device
    masks, attn, mlp = [], [], []
    for s in states:
        n = 0 if s is None else s.kv[next(iter(s.kv))][0].shape[2]
        m = torch.zeros(1, 1, 1, S, dtype=torch.bool, device=device)
        m[..., :n] = True if s is None or s.mask is None else s.mask[..., -1:, :]
        if s is None:
            m[:] = True  # any keys: the output is zeroed by the scales
        masks.append(m)
        zero = torch.zeros(1, 1, 1, device=device)
        attn.append(zero if s is None else (s.attn_scale[:, -1:] if s.attn_scale is not None else zero + 1))
        mlp.append(zero if s is None else (s.mlp_scale[:, -1:] if s.mlp_scale is not None else zero + 1))
    return CrossAttentionState(kv, torch.cat(masks), torch.cat(attn), torch.cat(mlp))

"""Attention kernels and masks shared by the decoder and the encoders.

Shapes: q (B, H, T, head_dim); k, v (B, H_kv, S, head_dim) with H a multiple of H_kv (MHA, GQA, MQA).
Masks are boolean, True where a query may attend to a key, broadcastable to (B, H, T, S).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope

try:  # optional: FlashAttention 2 kernels for CUDA half precision
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None


def attention(q, k, v, mask=None, is_causal: bool = False, scale: float | None = None):
    """Scaled dot-product attention returning (B, H, T, head_dim)."""
    use_flash = (
        flash_attn_func is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and mask is None
        and (not is_causal or q.shape[2] == k.shape[2])
    )
    if use_flash:  # flash_attn wants (B, T, H, head_dim) and handles GQA itself
        out = flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=is_causal, softmax_scale=scale
        )
        return out.transpose(1, 2)
    gqa = k.shape[1] != q.shape[1]
    # enable_gqa shares each kv head across its query group instead of copying k and v n_rep times
    # (a copy of the whole cache every decode step). The CPU flash kernel takes it with or without a
    # mask; on CUDA only the flash kernel does (half precision, no mask), the others fall back to
    # the slow math kernel, so there k and v are expanded instead.
    if gqa and q.is_cuda and (mask is not None or q.dtype not in (torch.float16, torch.bfloat16)):
        if q.shape[2] == 1:  # decode: one query per row, so group the query heads instead
            return grouped_query_attention(q, k, v, mask, scale)
        n_rep = q.shape[1] // k.shape[1]
        b, hk, s, d = k.shape
        k = k[:, :, None].expand(b, hk, n_rep, s, d).reshape(b, hk * n_rep, s, d)  # (B, H, S, hd)
        v = v[:, :, None].expand(b, hk, n_rep, s, d).reshape(b, hk * n_rep, s, d)
        gqa = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, scale=scale, enable_gqa=gqa
    )


def grouped_query_attention(q, k, v, mask=None, scale: float | None = None):
    """Attention of few queries over a GQA cache without copying k and v per query head: the n_rep
    query heads of a kv head become n_rep query rows of one matmul. (B, H, T, hd) out."""
    b, h, t, d = q.shape
    hk = k.shape[1]
    qg = q.reshape(b, hk, (h // hk) * t, d)  # (B, H_kv, n_rep * T, hd), heads of a group adjacent
    scores = (qg @ k.transpose(-1, -2)) * (scale or d**-0.5)  # (B, H_kv, n_rep * T, S)
    if mask is not None:  # (B or 1, 1, T, S) -> one copy per query head of the group
        mask = mask.expand(-1, -1, t, -1).repeat(1, 1, h // hk, 1) if t > 1 else mask
        scores = scores.masked_fill(~mask, float("-inf"))
    out = scores.float().softmax(-1).to(v.dtype) @ v  # (B, H_kv, n_rep * T, hd)
    return out.reshape(b, h, t, d)


def causal_mask(q_slots: torch.Tensor, kv_len: int, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask (B or 1, 1, T, kv_len) for causal attention over cache slots.

    q_slots (T,) are the slots of the queries; key_valid (B, >= kv_len) marks real (non-padding) keys.
    A query always sees its own slot, so a padding row attends to itself instead of to nothing
    (an all-False row gives NaN in SDPA, and NaN values poison later layers through 0 * NaN).
    """
    k_slots = torch.arange(kv_len, device=q_slots.device)
    mask = k_slots[None, :] <= q_slots[:, None]  # (T, S)
    if key_valid is not None:
        mask = mask[None] & key_valid[:, None, :kv_len].bool()  # (B, T, S)
        mask = mask | (k_slots[None, None, :] == q_slots[None, :, None])
        return mask[:, None]
    return mask[None, None]


class SelfAttention(nn.Module):
    """Decoder attention with q/k/v/o projections (Llama names), RoPE and an optional static KV cache."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        bias: bool = False,
        qkv_bias: bool = False,
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        qkv_bias = bias or qkv_bias  # Qwen2: q/k/v with bias, o_proj without
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=bias)
        # q, k and v as one product, set (with q/k/v_proj dropped) by serving's serve/prepack.py: one
        # GEMM instead of three per layer and step, and q and k rotated together
        self.qkv_proj = None

    def forward(self, x, rope=None, mask=None, is_causal=False, cache=None, cache_position=None, kv_len=None):
        B, T, _ = x.shape
        H, H_kv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(B, T, H + 2 * H_kv, hd).transpose(1, 2)  # (B, H + 2 H_kv, T, hd)
            qk, v = qkv[:, : H + H_kv], qkv[:, H + H_kv :]
            if rope is not None:
                qk = apply_rope(qk, *rope)
            q, k = qk[:, :H], qk[:, H:]
        else:
            q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
            k = self.k_proj(x).view(B, T, H_kv, hd).transpose(1, 2)  # (B, H_kv, T, hd)
            v = self.v_proj(x).view(B, T, H_kv, hd).transpose(1, 2)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(cache_position, k, v)  # (B, H_kv, S_max, hd)
            if kv_len is not None:
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
        out = attention(q, k, v, mask=mask, is_causal=is_causal)  # (B, H, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * hd))


class EncoderAttention(nn.Module):
    """Bidirectional attention with the names ViT/SigLIP/CLIP/Whisper/wav2vec2 use (q/k/v/out_proj)."""

    def __init__(self, dim: int, n_heads: int, bias: bool = True, k_bias: bool | None = None):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias if k_bias is None else k_bias)  # Whisper: no k bias
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x, mask=None):
        B, T, D = x.shape
        q, k, v = (
            p(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = attention(q, k, v, mask=mask)  # (B, H, T, hd)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))

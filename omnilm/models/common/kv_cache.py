import torch
from torch import nn


class KVCache(nn.Module):
    """One layer's pre-allocated key/value cache, (B, H_kv, max_len, head_dim) each.

    Writes go through index_copy_ at the given slots, so shapes never change and a compiled
    decode step (CUDA graphs) can reuse the same buffers every step.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v


class StaticCache(nn.Module):
    """The KV caches of every decoder layer."""

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        self.max_len = max_len
        self.layers = nn.ModuleList(
            KVCache(batch, n_kv_heads, max_len, head_dim, dtype, device) for _ in range(n_layers)
        )

    def reset(self):
        for layer in self.layers:
            layer.k.zero_()
            layer.v.zero_()

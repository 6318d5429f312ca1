"""The paged KV cache: fixed-size pages handed out to sequences and taken back, as in nano-vllm.

Keys and values of every layer live in one tensor of `num_pages * page_size` token slots; a sequence
owns a list of pages (its block table) and its token t sits in slot `pages[t // P] * P + t % P`. A
forward pass sees a `CacheView`: the decoder calls `view.layers[i].update(slots, k, v)` exactly as it
calls a static cache, the new keys/values go to their slots, and each row's keys/values come back
gathered into (B, H_kv, S, head_dim) for SDPA. So model code does not know pages exist.
"""

from __future__ import annotations

from collections import deque

import torch

from ..errors import OmniLMError


class PagePool:
    """Hands out page ids and takes them back; `used` is what the metrics and tests read."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = deque(range(num_pages))

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_pages - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OmniLMError(f"KV page pool exhausted: {n} pages asked, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def release(self, pages: list[int]):
        self._free.extend(pages)
        if len(self._free) > self.num_pages:  # a page returned twice would be handed out twice
            raise AssertionError("KV page released twice")


class PagedKV:
    """Per-layer key and value slots, each (num_pages * page_size, H_kv, head_dim)."""

    def __init__(self, n_layers, n_kv_heads, head_dim, num_pages, page_size, dtype, device):
        self.page_size = page_size
        shape = (num_pages * page_size, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]

    def slots(self, pages: list[int], start: int, end: int) -> list[int]:
        """Slot ids of token positions [start, end) of a sequence that owns `pages`."""
        P = self.page_size
        return [pages[t // P] * P + t % P for t in range(start, end)]

    def view(self, write_slots: torch.Tensor, read_slots: torch.Tensor) -> CacheView:
        return CacheView(self, write_slots, read_slots)


class CacheView:
    """One forward's window on the pages: write_slots (B * T,) for the new tokens, read_slots (B, S)
    for the keys each row attends to (row-padded with any slot; the mask hides those)."""

    def __init__(self, kv: PagedKV, write_slots: torch.Tensor, read_slots: torch.Tensor):
        self.layers = [_LayerView(k, v, write_slots, read_slots) for k, v in zip(kv.k, kv.v, strict=True)]


class _LayerView:
    def __init__(self, k, v, write_slots, read_slots):
        self.k, self.v, self.write_slots, self.read_slots = k, v, write_slots, read_slots

    def update(self, cache_position, k: torch.Tensor, v: torch.Tensor):
        """k, v (B, H_kv, T, hd) new -> (B, H_kv, S, hd) of every key each row attends to."""
        B, H, T, D = k.shape
        self.k.index_copy_(0, self.write_slots, k.transpose(1, 2).reshape(B * T, H, D))
        self.v.index_copy_(0, self.write_slots, v.transpose(1, 2).reshape(B * T, H, D))
        return self.k[self.read_slots].transpose(1, 2), self.v[self.read_slots].transpose(1, 2)

"""The paged KV cache: fixed-size pages handed out to sequences and taken back, as in nano-vllm.

Keys and values of every layer live in one (num_pages, page_size, H_kv, head_dim) tensor; a sequence
owns a list of pages (its block table) and its token t sits in slot `pages[t // P] * P + t % P` of
the flattened tensor. A forward pass sees a `CacheView`: the decoder calls
`view.layers[i].update(slots, k, v)` exactly as it calls a static cache, the new keys/values go to
their slots, and each row's pages come back gathered, whole pages at a time, into
(B, H_kv, S, head_dim) for SDPA. So model code does not know pages exist.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..errors import OmniLMError


class PagePool:
    """Hands out page ids and takes them back, counting references; `used` is what metrics and tests
    read.

    Prefix caching: a full page of prompt keys/values can be registered under a hash of every token
    up to its end (`register`); a later prompt with the same tokens takes the page instead of
    computing it again (`lookup`). A page nobody holds is free, but keeps its hash until it is handed
    out again, least recently freed first, so a common system prompt stays cached while there is room.
    """

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))
        self._refs = [0] * num_pages
        self._hash_of: dict[int, int] = {}  # page -> prefix hash
        self._page_of: dict[int, int] = {}  # prefix hash -> page

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_pages - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OmniLMError(f"KV page pool exhausted: {n} pages asked, {len(self._free)} free")
        pages = []
        for _ in range(n):
            page, _ = self._free.popitem(last=False)
            if page in self._hash_of:  # its old contents are about to be overwritten
                del self._page_of[self._hash_of.pop(page)]
            self._refs[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: list[int]):
        for page in pages:
            self._refs[page] -= 1
            if self._refs[page] < 0:  # a page returned twice would be handed out twice
                raise AssertionError(f"KV page {page} released twice")
            if self._refs[page] == 0:
                self._free[page] = None

    def lookup(self, hashes: list[int]) -> list[int]:
        """The cached pages of the longest run of leading prefix hashes, each taken (referenced)."""
        pages = []
        for h in hashes:
            page = self._page_of.get(h)
            if page is None:
                break
            if self._refs[page] == 0:
                del self._free[page]
            self._refs[page] += 1
            pages.append(page)
        return pages

    def register(self, page: int, h: int):
        if h not in self._page_of and page not in self._hash_of:
            self._page_of[h], self._hash_of[page] = page, h


def prefix_hashes(ids: list[int], page_size: int, n_pages: int) -> list[int]:
    """Hash of each of the first n_pages full pages of ids, chained: page i's hash covers every token
    up to its end, so equal hashes mean equal keys/values."""
    out, h = [], 0
    for i in range(n_pages):
        h = hash((h, tuple(ids[i * page_size : (i + 1) * page_size])))
        out.append(h)
    return out


class PagedKV:
    """Per-layer key and value pages, each (num_pages, page_size, H_kv, head_dim)."""

    def __init__(self, n_layers, n_kv_heads, head_dim, num_pages, page_size, dtype, device):
        self.page_size = page_size
        shape = (num_pages, page_size, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]

    def slots(self, pages: list[int], start: int, end: int) -> list[int]:
        """Slot ids of token positions [start, end) of a sequence that owns `pages`."""
        P = self.page_size
        return [pages[t // P] * P + t % P for t in range(start, end)]

    def view(self, write_slots: torch.Tensor, read_pages: torch.Tensor, length: int) -> CacheView:
        return CacheView(self, write_slots, read_pages, length)


class CacheView:
    """One forward's window on the pages: write_slots (B * T,) for the new tokens; read_pages
    (B, n_pages), the pages of each row (row-padded with any page; the mask hides those), of which
    the first `length` slots are attended to."""

    def __init__(self, kv: PagedKV, write_slots: torch.Tensor, read_pages: torch.Tensor, length: int):
        self.layers = [
            _LayerView(k, v, write_slots, read_pages, length) for k, v in zip(kv.k, kv.v, strict=True)
        ]


class _LayerView:
    def __init__(self, k, v, write_slots, read_pages, length):
        self.k, self.v, self.write_slots, self.read_pages, self.length = k, v, write_slots, read_pages, length

    def update(self, cache_position, k: torch.Tensor, v: torch.Tensor):
        """k, v (B, H_kv, T, hd) new -> (B, H_kv, S, hd) of every key each row attends to."""
        B, H, T, D = k.shape
        self.k.view(-1, H, D).index_copy_(0, self.write_slots, k.transpose(1, 2).reshape(B * T, H, D))
        self.v.view(-1, H, D).index_copy_(0, self.write_slots, v.transpose(1, 2).reshape(B * T, H, D))
        return self._gather(self.k), self._gather(self.v)

    def _gather(self, pages: torch.Tensor) -> torch.Tensor:
        """Whole pages per row: a few large copies rather than one per token."""
        B, n = self.read_pages.shape
        P, H, D = pages.shape[1:]
        out = pages.index_select(0, self.read_pages.flatten()).view(B, n * P, H, D)[:, : self.length]
        return out.transpose(1, 2)  # (B, H_kv, S, hd)

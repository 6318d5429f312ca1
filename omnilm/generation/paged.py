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


class Lanes:
    """The decode batch's keys/values kept gathered between steps, so a decode step appends one slot
    per row instead of gathering every row's pages again (which costs more than the attention itself
    on CPU). Per layer, k and v are (rows, S_cap, H_kv, hd); lane i holds the keys of `seqs[i]`, the
    decode batch is ordered by lane, and the pages stay the source of truth: a row that joins is
    copied from its pages once, a row that leaves has the last lane moved into its place (one row's
    copy), so only a change of the batch costs copies, and only of the rows that change. Slots past
    a row's length hold stale finite values which the per-row mask hides, as the padding pages do.
    Costs up to the running rows' keys/values again in memory; the engine uses it in eager decode."""

    def __init__(self, kv: PagedKV, min_rows: int = 1, max_len: int | None = None):
        self.kv, self.min_rows = kv, min_rows  # min_rows: the batch size the engine expects
        P = kv.page_size
        self.max_slots = -(-max_len // P) * P if max_len else 1 << 40  # the longest a row can be
        self.seqs: list = []  # lane order; a seq here is alive, so its id() is not reused
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def arrange(self, seqs, length: int) -> list:
        """Make the lanes hold exactly `seqs` (each with `cached` valid slots) with room for `length`
        slots per row; returns the seqs in lane order (the decode batch's row order)."""
        want = {id(s) for s in seqs}
        i = 0
        while i < len(self.seqs):
            if id(self.seqs[i]) in want:
                i += 1
                continue
            last = self.seqs.pop()
            if i < len(self.seqs):  # the last lane fills the hole
                self.seqs[i] = last
                n = last.cached
                for buf in (*self.k, *self.v):
                    buf[i, :n] = buf[len(self.seqs), :n]
        have = {id(s) for s in self.seqs}
        new = [s for s in seqs if id(s) not in have]
        rows, P = len(self.seqs) + len(new), self.kv.page_size
        need = -(-length // P) * P
        cap_b, cap_s = (self.k[0].shape[0], self.k[0].shape[1]) if self.k else (0, 0)
        if rows > cap_b or need > cap_s:  # grown geometrically: a grow zeroes and copies every lane
            if rows > cap_b:
                cap_b = max(rows, self.min_rows, 2 * cap_b)
            if need > cap_s:
                cap_s = max(need, min(max(16 * P, 2 * cap_s), self.max_slots))
            self._grow(cap_b, cap_s)
        for s in new:
            row = len(self.seqs)
            self.seqs.append(s)
            n = -(-s.cached // P)
            pages = torch.tensor(s.pages[:n], device=self.k[0].device)
            for src, buf in zip((*self.kv.k, *self.kv.v), (*self.k, *self.v), strict=True):
                buf[row, : n * P] = src.index_select(0, pages).flatten(0, 1)
        return self.seqs

    def _grow(self, rows: int, slots: int):
        old_k, old_v, B = self.k, self.v, len(self.seqs)
        shape = (rows, slots, *self.kv.k[0].shape[2:])
        like = self.kv.k[0]
        self.k = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in self.kv.k]
        self.v = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in self.kv.v]
        for new, old in zip((*self.k, *self.v), (*old_k, *old_v)):
            new[:B, : old.shape[1]] = old[:B]

    def view(self, write_slots: torch.Tensor, positions: torch.Tensor, length: int) -> LaneView:
        """write_slots (B,) page slots of the new tokens; positions (B,) their slots in the lanes."""
        return LaneView(self, write_slots, positions, length)


class LaneView:
    """One decode forward's window: each layer writes the new key to its page slot and its lane, and
    attends to the lanes' first `length` slots."""

    def __init__(self, lanes: Lanes, write_slots: torch.Tensor, positions: torch.Tensor, length: int):
        B, S = len(lanes.seqs), lanes.k[0].shape[1]
        lane_slots = torch.arange(B, device=positions.device) * S + positions
        self.layers = [
            _LaneLayer(k, v, lk, lv, write_slots, lane_slots, B, length)
            for k, v, lk, lv in zip(lanes.kv.k, lanes.kv.v, lanes.k, lanes.v, strict=True)
        ]


class _LaneLayer:
    def __init__(self, k, v, lk, lv, write_slots, lane_slots, rows, length):
        self.k, self.v, self.lk, self.lv = k, v, lk, lv
        self.write_slots, self.lane_slots, self.rows, self.length = write_slots, lane_slots, rows, length

    def update(self, cache_position, k: torch.Tensor, v: torch.Tensor):
        """k, v (B, H_kv, 1, hd) new -> (B, H_kv, length, hd) every key each row attends to."""
        B, H, T, D = k.shape
        k, v = k.transpose(1, 2).reshape(B * T, H, D), v.transpose(1, 2).reshape(B * T, H, D)
        self.k.view(-1, H, D).index_copy_(0, self.write_slots, k)
        self.v.view(-1, H, D).index_copy_(0, self.write_slots, v)
        self.lk.view(-1, H, D).index_copy_(0, self.lane_slots, k)
        self.lv.view(-1, H, D).index_copy_(0, self.lane_slots, v)
        return (
            self.lk[: self.rows, : self.length].transpose(1, 2),
            self.lv[: self.rows, : self.length].transpose(1, 2),
        )

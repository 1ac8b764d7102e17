"""``PagedKVCache``: per-layer paged K/V tensors, a page allocator and per-request page lists.

Host-side bookkeeping only (Python lists and dicts); the device work is the
``append_kv`` / ``draft_block_attention`` / ``kv_rollback`` ops. A request is
an int id; its KV positions 0..length-1 live in its own pages, in order. Pages
are handed out from a free list and never shared, so a request's page table
only ever names its own pages.

Typical step for a batch ``ids`` with ``n[b]`` new tokens each::

    slots = cache.reserve_batch(ids, n)                     # pages for the new tokens
    page_table, seq_lens = cache.page_table(ids), cache.seq_lens(ids)
    for layer in range(L):
        cache.append(layer, k, v, slots)                    # k, v: [sum(n), Hkv, D]
        out = draft_block_attention(q, cache.k_cache(layer), cache.v_cache(layer),
                                    page_table, seq_lens, cu_q_lens)
    ...verify...
    cache.rollback(ids, num_accepted + 1, accept_index)     # entries that stay per block
"""
from __future__ import annotations

import collections
import math
import operator

import torch

from .attention import append_kv, kv_rollback


class OutOfPagesError(RuntimeError):
    """The free list cannot cover a reservation; nothing was allocated and every request is unchanged."""


class PagedKVCache:
    """K/V caches of all layers, stacked: ``k``, ``v`` are [num_layers, num_pages, page_size, num_kv_heads, head_dim].

    Args:
      num_layers, num_pages, page_size, num_kv_heads, head_dim: cache geometry.
      dtype, device: of the cache tensors.
      max_pages_per_request: cap on one request's pages; default num_pages.
    """

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu", *,
                 max_pages_per_request: int | None = None):
        for name, value in (("num_layers", num_layers), ("num_pages", num_pages), ("page_size", page_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_pages * page_size >= 2**31:
            raise ValueError(f"num_pages * page_size must be < 2^31 (int32 positions), got {num_pages * page_size}")
        self.num_layers, self.num_pages, self.page_size = num_layers, num_pages, page_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.max_pages_per_request = num_pages if max_pages_per_request is None else int(max_pages_per_request)
        if not 1 <= self.max_pages_per_request <= num_pages:
            raise ValueError(f"max_pages_per_request must be in [1, {num_pages}], got {max_pages_per_request}")
        self.device = torch.device(device)
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: lowest ids are handed out first
        self._pages: dict[int, list[int]] = {}
        self._length: dict[int, int] = {}
        self._block_start: dict[int, int] = {}
        # Rollbacks whose new lengths are still on the device: (event, host lengths, request ids, block starts).
        self._pending: collections.deque = collections.deque()

    # ---- geometry and views ------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def k_cache(self, layer: int) -> torch.Tensor:
        """Layer `layer` of the K cache, [num_pages, page_size, Hkv, D] (a view)."""
        return self.k[layer]

    def v_cache(self, layer: int) -> torch.Tensor:
        return self.v[layer]

    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(k_cache, v_cache) views of every layer, e.g. for models.PagedAttention."""
        return [(self.k[i], self.v[i]) for i in range(self.num_layers)]

    @property
    def num_free_pages(self) -> int:
        self._settle()
        return len(self._free)

    @property
    def requests(self) -> list[int]:
        return list(self._pages)

    def length(self, request: int) -> int:
        """Number of KV positions the request holds (reserved positions included)."""
        self._settle()
        return self._length[self._known(request)]

    def pages(self, request: int) -> list[int]:
        """The request's pages, in position order (a copy)."""
        self._settle()
        return list(self._pages[self._known(request)])

    # ---- allocation --------------------------------------------------------
    def reserve(self, request: int, n: int) -> torch.Tensor:
        """Room for `n` more tokens of `request` (created if new); returns their slots, int64 [n] on the device.

        The request's length grows by n now (its next block), and
        ``rollback`` defaults its block_start to the length before this call.
        Raises OutOfPagesError (nothing changed) when pages run out.
        """
        return self.reserve_batch([request], [n])

    def reserve_batch(self, request_ids, counts) -> torch.Tensor:
        """``reserve`` for several requests at once, all or nothing; the slots concatenated in batch order."""
        self._settle()
        ids = [self._as_id(r) for r in request_ids]
        counts = [int(c) for c in counts]
        if len(ids) != len(counts):
            raise ValueError(f"request_ids and counts differ in length ({len(ids)} vs {len(counts)})")
        if len(set(ids)) != len(ids):
            raise ValueError("request_ids must not repeat a request")
        need = []
        for r, n in zip(ids, counts):
            if n < 0:
                raise ValueError(f"counts must be >= 0, got {n} for request {r}")
            total = math.ceil((self._length.get(r, 0) + n) / self.page_size)
            if total > self.max_pages_per_request:
                raise OutOfPagesError(f"request {r} would need {total} pages (length {self._length.get(r, 0)} + {n}), "
                                      f"more than max_pages_per_request = {self.max_pages_per_request}")
            need.append(total - len(self._pages.get(r, ())))
        if sum(need) > len(self._free):
            raise OutOfPagesError(f"need {sum(need)} free pages for this reservation, only {len(self._free)} of "
                                  f"{self.num_pages} are free")
        slots = []
        for r, n, extra in zip(ids, counts, need):
            pages = self._pages.setdefault(r, [])
            pages.extend(self._free.pop() for _ in range(extra))
            start = self._length.get(r, 0)
            self._block_start[r] = start
            self._length[r] = start + n
            slots.extend(pages[p // self.page_size] * self.page_size + p % self.page_size
                         for p in range(start, start + n))
        return torch.tensor(slots, dtype=torch.int64).to(self.device, non_blocking=True)

    def free(self, request: int) -> None:
        """Return all pages of `request` to the free list and forget it."""
        self._settle()
        r = self._known(request)
        self._free.extend(reversed(self._pages.pop(r)))
        del self._length[r]
        self._block_start.pop(r, None)

    # ---- device-side views of a batch --------------------------------------
    def page_table(self, request_ids, width: int | None = None) -> torch.Tensor:
        """int32 [B, width] page ids on the device (-1 past each request's pages).

        width defaults to the most pages any of these requests holds; pass a fixed
        width (e.g. max_pages_per_request) for shapes that stay put under CUDA graphs.
        """
        self._settle()
        lists = [self._pages[self._known(r)] for r in request_ids]
        width = max((len(p) for p in lists), default=0) if width is None else int(width)
        rows = []
        for r, pages in zip(request_ids, lists):
            if len(pages) > width:
                raise ValueError(f"width {width} is smaller than request {r}'s {len(pages)} pages")
            rows.append(pages + [-1] * (width - len(pages)))
        table = torch.tensor(rows, dtype=torch.int32).reshape(len(rows), width)
        return table.to(self.device, non_blocking=True)

    def seq_lens(self, request_ids) -> torch.Tensor:
        """int32 [B] lengths on the device."""
        self._settle()
        lens = [self._length[self._known(r)] for r in request_ids]
        return torch.tensor(lens, dtype=torch.int32).to(self.device, non_blocking=True)

    # ---- device ops ----------------------------------------------------------
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write k, v [T, Hkv, D] of layer `layer` into the slots returned by reserve / reserve_batch."""
        append_kv(k, v, self.k[layer], self.v[layer], slot_mapping)

    def rollback(self, request_ids, num_accepted, accept_index=None, *, block_start=None,
                 page_table: torch.Tensor | None = None, seq_lens: torch.Tensor | None = None) -> None:
        """After verification: keep `num_accepted[b]` entries of each request's block, in all layers.

        Entry block_start + accept_index[b, i] moves to block_start + i
        (accept_index None: the first num_accepted entries stay where they
        are), the rest of the block is dropped and pages past the new length
        go back to the free list.

        Args:
          request_ids: the batch (B ids).
          num_accepted: [B] tensor (CPU or device) or a list of ints: entries that stay.
          accept_index: [B, M] integer tensor, or None (chain).
          block_start: [B] positions of the blocks' first entries; default: the
            length each request had before its last reserve.
          page_table, seq_lens: the batch's device tensors if the caller has
            them (seq_lens is updated in place to the new lengths); built
            otherwise.

        A device `num_accepted` is not waited for: the new lengths are copied
        back asynchronously and applied (pages released) the next time the
        host needs this cache's bookkeeping.
        """
        self._settle()
        ids = [self._known(r) for r in request_ids]
        starts = [self._block_start.get(r, self._length[r]) for r in ids] if block_start is None else (
            [int(s) for s in (block_start.tolist() if isinstance(block_start, torch.Tensor) else block_start)])
        if len(starts) != len(ids):
            raise ValueError(f"block_start must have {len(ids)} entries, got {len(starts)}")
        host_counts = None
        if not isinstance(num_accepted, torch.Tensor):
            host_counts = [int(n) for n in num_accepted]
            num_accepted = torch.tensor(host_counts, dtype=torch.int32)
        elif num_accepted.device.type == "cpu":
            host_counts = [int(n) for n in num_accepted.tolist()]
        if host_counts is not None:
            if len(host_counts) != len(ids):
                raise ValueError(f"num_accepted must have {len(ids)} entries, got {len(host_counts)}")
            for r, s, n in zip(ids, starts, host_counts):
                if not 0 <= s <= s + n <= self._length[r]:
                    raise ValueError(f"request {r}: block_start {s} + num_accepted {n} must lie within its length "
                                     f"{self._length[r]}")
        if page_table is None:
            page_table = self.page_table(ids)
        if seq_lens is None:
            seq_lens = self.seq_lens(ids)
        block_start_t = torch.tensor(starts, dtype=torch.int32).to(self.device, non_blocking=True)
        kv_rollback(self.k, self.v, page_table, seq_lens, block_start_t, accept_index,
                    num_accepted.to(self.device, non_blocking=True))
        if host_counts is not None:
            self._apply(ids, starts, host_counts)
            return
        host = torch.empty(len(ids), dtype=torch.int32, pin_memory=self.device.type == "cuda")
        host.copy_(num_accepted, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self._pending.append((event, host, ids, starts))

    # ---- internals -----------------------------------------------------------
    def _apply(self, ids, starts, counts) -> None:
        for r, s, n in zip(ids, starts, counts):
            new_len = s + n
            keep = math.ceil(new_len / self.page_size)
            pages = self._pages[r]
            self._free.extend(reversed(pages[keep:]))
            del pages[keep:]
            self._length[r] = new_len
            self._block_start.pop(r, None)

    def _settle(self) -> None:
        """Apply rollbacks whose new lengths were still on the device (waits for them if needed)."""
        while self._pending:
            event, host, ids, starts = self._pending.popleft()
            if event is not None:
                event.synchronize()
            self._apply(ids, starts, host.tolist())

    @staticmethod
    def _as_id(request) -> int:
        if isinstance(request, bool):
            raise TypeError(f"request ids must be ints, got {request!r}")
        try:
            return operator.index(request)
        except TypeError:
            raise TypeError(f"request ids must be ints, got {request!r}") from None

    def _known(self, request) -> int:
        r = self._as_id(request)
        if r not in self._pages:
            raise KeyError(f"unknown request {r}")
        return r


def position_slots(page_table: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """KV slots (page * page_size + offset) of ``positions`` [B, T] in each row's pages ``page_table`` [B, W]:
    int64 [B, T], on the device (no host round trip: usable inside a captured CUDA graph)."""
    page = page_table.gather(1, torch.div(positions, page_size, rounding_mode="floor")).to(torch.int64)
    return page * page_size + positions % page_size

"""KV pages: the target's paged cache and the drafting strategy's, reserved for a request's whole lifetime
when it joins (so no allocation happens between decode steps) and returned when it leaves, and the pages the
padding slots write into."""
from __future__ import annotations

import math

import torch

from ..kv_cache import OutOfPagesError, PagedKVCache
from ..proposers import Proposer

_PAD_REQUEST = -(2**40)      # the owner of the padding slots' pages (CUDA-graph buckets, the step-cost profile)


class KVPages:
    """The target cache (``target``) and the strategy's caches, page for page.

    Args:
      max_tokens: KV capacity (tokens) of the target cache, shared by all requests.
      pads: reserve pages for padding slots (CUDA graphs, draft_max_batch="auto"); see :meth:`padding`.
    """

    def __init__(self, target, proposer: Proposer, *, max_batch: int, max_tokens: int, page_size: int, pads: bool):
        self.proposer = proposer
        # K/V rows a decode step may write past a request's context: its verify block or its draft block.
        self.step_rows = max(proposer.block_size + 1, proposer.cache_rows)
        self.pages_per_request = math.ceil((max_tokens + self.step_rows) / page_size)
        num_pages = self.pages_per_request + max_batch + (math.ceil(self.step_rows / page_size) if pads else 0)
        layers, heads, dim = target.kv_cache_shape()
        self.target = PagedKVCache(layers, num_pages, page_size, heads, dim, target.dtype, target.device,
                                   max_pages_per_request=self.pages_per_request)
        proposer.setup_cache(num_pages, page_size, self.pages_per_request)

    @property
    def capacity(self) -> int:
        """KV positions one request may hold."""
        return self.pages_per_request * self.target.page_size

    def lifetime_tokens(self, prompt_len: int, max_new_tokens: int) -> int:
        """KV positions a request reserves when it joins: its context can reach prompt + max_new_tokens - 1,
        and a step writes step_rows rows from there."""
        return prompt_len + max_new_tokens - 1 + self.step_rows

    def reserve(self, request_id: int, prompt_len: int, max_new_tokens: int):
        """The pages of a request's lifetime in every cache, all or nothing (OutOfPagesError); returns the
        prompt's slots in the target cache and what the strategy's ``reserve`` returned."""
        n = self.lifetime_tokens(prompt_len, max_new_tokens)
        slots = self.target.reserve(request_id, n)[:prompt_len]
        try:
            return slots, self.proposer.reserve(request_id, n, prompt_len)
        except OutOfPagesError:
            self.target.free(request_id)
            raise

    def free(self, request_id: int) -> None:
        self.target.free(request_id)
        self.proposer.free(request_id)

    def padding(self) -> dict[str, torch.Tensor]:
        """Reserve the padding slots' pages: a page-table row per page table of the slot state, by name."""
        self.target.reserve(_PAD_REQUEST, self.step_rows)
        pads = {"target_pages": self.target.page_table([_PAD_REQUEST], width=self.pages_per_request)[0]}
        return pads | self.proposer.reserve_padding(_PAD_REQUEST, self.step_rows)

"""Executable specification of the paged-KV ops: ``append_kv``, ``draft_block_attention``, ``kv_rollback``.

Plain loops over requests: gather a request's pages into a contiguous
sequence, then call torch's scaled_dot_product_attention with an explicit
mask (in fp32). The kernels must agree within the dtype's tolerance.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def slots(page_table_row: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """Slot (page * page_size + offset) of each KV position of one request."""
    pages = page_table_row.long()[positions // page_size]
    return pages * page_size + positions % page_size


def gather_kv(cache: torch.Tensor, page_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """[length, Hkv, D]: positions 0..length-1 of one request, in order."""
    num_pages, page_size = cache.shape[:2]
    flat = cache.reshape(num_pages * page_size, *cache.shape[2:])
    return flat[slots(page_table_row, torch.arange(length, device=cache.device), page_size)]


def append_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Row t of k / v goes to slot slot_mapping[t] of k_cache / v_cache (in place); -1 skips the row."""
    num_pages, page_size = k_cache.shape[:2]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        k_cache[slot // page_size, slot % page_size] = k[t]
        v_cache[slot // page_size, slot % page_size] = v[t]


def block_mask(n: int, length: int, causal: bool, device=None) -> torch.Tensor:
    """[n, length] bool: which KV positions each of the block's n rows sees.

    The block's tokens are the last n positions of the sequence. Causal: row i
    sees positions 0..length-n+i (the prefix and block tokens up to itself);
    block mode: every row sees the whole sequence.
    """
    pos = torch.arange(length, device=device)
    if not causal:
        return torch.ones(n, length, dtype=torch.bool, device=device)
    last = length - n + torch.arange(n, device=device)
    return pos[None, :] <= last[:, None]


def draft_block_attention(q, k_cache, v_cache, page_table, seq_lens, cu_q_lens, *, causal=True, scale=None):
    """Attention of each request's query block over its paged K/V; out [T, Hq, D] in q's dtype."""
    T, Hq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros_like(q)
    cu = cu_q_lens.tolist()
    for b, length in enumerate(seq_lens.tolist()):
        n = cu[b + 1] - cu[b]
        if n == 0:
            continue
        k = gather_kv(k_cache, page_table[b], length).float().transpose(0, 1)  # [Hkv, L, D]
        v = gather_kv(v_cache, page_table[b], length).float().transpose(0, 1)
        qb = q[cu[b]:cu[b + 1]].float().transpose(0, 1)                           # [Hq, n, D]
        mask = block_mask(n, length, causal, q.device)
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[cu[b]:cu[b + 1]] = o.transpose(0, 1).to(q.dtype)
    return out


def kv_rollback(k_caches, v_caches, page_table, seq_lens, block_start, accept_index, num_accepted) -> None:
    """Keep the accepted entries of each request's verified block, contiguously (in place).

    For i < num_accepted[b], entry block_start[b] + accept_index[b, i] moves to
    block_start[b] + i in every layer (accept_index None: identity, nothing
    moves); then seq_lens[b] = block_start[b] + num_accepted[b].
    """
    layers_k = [c for t in k_caches for c in (t if t.dim() == 5 else [t])]
    layers_v = [c for t in v_caches for c in (t if t.dim() == 5 else [t])]
    page_size = layers_k[0].shape[1]
    for b in range(page_table.shape[0]):
        start, n = int(block_start[b]), int(num_accepted[b])
        src = torch.arange(n) if accept_index is None else accept_index[b, :n].long().cpu()
        src_slots = slots(page_table[b].cpu(), start + src, page_size)
        dst_slots = slots(page_table[b].cpu(), start + torch.arange(n), page_size)
        for cache in layers_k + layers_v:
            flat = cache.view(-1, *cache.shape[2:])
            flat[dst_slots.to(cache.device)] = flat[src_slots.to(cache.device)].clone()
        seq_lens[b] = start + n

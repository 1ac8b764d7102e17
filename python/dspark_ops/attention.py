"""Paged KV ops: ``append_kv``, ``draft_block_attention`` and ``kv_rollback``.

Cache layout (one layer): ``[num_pages, page_size, num_kv_heads, head_dim]``.
KV position p of request b lives in page ``page_table[b, p // page_size]`` at
offset ``p % page_size``; its slot is ``page * page_size + offset``.

Index tensors are checked on the host when they are on the CPU (every rule,
each error naming the argument). On CUDA the kernels cannot raise without a
host sync: they never touch memory outside the tensors, an invalid request is
marked as documented per op, and ``check=True`` validates on the host first
(one sync).
"""
from __future__ import annotations

import torch

from ._args import check_floating, per_request
from ._ops import ops

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def index_tensor(t, name: str, device: torch.device, dim: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """An integer tensor (or nested list) as a contiguous `dtype` tensor on `device`.

    int64 values beyond int32 are clamped (so they fail the range checks
    instead of wrapping into range).
    """
    if isinstance(t, (list, tuple)):
        t = torch.tensor(t, dtype=torch.int64, device=device)
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got "
                        f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s), got shape {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the op runs on {device}")
    if t.dtype != dtype:
        if dtype == torch.int32:
            t = t.clamp(INT32_MIN, INT32_MAX)
        t = t.to(dtype)
    return t.contiguous()


def _check_cache(cache, name: str) -> None:
    if not isinstance(cache, torch.Tensor) or cache.dim() != 4:
        raise ValueError(f"{name} must be a [num_pages, page_size, num_kv_heads, head_dim] tensor, got "
                         f"{list(cache.shape) if isinstance(cache, torch.Tensor) else type(cache).__name__}")


def append_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slot_mapping, *, check: bool = False) -> None:
    """Write new K/V rows into their cache slots, in place.

    Args:
      k, v: [T, num_kv_heads, head_dim], the cache's dtype (any strides with a
        contiguous last dim, e.g. views of a fused QKV projection).
      k_cache, v_cache: [num_pages, page_size, num_kv_heads, head_dim], contiguous.
      slot_mapping: [T] integer, page * page_size + offset per row; -1 skips the
        row. Two rows with the same slot: one of them wins (unspecified which).
      check: on CUDA, slots outside [-1, num_pages * page_size) are skipped by
        the kernel; check=True raises instead (host sync). On CPU they always raise.
    """
    _check_cache(k_cache, "k_cache")
    if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
        raise TypeError("k and v must be tensors")
    slot_mapping = index_tensor(slot_mapping, "slot_mapping", k_cache.device, 1, torch.int64)
    if check and k_cache.device.type != "cpu":
        ops._check_append_kv(slot_mapping.cpu(), k_cache.shape[0] * k_cache.shape[1])
    ops.append_kv(k, v, k_cache, v_cache, slot_mapping)


def draft_block_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table, seq_lens,
                          cu_q_lens, *, causal: bool = True, scale: float | None = None,
                          max_block_rows: int = 16, check: bool = False) -> torch.Tensor:
    """Attention of ragged query blocks over a paged KV cache.

    Args:
      q: [T, Hq, D] fp16/bf16 (fp32 too); the query blocks of all requests,
        flattened: request b owns rows cu_q_lens[b]:cu_q_lens[b+1] (n_b rows,
        0 <= n_b <= max_block_rows). Those n_b tokens are the LAST n_b positions of the
        request's sequence (their K/V were appended already).
      k_cache, v_cache: [num_pages, page_size, Hkv, D] in q's dtype; Hq a
        multiple of Hkv (GQA: query head j reads kv head j // (Hq // Hkv)).
      page_table: [B, max_pages] integer page ids (entries past a request's
        length are never read; pad with -1).
      seq_lens: [B] KV length of each request, blocks included.
      cu_q_lens: [B + 1] integer, 0 = cu_q_lens[0] <= ... <= cu_q_lens[B] = T.
      causal: True (verification): block row i sees positions
        [0, seq_lens[b] - n_b + i]; False (drafter blocks): every row sees
        [0, seq_lens[b]).
      scale: softmax scale, default 1 / sqrt(D). Softmax is computed in fp32.
      max_block_rows: longest query block allowed (default 16: anchor + drafts).
        Raise it for longer blocks such as prefill: the kernels handle any
        length (the CPU one in chunks of 16 rows, skipping masked positions),
        but they are tuned for short blocks over long contexts.
      check: on CUDA, a request with invalid indices (n_b > max_block_rows,
        seq_lens < n_b or past the page table, page ids outside [0, num_pages))
        gets NaN output rows instead of an exception (no host sync), and
        cu_q_lens that does not cut [0, T) into blocks (cu_q_lens[0] != 0, a
        decrease, or cu_q_lens[-1] != T) makes every output row NaN;
        check=True validates on the host first and raises. On CPU invalid
        indices always raise.

    Returns:
      out [T, Hq, D] in q's dtype.

    On CUDA, fp16/bf16 with head_dim 64 or 128 on sm_80+ run on tensor cores
    (when the build found the CUTLASS headers: ``dspark info``), everything
    else on a SIMT kernel; the environment variable
    ``DSPARK_ATTENTION_IMPL=simt|tc`` forces one (``tc`` raises where it does
    not apply).
    """
    check_floating(q, "q")
    _check_cache(k_cache, "k_cache")
    _check_cache(v_cache, "v_cache")
    dev = q.device
    page_table = index_tensor(page_table, "page_table", dev, 2)
    seq_lens = index_tensor(seq_lens, "seq_lens", dev, 1)
    cu_q_lens = index_tensor(cu_q_lens, "cu_q_lens", dev, 1)
    if isinstance(max_block_rows, bool) or not isinstance(max_block_rows, int) or max_block_rows < 1:
        raise ValueError(f"max_block_rows must be a positive int, got {max_block_rows!r}")
    if check and dev.type != "cpu":
        ops._check_draft_block_attention(page_table.cpu(), seq_lens.cpu(), cu_q_lens.cpu(), q.shape[0],
                                         k_cache.shape[0], k_cache.shape[1], max_block_rows)
    return ops.draft_block_attention(q, k_cache, v_cache, page_table, seq_lens, cu_q_lens, causal,
                                     None if scale is None else float(scale), max_block_rows)


def _layers(caches, name: str) -> list[torch.Tensor]:
    if isinstance(caches, torch.Tensor):
        return [caches]
    if isinstance(caches, (list, tuple)) and caches and all(isinstance(c, torch.Tensor) for c in caches):
        return list(caches)
    raise TypeError(f"{name} must be a tensor ([L, num_pages, page_size, Hkv, D] or one layer) or a non-empty "
                    f"list of tensors")


def kv_rollback(k_caches, v_caches, page_table, seq_lens: torch.Tensor, block_start, accept_index,
                num_accepted, *, check: bool = False) -> None:
    """Keep the accepted entries of each request's verified block, for every layer in one launch (in place).

    For each request b and i < num_accepted[b], KV entry block_start[b] +
    accept_index[b, i] moves to block_start[b] + i (nothing moves when they are
    equal, so a chain, accept_index[b, i] = i, copies no bytes); then
    seq_lens[b] = block_start[b] + num_accepted[b], in place. No host sync.

    Args:
      k_caches, v_caches: stacked [L, num_pages, page_size, Hkv, D] tensors, a
        single layer, or a list of either (all layers alike).
      page_table: [B, max_pages] integer.
      seq_lens: [B] int32, the lengths before rollback (blocks included);
        overwritten with the new lengths.
      block_start: [B] or a number, the position of each block's first entry.
      accept_index: [B, M] integer, strictly increasing in its first
        num_accepted[b] entries (block offsets of the entries that stay), or
        None for the identity (chain verification: only lengths change).
      num_accepted: [B] or a number, entries of the block that stay. For a
        chain block [last token, d_1..d_K] with n drafts accepted by `verify`,
        that is n + 1 (the bonus/correction token has no K/V yet).
      check: on CUDA an invalid request (entries past the page table, sources
        not strictly increasing, bad page ids) is left untouched, its length
        too; check=True validates on the host first and raises. On CPU invalid
        indices always raise (nothing is modified).
    """
    k_list, v_list = _layers(k_caches, "k_caches"), _layers(v_caches, "v_caches")
    dev = k_list[0].device
    if not isinstance(seq_lens, torch.Tensor) or seq_lens.dtype != torch.int32:
        raise TypeError("seq_lens must be an int32 tensor (it is updated in place)")
    page_table = index_tensor(page_table, "page_table", dev, 2)
    B = page_table.shape[0]
    block_start = per_request(block_start, "block_start", B, dev, torch.int32, 0)
    num_accepted = per_request(num_accepted, "num_accepted", B, dev, torch.int32, 0)
    if accept_index is not None:
        accept_index = index_tensor(accept_index, "accept_index", dev, 2)
    if check and dev.type != "cpu":
        cache = k_list[0]
        num_pages, page_size = (cache.shape[1], cache.shape[2]) if cache.dim() == 5 else cache.shape[:2]
        ops._check_kv_rollback(page_table.cpu(), seq_lens.cpu(), block_start.cpu(),
                               None if accept_index is None else accept_index.cpu(), num_accepted.cpu(),
                               num_pages, page_size)
    ops.kv_rollback(k_list, v_list, page_table, seq_lens, block_start, accept_index, num_accepted)

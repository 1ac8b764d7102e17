"""Attention backends: where the K/V of a forward pass go and how queries attend to them.

A model layer computes q [..., Hq, D] and k, v [..., Hkv, D] (RoPE applied) and
hands them to a backend object created for that forward pass:

- ``backend.append(layer, k, v)`` stores K/V without attending (the drafter's
  target context);
- ``backend.attend(layer, q, k, v)`` stores K/V of the new tokens, then returns
  the attention output [..., Hq, D] of ``q`` over everything the backend holds
  for those requests.

Backends here:

- :class:`CausalAttention`: no cache; causal SDPA over the given [B, T] tokens.
  Differentiable (training, full-sequence scoring).
- :class:`MaskedAttention`: no cache; appended context K/V plus the new tokens,
  under an explicit boolean mask. Differentiable (drafter training).
- :class:`DenseKVCache` / :class:`DenseCacheAttention`: one contiguous K/V
  buffer per request (tests, simple generation). Pure PyTorch.
- :class:`PagedAttention`: the ops ``dspark_ops.append_kv`` and
  ``dspark_ops.draft_block_attention`` over paged caches (the engine).
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
         causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D] -> [B, Tq, Hq, D]; mask [B, Tq, Tk] bool (True = visible).

    GQA: query head h reads kv head h // (Hq / Hkv).
    """
    group = q.shape[-2] // k.shape[-2]
    if group > 1:
        k = k.unsqueeze(-2).expand(*k.shape[:-1], group, k.shape[-1]).flatten(-3, -2)
        v = v.unsqueeze(-2).expand(*v.shape[:-1], group, v.shape[-1]).flatten(-3, -2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=None if mask is None else mask.unsqueeze(1),
                                         is_causal=causal, scale=scale)
    return out.transpose(1, 2)


class CausalAttention:
    """No cache: each of the B sequences of T tokens attends causally to itself."""

    def __init__(self, *, scale: float | None = None):
        self.scale = scale

    def append(self, layer, k, v):
        raise ValueError("CausalAttention keeps no cache: pass a DenseKVCache or a MaskedAttention to append context")

    def attend(self, layer, q, k, v):
        if q.dim() != 4:
            raise ValueError(f"without a cache the input must be batched [B, T], got q of shape {list(q.shape)}")
        return sdpa(q, k, v, causal=True, scale=self.scale)


class MaskedAttention:
    """No cache: context K/V given by ``append`` followed by the new tokens' own K/V, under ``mask``.

    mask [B, Tq, Tctx + Tq] bool: query i may read key j (context keys first).
    Every row must see at least one key.
    """

    def __init__(self, mask: torch.Tensor, *, scale: float | None = None):
        self.mask, self.scale = mask, scale
        self._context: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def append(self, layer, k, v):
        self._context[layer] = (k, v)

    def attend(self, layer, q, k, v):
        if layer in self._context:
            ck, cv = self._context[layer]
            k, v = torch.cat((ck, k), dim=1), torch.cat((cv, v), dim=1)
        if self.mask.shape != (q.shape[0], q.shape[1], k.shape[1]):
            raise ValueError(f"mask must have shape {[q.shape[0], q.shape[1], k.shape[1]]}, "
                             f"got {list(self.mask.shape)}")
        return sdpa(q, k, v, mask=self.mask, scale=self.scale)


class DenseKVCache:
    """Contiguous K/V per request and layer: k, v [L, B, capacity, Hkv, D]; ``lengths`` [B] (CPU int64).

    A forward pass with this cache writes the new tokens' K/V at positions
    ``lengths[b] ..``; the model advances ``lengths`` for tokens that are kept
    (target tokens, drafter context) and leaves it for scratch entries (a
    drafter's block). ``truncate`` rolls requests back.
    """

    def __init__(self, num_layers: int, batch_size: int, capacity: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (num_layers, batch_size, capacity, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.int64)
        self.capacity = capacity

    @classmethod
    def for_model(cls, model, batch_size: int, capacity: int) -> "DenseKVCache":
        """A cache shaped for ``model`` (a LlamaModel or a drafter: anything with ``kv_cache_shape``)."""
        num_layers, num_kv_heads, head_dim = model.kv_cache_shape()
        p = next(model.parameters())
        return cls(num_layers, batch_size, capacity, num_kv_heads, head_dim, dtype=p.dtype, device=p.device)

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def attention(self, *, causal: bool = True, scale: float | None = None) -> "DenseCacheAttention":
        return DenseCacheAttention(self, causal=causal, scale=scale)

    def advance(self, n: int) -> None:
        self.lengths += n

    def truncate(self, lengths) -> None:
        """Roll back: request b keeps its first ``lengths[b]`` entries (no more than it has)."""
        lengths = torch.as_tensor(lengths, dtype=torch.int64).reshape(-1)
        if lengths.shape != self.lengths.shape or (lengths < 0).any() or (lengths > self.lengths).any():
            raise ValueError(f"lengths must be [{self.batch_size}] with 0 <= lengths <= current lengths "
                             f"{self.lengths.tolist()}, got {lengths.tolist()}")
        self.lengths.copy_(lengths)

    def positions(self, num_new: int) -> torch.Tensor:
        """[B, num_new] positions of the next ``num_new`` tokens of every request."""
        return (self.lengths.unsqueeze(1) + torch.arange(num_new)).to(self.k.device)


class DenseCacheAttention:
    """A forward pass over a :class:`DenseKVCache`: inputs are [B, T] with request b starting at lengths[b]."""

    def __init__(self, cache: DenseKVCache, *, causal: bool, scale: float | None):
        self.cache, self.causal, self.scale = cache, causal, scale
        self._start = cache.lengths.clone()

    def _write(self, layer, k, v):
        if k.dim() != 4 or k.shape[0] != self.cache.batch_size:
            raise ValueError(f"a DenseKVCache of batch {self.cache.batch_size} needs inputs [B, T], "
                             f"got k of shape {list(k.shape)}")
        t = k.shape[1]
        end = int(self._start.max()) + t
        if end > self.cache.capacity:
            raise ValueError(f"DenseKVCache capacity {self.cache.capacity} exceeded: a request would reach {end} tokens")
        pos = (self._start.unsqueeze(1) + torch.arange(t)).to(k.device)
        rows = torch.arange(k.shape[0], device=k.device).unsqueeze(1)
        self.cache.k[layer][rows, pos] = k.to(self.cache.k.dtype)
        self.cache.v[layer][rows, pos] = v.to(self.cache.v.dtype)
        return end

    def append(self, layer, k, v):
        self._write(layer, k, v)

    def attend(self, layer, q, k, v):
        end = self._write(layer, k, v)
        t = q.shape[1]
        keys = torch.arange(end, device=q.device)
        seen = (self._start.to(q.device) + t).view(-1, 1, 1)      # keys [0, start + T) of each request
        if self.causal:
            seen = seen - (t - 1 - torch.arange(t, device=q.device)).view(1, -1, 1)
        mask = keys.view(1, 1, -1) < seen
        return sdpa(q, self.cache.k[layer][:, :end], self.cache.v[layer][:, :end],
                    mask=mask.expand(q.shape[0], t, end), scale=self.scale)


class PagedAttention:
    """A forward pass over paged caches with ``dspark_ops.append_kv`` and ``dspark_ops.draft_block_attention``.

    Inputs are flattened ragged blocks: q [N, Hq, D], k, v [N, Hkv, D] (any
    leading shape is flattened). Per forward, the engine gives:

    - kv_caches: one (k_cache, v_cache) pair per layer, each [num_pages, page_size, Hkv, D];
    - slot_mapping [N] int64: page * page_size + offset of every new token (-1 = skip);
    - page_table [B, max_pages] int32, seq_lens [B] (lengths INCLUDING the new
      tokens), cu_q_lens [B+1]: the layout ``draft_block_attention`` expects
      (not needed for a forward that only appends).

    causal=True for the target (verification/prefill), False for drafter blocks;
    max_block_rows: the longest block (16 for draft/verify blocks; the prompt length for prefill).
    """

    def __init__(self, kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]], *, slot_mapping: torch.Tensor,
                 page_table: torch.Tensor | None = None, seq_lens: torch.Tensor | None = None,
                 cu_q_lens: torch.Tensor | None = None, causal: bool = True, scale: float | None = None,
                 max_block_rows: int = 16, ops=None):
        if ops is None:
            import dspark_ops as ops
        self.kv_caches, self.slot_mapping = kv_caches, slot_mapping
        self.page_table, self.seq_lens, self.cu_q_lens = page_table, seq_lens, cu_q_lens
        self.causal, self.scale, self.max_block_rows, self.ops = causal, scale, max_block_rows, ops

    def append(self, layer, k, v):
        k_cache, v_cache = self.kv_caches[layer]
        self.ops.append_kv(k.reshape(-1, *k.shape[-2:]), v.reshape(-1, *v.shape[-2:]), k_cache, v_cache,
                           self.slot_mapping)

    def attend(self, layer, q, k, v):
        if self.page_table is None or self.seq_lens is None or self.cu_q_lens is None:
            raise ValueError("PagedAttention.attend needs page_table, seq_lens and cu_q_lens")
        self.append(layer, k, v)
        k_cache, v_cache = self.kv_caches[layer]
        out = self.ops.draft_block_attention(q.reshape(-1, *q.shape[-2:]), k_cache, v_cache, self.page_table,
                                             self.seq_lens, self.cu_q_lens, causal=self.causal, scale=self.scale,
                                             max_block_rows=self.max_block_rows)
        return out.view(q.shape)

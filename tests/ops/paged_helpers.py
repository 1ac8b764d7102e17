"""Random paged-KV problems shared by test_attention.py and test_kv_cache.py."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

# Output tolerances against the fp32 SDPA reference (outputs are convex
# combinations of V rows with |v| ~ 1): fp32 differs by summation order only;
# bf16 / fp16 outputs may differ by one rounding of the stored result.
TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


@contextlib.contextmanager
def poisoned_empty():
    """torch.empty (also inside the ops) returns NaN-filled memory, so unwritten outputs show."""
    was_det = torch.are_deterministic_algorithms_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_det)
        torch.utils.deterministic.fill_uninitialized_memory = was_fill


@dataclass
class PagedProblem:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    page_table: torch.Tensor
    seq_lens: torch.Tensor
    cu_q_lens: torch.Tensor

    def args(self):
        return self.q, self.k_cache, self.v_cache, self.page_table, self.seq_lens, self.cu_q_lens


def random_problem(gen: torch.Generator, *, block_rows, seq_lens, num_kv_heads: int, group: int, head_dim: int,
                   page_size: int, dtype: torch.dtype, spare_pages: int = 3, pad: int = 2,
                   device: str = "cpu") -> PagedProblem:
    """Requests with the given query-block rows and KV lengths, their pages shuffled across one pool.

    page_table rows are padded with `pad` entries of -1 beyond each request's
    pages; `spare_pages` pages belong to nobody.
    """
    B = len(block_rows)
    pages_per = [(s + page_size - 1) // page_size for s in seq_lens]
    num_pages = sum(pages_per) + spare_pages
    perm = torch.randperm(num_pages, generator=gen).tolist()
    width = max(pages_per, default=0) + pad
    table = torch.full((B, width), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages_per):
        table[b, :n] = torch.tensor(perm[used:used + n], dtype=torch.int32)
        used += n
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    T = sum(block_rows)
    q = torch.randn(T, num_kv_heads * group, head_dim, generator=gen).to(dtype)
    cu = torch.tensor([0] + list(torch.tensor(block_rows).cumsum(0).tolist()), dtype=torch.int32)
    return PagedProblem(q.to(device), k_cache.to(device), v_cache.to(device), table.to(device),
                        torch.tensor(seq_lens, dtype=torch.int32, device=device), cu.to(device))


def random_blocks(gen: torch.Generator, batch: int, max_len: int, *, must_have=(0, 16)):
    """Ragged block sizes in 0..16 (the values in `must_have` included) and lengths >= each block."""
    rows = torch.randint(0, 17, (batch,), generator=gen).tolist()
    for i, n in enumerate(must_have[:batch]):
        rows[i] = n
    lens = [int(torch.randint(max(n, 1), max_len + 1, (1,), generator=gen)) for n in rows]
    return rows, lens

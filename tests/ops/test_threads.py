"""The CPU kernels run on torch's intra-op threads (not a timing test).

`at::parallel_for` is header code: an extension built without OpenMP runs every
parallel region on one thread whatever torch.get_num_threads() says. The
library's own probe counts the OS threads that ran a region.
"""
import torch

import dspark_ops


def test_built_with_openmp():
    assert dspark_ops.build_info()["openmp"], "the extension was compiled without OpenMP"


def test_parallel_region_follows_torch_threads():
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert dspark_ops.build_info()["cpu_threads"] == n
    finally:
        torch.set_num_threads(before)


# ---- every op gives bit-identical results on 1 and on several threads -------------------------------
#
# The kernels split work into items whose arithmetic does not depend on which thread runs them (linear:
# whole column groups; attention: KV splits at fixed positions; verify / markov: whole rows). Each
# problem below is large enough that the parallel region really hands items to more than one thread.

import pytest

from paged_helpers import random_problem
from randomness import fresh_seed


def _on_threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def _same_on_1_and_2_threads(fn):
    one, two = _on_threads(1, fn), _on_threads(2, fn)
    one = one if isinstance(one, (tuple, list)) else (one,)
    two = two if isinstance(two, (tuple, list)) else (two,)
    assert len(one) == len(two)
    for a, b in zip(one, two):
        if a is None:
            assert b is None
            continue
        # equal bits, NaN-aware: equal_nan would hide a NaN written by one thread count only
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                           b.view(torch.uint8) if b.is_floating_point() else b)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_linear_thread_independent(wdtype, rows):
    gen = torch.Generator().manual_seed(fresh_seed())
    w = torch.randn(1000, 576, generator=gen)
    wgu = torch.randn(2 * 600, 576, generator=gen)
    x = torch.randn(rows, 576, generator=gen)
    bias, residual = torch.randn(1000, generator=gen), torch.randn(rows, 1000, generator=gen)
    p = dspark_ops.pack_linear_weight(w, wdtype)
    pgu = dspark_ops.pack_linear_weight(wgu, wdtype, gate_up=True)
    _same_on_1_and_2_threads(lambda: (dspark_ops.linear(x, p, bias, residual=residual),
                                      dspark_ops.linear_silu_mul(x, pgu)))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_verify_thread_independent(temperature):
    gen = torch.Generator().manual_seed(fresh_seed())
    B, K, V = 6, 5, 3000
    logits = torch.randn(B, K + 1, V, generator=gen) * 3
    q = torch.softmax(torch.randn(B, K, V, generator=gen) * 3, -1)
    drafts = torch.multinomial(q.view(-1, V), 1, generator=gen).view(B, K)
    seeds = torch.randint(0, 2**40, (B,), generator=gen)
    _same_on_1_and_2_threads(lambda: dspark_ops.verify(logits, drafts, q, temperature=temperature, top_p=0.9,
                                                       seed=seeds))


def test_markov_sample_thread_independent():
    gen = torch.Generator().manual_seed(fresh_seed())
    B, G, V, r, H = 4, 6, 5000, 32, 16
    U = torch.randn(B, G, V, generator=gen) * 2
    w1, w2 = torch.randn(V, r, generator=gen) * 0.6, torch.randn(r, V, generator=gen) * 0.6
    anchor = torch.randint(0, V, (B,), generator=gen)
    hidden, conf_w = torch.randn(B, G, H, generator=gen), torch.randn(H + r, generator=gen)
    seeds = torch.randint(0, 2**40, (B,), generator=gen)
    _same_on_1_and_2_threads(lambda: dspark_ops.markov_sample(U, anchor, w1, w2, hidden=hidden, conf_weight=conf_w,
                                                              temperature=0.9, seed=seeds))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_block_attention_thread_independent(dtype, causal):
    gen = torch.Generator().manual_seed(fresh_seed())
    # lengths past the fixed split length (1024) so that chunks have several KV splits and a combine
    P = random_problem(gen, block_rows=[16, 3, 1, 8], seq_lens=[2500, 40, 1100, 300], num_kv_heads=2, group=3,
                       head_dim=64, page_size=16, dtype=dtype)
    _same_on_1_and_2_threads(lambda: dspark_ops.draft_block_attention(*P.args(), causal=causal))


def test_append_kv_and_rollback_thread_independent():
    gen = torch.Generator().manual_seed(fresh_seed())
    layers, pages, page_size, H, D, B = 3, 40, 16, 2, 64, 4
    caches = [torch.randn(pages, page_size, H, D, generator=gen) for _ in range(2 * layers)]
    table = torch.randperm(pages, generator=gen)[:B * 8].view(B, 8).to(torch.int32)
    start = torch.tensor([5, 30, 17, 60])
    K = 7
    T = B * (K + 1)
    k, v = torch.randn(T, H, D, generator=gen), torch.randn(T, H, D, generator=gen)
    pos = (start[:, None] + torch.arange(K + 1)).reshape(-1)
    slots = (table.view(-1)[(torch.arange(B).repeat_interleave(K + 1) * 8 + pos // page_size)].long() * page_size
             + pos % page_size)
    accept = torch.sort(torch.stack([torch.randperm(K + 1, generator=gen)[:K] for _ in range(B)]), -1).values
    num_accepted = torch.randint(0, K + 1, (B,), generator=gen).to(torch.int32)

    def run():
        kc = [c.clone() for c in caches[:layers]]
        vc = [c.clone() for c in caches[layers:]]
        for layer in range(layers):
            dspark_ops.append_kv(k + layer, v - layer, kc[layer], vc[layer], slots)
        seq_lens = (start + K + 1).to(torch.int32)
        dspark_ops.kv_rollback(kc, vc, table, seq_lens, start.to(torch.int32), accept.to(torch.int32), num_accepted)
        return (*kc, *vc, seq_lens)

    _same_on_1_and_2_threads(run)


def test_schedule_thread_independent():
    gen = torch.Generator().manual_seed(fresh_seed())
    conf = torch.rand(32, 7, generator=gen)
    sps = torch.linspace(100, 20, 300)
    _same_on_1_and_2_threads(lambda: (dspark_ops.schedule_verify_lengths(conf, sps, mode="sync"),
                                      dspark_ops.schedule_verify_lengths(conf, sps, mode="async", capacity=90)))

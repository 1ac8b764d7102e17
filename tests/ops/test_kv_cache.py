"""append_kv and kv_rollback against the reference (all layers, stacked or listed caches), chain
rollback touching no bytes, PagedKVCache (allocation, isolation, out-of-pages, page return), a fuzz
test of append / verify / rollback rounds against a per-request list model, bad input, CUDA."""
from __future__ import annotations

import pytest
import torch

import dspark_ops
from dspark_ops import OutOfPagesError, PagedKVCache, reference

from paged_helpers import TOLERANCES, random_problem
from randomness import fresh_seed

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Byte equality (NaN payloads included)."""
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(as_int), b.view(as_int))


# ---------------------------------------------------------------------------------------------
# append_kv


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d)[6:])
def test_append_matches_reference_and_touches_nothing_else(dtype):
    gen = torch.Generator().manual_seed(fresh_seed())
    P, S, H, D, T = 12, 16, 3, 64, 40
    k_cache = torch.randn(P, S, H, D, generator=gen).to(dtype)
    v_cache = torch.randn(P, S, H, D, generator=gen).to(dtype)
    slots = torch.randperm(P * S, generator=gen)[:T]
    slots[::7] = -1
    # k, v as strided views of one fused [T, 2H + 1, D] projection
    fused = torch.randn(T, 2 * H + 1, D, generator=gen).to(dtype)
    k, v = fused[:, 1:1 + H], fused[:, 1 + H:]
    got_k, got_v = k_cache.clone(), v_cache.clone()
    dspark_ops.append_kv(k, v, got_k, got_v, slots)
    reference.append_kv(k, v, k_cache, v_cache, slots)
    assert bits_equal(got_k, k_cache) and bits_equal(got_v, v_cache)


def test_append_into_a_layer_of_a_stacked_cache():
    cache = PagedKVCache(3, 4, 8, 2, 16, torch.float32)
    before_k, before_v = cache.k.clone(), cache.v.clone()
    slots = cache.reserve(7, 5)
    k, v = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    cache.append(1, k, v, slots)
    reference.append_kv(k, v, before_k[1], before_v[1], slots)
    assert torch.equal(cache.k, before_k) and torch.equal(cache.v, before_v)
    pairs = cache.layer_caches()
    assert len(pairs) == 3 and pairs[1][0].data_ptr() == cache.k_cache(1).data_ptr()


BAD_APPEND = [
    ("slot too big", dict(slot_mapping=torch.tensor([0, 64])), r"slot_mapping\[1\]"),
    ("slot below -1", dict(slot_mapping=torch.tensor([-2, 0])), r"slot_mapping\[0\]"),
    ("slot dtype", dict(slot_mapping=torch.tensor([0.0, 1.0])), "slot_mapping"),
    ("slot shape", dict(slot_mapping=torch.tensor([0, 1, 2])), "slot_mapping"),
    ("k shape", dict(k=torch.randn(2, 3, 8)), "k must be"),
    ("v dtype", dict(v=torch.randn(2, 2, 8).half()), "v must"),
    ("cache dims", dict(k_cache=torch.randn(8, 8, 2 * 8)), "k_cache"),
    ("cache pair", dict(v_cache=torch.randn(8, 8, 2, 4)), "v_cache"),
]


@pytest.mark.parametrize("case", BAD_APPEND, ids=[c[0] for c in BAD_APPEND])
def test_append_bad_input_names_the_argument(case):
    _, changes, pattern = case
    args = dict(k=torch.randn(2, 2, 8), v=torch.randn(2, 2, 8), k_cache=torch.randn(8, 8, 2, 8),
                v_cache=torch.randn(8, 8, 2, 8), slot_mapping=torch.tensor([3, -1]))
    args.update(changes)
    before = args["k_cache"].clone()
    with pytest.raises((ValueError, TypeError, RuntimeError), match=pattern):
        dspark_ops.append_kv(**args)
    if args["k_cache"].shape == before.shape:
        assert torch.equal(args["k_cache"], before)  # nothing written on error


# ---------------------------------------------------------------------------------------------
# kv_rollback


def _rollback_setup(gen, *, layers, dtype, page_size=4, B=5, M=8):
    """Requests whose last block (M entries) was just verified, caches for `layers` layers."""
    lens = [int(torch.randint(M, 40, (1,), generator=gen)) for _ in range(B)]
    p = random_problem(gen, block_rows=[0] * B, seq_lens=lens, num_kv_heads=2, group=1, head_dim=16,
                       page_size=page_size, dtype=dtype)
    k = torch.randn((layers,) + tuple(p.k_cache.shape), generator=gen).to(dtype)
    v = torch.randn((layers,) + tuple(p.k_cache.shape), generator=gen).to(dtype)
    block_start = p.seq_lens - M
    num_acc = torch.randint(0, M + 1, (B,), generator=gen).int()
    accept = torch.zeros(B, M, dtype=torch.int32)
    for b in range(B):
        accept[b, :int(num_acc[b])] = torch.sort(torch.randperm(M, generator=gen)[:int(num_acc[b])]).values
        accept[b, int(num_acc[b]):] = torch.randint(-5, 50, (M - int(num_acc[b]),), generator=gen)  # ignored
    return p, k, v, block_start.int(), accept, num_acc


@pytest.mark.parametrize("form", ["stacked", "list", "list_of_stacks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rollback_compacts_every_layer(form, dtype):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    p, k, v, start, accept, num_acc = _rollback_setup(gen, layers=4, dtype=dtype)
    want_k, want_v, want_lens = k.clone(), v.clone(), p.seq_lens.clone()
    reference.kv_rollback([want_k], [want_v], p.page_table, want_lens, start, accept, num_acc)
    got_k, got_v, got_lens = k.clone(), v.clone(), p.seq_lens.clone()
    if form == "stacked":
        kc, vc = got_k, got_v
    elif form == "list":
        kc, vc = list(got_k.unbind(0)), list(got_v.unbind(0))
    else:
        kc, vc = [got_k[:1], got_k[1:]], [got_v[:3], got_v[3:]]
    dspark_ops.kv_rollback(kc, vc, p.page_table, got_lens, start, accept, num_acc)
    assert torch.equal(got_lens, start + num_acc) and torch.equal(got_lens, want_lens)
    assert bits_equal(got_k, want_k) and bits_equal(got_v, want_v), f"seed {seed}"
    # entries actually moved (the test is not vacuous)
    moved = any(int(accept[b, i]) != i for b in range(len(num_acc)) for i in range(int(num_acc[b])))
    assert not moved or not torch.equal(got_k, k)


def test_rollback_chain_touches_no_bytes():
    gen = torch.Generator().manual_seed(fresh_seed())
    p, k, v, start, _, num_acc = _rollback_setup(gen, layers=3, dtype=torch.float16)
    k[0, 0, 0, 0, 0] = float("nan")  # NaN payloads survive only if nothing is rewritten
    identity = torch.arange(8, dtype=torch.int32).expand(len(num_acc), 8).contiguous()
    for accept in (identity, None):
        got_k, got_v, lens = k.clone(), v.clone(), p.seq_lens.clone()
        dspark_ops.kv_rollback(got_k, got_v, p.page_table, lens, start, accept, num_acc)
        assert bits_equal(got_k, k) and bits_equal(got_v, v)
        assert torch.equal(lens, start + num_acc)


def test_rollback_accepts_python_numbers():
    gen = torch.Generator().manual_seed(fresh_seed())
    p, k, v, _, _, _ = _rollback_setup(gen, layers=1, dtype=torch.float32, B=1)
    lens = p.seq_lens.clone()
    dspark_ops.kv_rollback(k, v, p.page_table, lens, int(lens[0]) - 8, torch.tensor([[1, 3]]), 2)
    assert lens.tolist() == [int(p.seq_lens[0]) - 6]


def _rollback_args(**changes):
    gen = torch.Generator().manual_seed(5)
    p, k, v, start, accept, num_acc = _rollback_setup(gen, layers=2, dtype=torch.float32, B=3)
    num_acc = torch.tensor([2, 0, 3], dtype=torch.int32)
    accept[:, :3] = torch.tensor([1, 4, 6], dtype=torch.int32)
    args = dict(k_caches=k, v_caches=v, page_table=p.page_table, seq_lens=p.seq_lens.clone(), block_start=start,
                accept_index=accept, num_accepted=num_acc)
    args.update({key: (val(args) if callable(val) else val) for key, val in changes.items()})
    return args


def _set(name, index, value):
    def f(a):
        t = a[name].clone()
        t[index] = value
        return t
    return f


BAD_ROLLBACK = [
    ("not increasing", dict(accept_index=_set("accept_index", (2, 1), 1)), r"accept_index\[2\]"),
    ("negative index", dict(accept_index=_set("accept_index", (0, 0), -1)), r"accept_index\[0\]"),
    ("past the length", dict(accept_index=_set("accept_index", (2, 2), 8)), r"accept_index\[2, 2\]"),
    ("too many accepted", dict(num_accepted=_set("num_accepted", 1, 9)), r"num_accepted\[1\]"),
    ("negative accepted", dict(num_accepted=_set("num_accepted", 1, -1)), r"num_accepted\[1\]"),
    ("block past length", dict(block_start=_set("block_start", 0, 1000)), r"block_start\[0\]"),
    ("seq_lens past capacity", dict(seq_lens=_set("seq_lens", 0, 100000)), r"seq_lens\[0\]"),
    ("page id", dict(page_table=_set("page_table", (1, 0), 999)), r"page_table\[1, 0\]"),
    ("seq_lens dtype", dict(seq_lens=lambda a: a["seq_lens"].long()), "seq_lens"),
    ("accept_index shape", dict(accept_index=lambda a: a["accept_index"][:2]), "accept_index"),
    ("layer count", dict(v_caches=lambda a: a["v_caches"][:1]), "layers"),
    ("layer shape", dict(v_caches=lambda a: [a["v_caches"][0], a["v_caches"][1, :, :2]]), "v_caches"),
    ("cache dtype", dict(v_caches=lambda a: a["v_caches"].half()), "v_caches"),
    ("caches type", dict(k_caches="nope"), "k_caches"),
]


@pytest.mark.parametrize("case", BAD_ROLLBACK, ids=[c[0] for c in BAD_ROLLBACK])
def test_rollback_bad_input_names_the_argument_and_changes_nothing(case):
    _, changes, pattern = case
    args = _rollback_args(**changes)
    snapshot = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises((ValueError, TypeError, RuntimeError), match=pattern):
        dspark_ops.kv_rollback(**args)
    for key, before in snapshot.items():
        assert torch.equal(args[key], before), f"{key} modified by a failing call"


# ---------------------------------------------------------------------------------------------
# PagedKVCache


def test_cache_allocation_isolation_and_page_return():
    cache = PagedKVCache(2, num_pages=10, page_size=4, num_kv_heads=1, head_dim=16, dtype=torch.float32)
    s1 = cache.reserve(1, 9)      # 3 pages
    cache.reserve(2, 4)           # 1 page
    assert cache.num_free_pages == 6
    assert set(cache.pages(1)).isdisjoint(cache.pages(2))
    assert sorted(set((s1 // 4).tolist())) == sorted(cache.pages(1))
    assert cache.length(1) == 9 and cache.seq_lens([2, 1]).tolist() == [4, 9]
    table = cache.page_table([1, 2], width=5)
    assert table.dtype == torch.int32 and table.shape == (2, 5)
    assert table[0, :3].tolist() == cache.pages(1) and table[0, 3:].tolist() == [-1, -1]
    assert table[1, 1:].tolist() == [-1] * 4
    with pytest.raises(OutOfPagesError, match="free pages"):
        cache.reserve_batch([1, 3], [4, 21])  # 1 + 6 pages > 6 free
    assert cache.num_free_pages == 6 and cache.length(1) == 9 and 3 not in cache.requests  # all or nothing
    cache.rollback([1], [2], block_start=[3])  # keeps 5 positions -> 2 pages
    assert cache.length(1) == 5 and len(cache.pages(1)) == 2 and cache.num_free_pages == 7
    cache.free(2)
    assert cache.num_free_pages == 8 and cache.requests == [1]
    with pytest.raises(KeyError, match="2"):
        cache.length(2)


def test_cache_max_pages_per_request_and_bad_arguments():
    cache = PagedKVCache(1, 8, 4, 1, 16, torch.float32, max_pages_per_request=2)
    cache.reserve(0, 8)
    with pytest.raises(OutOfPagesError, match="max_pages_per_request"):
        cache.reserve(0, 1)
    assert cache.length(0) == 8
    with pytest.raises(ValueError, match="page_size"):
        PagedKVCache(1, 8, 0, 1, 16)
    with pytest.raises(TypeError, match="ints"):
        cache.reserve("a", 1)
    with pytest.raises(ValueError, match="within its length"):
        cache.rollback([0], [9], block_start=[0])
    with pytest.raises(ValueError, match="repeat"):
        cache.reserve_batch([1, 1], [1, 1])


def test_cache_out_of_pages_leaves_other_requests_intact():
    gen = torch.Generator().manual_seed(fresh_seed())
    cache = PagedKVCache(2, num_pages=6, page_size=4, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16)
    data = {}
    for r, n in [(10, 7), (11, 9)]:
        slots = cache.reserve(r, n)
        data[r] = [(torch.randn(n, 2, 16, generator=gen).bfloat16(), torch.randn(n, 2, 16, generator=gen).bfloat16())
                   for _ in range(2)]
        for layer, (k, v) in enumerate(data[r]):
            cache.append(layer, k, v, slots)
    free_before = cache.num_free_pages
    with pytest.raises(OutOfPagesError):
        cache.reserve(12, 4 * free_before + 1)
    assert cache.num_free_pages == free_before and 12 not in cache.requests
    for r in data:
        for layer, (k, v) in enumerate(data[r]):
            table = cache.page_table([r])[0]
            assert torch.equal(reference.gather_kv(cache.k_cache(layer), table, cache.length(r)), k)
            assert torch.equal(reference.gather_kv(cache.v_cache(layer), table, cache.length(r)), v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_fuzz_append_attend_rollback_against_a_list_model(dtype):
    """2000 rounds of: requests join, reserve a block, append K/V in every layer, accept a random subset (sorted
    indices, or a chain prefix) and roll back, sometimes leave (or are evicted when pages run out). A per-request
    model holds what each layer's cache must contain: after every round the cache's contents, lengths and page
    ownership equal it bit for bit; every 100 rounds attention over the cache equals the reference too."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    L, H, G, D, page_size, num_pages = 2, 2, 2, 16, 4, 48
    cache = PagedKVCache(L, num_pages=num_pages, page_size=page_size, num_kv_heads=H, head_dim=D, dtype=dtype,
                         max_pages_per_request=12)
    model: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}   # request -> per layer (k, v) [n, H, D]
    next_id, rounds_with_moves, evictions = 0, 0, 0
    for step in range(2000):
        if len(model) < 6 and (not model or torch.rand((), generator=gen) < 0.3):
            model[next_id] = [(torch.empty(0, H, D, dtype=dtype), torch.empty(0, H, D, dtype=dtype))] * L
            next_id += 1
        ids = list(model)
        counts = torch.randint(0, 9, (len(ids),), generator=gen).tolist()
        try:
            slots = cache.reserve_batch(ids, counts)
        except OutOfPagesError:
            cache.free(ids[0])
            del model[ids[0]]
            evictions += 1
            continue
        T = sum(counts)
        cu = [0] + torch.tensor(counts).cumsum(0).tolist()
        table, lens = cache.page_table(ids), cache.seq_lens(ids)
        fresh = [(torch.randn(T, H, D, generator=gen).to(dtype), torch.randn(T, H, D, generator=gen).to(dtype))
                 for _ in range(L)]
        for layer, (k, v) in enumerate(fresh):
            cache.append(layer, k, v, slots)
        if step % 100 == 0 and T:
            q = torch.randn(T, H * G, D, generator=gen).to(dtype)
            cu_q = torch.tensor(cu, dtype=torch.int32)
            for layer in range(L):
                args = (q, cache.k_cache(layer), cache.v_cache(layer), table, lens, cu_q)
                got, want = dspark_ops.draft_block_attention(*args), reference.draft_block_attention(*args)
                torch.testing.assert_close(got, want, **TOLERANCES[dtype], msg=lambda m: f"seed {seed}, {step}: {m}")
        chain = bool(torch.rand((), generator=gen) < 0.3)   # accept_index None: the first entries stay in place
        accept = torch.zeros(len(ids), max(max(counts), 1), dtype=torch.int32)
        keep = []
        for b, (r, n) in enumerate(zip(ids, counts)):
            a = int(torch.randint(0, n + 1, (), generator=gen))
            idx = torch.arange(a) if chain else torch.sort(torch.randperm(n, generator=gen)[:a]).values
            accept[b, :a] = idx.int()
            keep.append(a)
            rounds_with_moves += int(not torch.equal(idx, torch.arange(a)))
            model[r] = [(torch.cat([mk, k[cu[b]:cu[b + 1]][idx]]), torch.cat([mv, v[cu[b]:cu[b + 1]][idx]]))
                        for (mk, mv), (k, v) in zip(model[r], fresh)]
        cache.rollback(ids, torch.tensor(keep, dtype=torch.int32), None if chain else accept, seq_lens=lens,
                       page_table=table)
        assert lens.tolist() == [len(model[r][0][0]) for r in ids], f"seed {seed}, round {step}"
        if torch.rand((), generator=gen) < 0.1:
            victim = ids[int(torch.randint(0, len(ids), (), generator=gen))]
            cache.free(victim)
            del model[victim]
        owned = []
        for r, layers in model.items():
            n = len(layers[0][0])
            assert cache.length(r) == n and len(cache.pages(r)) == -(-n // page_size), f"seed {seed}, round {step}"
            owned += cache.pages(r)
            row = cache.page_table([r])[0]
            for layer, (k, v) in enumerate(layers):
                assert bits_equal(reference.gather_kv(cache.k_cache(layer), row, n), k), f"seed {seed}, round {step}"
                assert bits_equal(reference.gather_kv(cache.v_cache(layer), row, n), v), f"seed {seed}, round {step}"
        assert len(owned) == len(set(owned)) and len(owned) + cache.num_free_pages == num_pages, f"seed {seed}"
    print(f"{next_id} requests, {evictions} evicted, {rounds_with_moves} compactions")
    assert next_id > 100 and evictions > 10 and rounds_with_moves > 1000, f"seed {seed}"


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU).


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d)[6:])
def test_cuda_append_and_rollback_match_cpu(dtype):
    gen = torch.Generator().manual_seed(fresh_seed())
    p, k, v, start, accept, num_acc = _rollback_setup(gen, layers=3, dtype=dtype, B=9, M=12)
    lens = p.seq_lens.clone()
    kc, vc = k.cuda(), v.cuda()
    dspark_ops.kv_rollback(k, v, p.page_table, lens, start, accept, num_acc)
    lens_gpu = p.seq_lens.cuda()
    dspark_ops.kv_rollback(kc, vc, p.page_table.cuda(), lens_gpu, start.cuda(), accept.cuda(), num_acc.cuda(),
                           check=True)
    assert torch.equal(lens_gpu.cpu(), lens)
    assert bits_equal(kc.cpu(), k) and bits_equal(vc.cpu(), v)
    T = 50
    slots = torch.randperm(k.shape[1] * k.shape[2], generator=gen)[:T]
    slots[::5] = -1
    nk = torch.randn(T, 2, 16, generator=gen).to(dtype)
    nv = torch.randn(T, 2, 16, generator=gen).to(dtype)
    dspark_ops.append_kv(nk, nv, k[1], v[1], slots)
    dspark_ops.append_kv(nk.cuda(), nv.cuda(), kc[1], vc[1], slots.cuda(), check=True)
    assert bits_equal(kc.cpu(), k) and bits_equal(vc.cpu(), v)


@pytest.mark.cuda
@needs_cuda
def test_cuda_invalid_indices_are_skipped_and_check_raises():
    args = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _rollback_args().items()}
    args["accept_index"][2, 1] = 0  # request 2 not increasing: left untouched, length too
    before_k, before_v, lens_before = args["k_caches"].clone(), args["v_caches"].clone(), args["seq_lens"].clone()
    dspark_ops.kv_rollback(**args)
    assert int(args["seq_lens"][2]) == int(lens_before[2])
    assert args["seq_lens"][:2].tolist() == (args["block_start"][:2] + args["num_accepted"][:2]).tolist()
    # Requests 0 and 1 are compacted as the reference does; request 2's entries (and every other byte) stay.
    want_k, want_v, want_lens = before_k.cpu(), before_v.cpu(), lens_before[:2].cpu()
    reference.kv_rollback([want_k], [want_v], args["page_table"][:2].cpu(), want_lens, args["block_start"][:2].cpu(),
                          args["accept_index"][:2].cpu(), args["num_accepted"][:2].cpu())
    assert bits_equal(args["k_caches"].cpu(), want_k) and bits_equal(args["v_caches"].cpu(), want_v)
    args["seq_lens"].copy_(lens_before)
    with pytest.raises(ValueError, match=r"accept_index\[2\]"):
        dspark_ops.kv_rollback(**args, check=True)
    k_cache = torch.zeros(4, 4, 2, 8, device="cuda")
    dspark_ops.append_kv(torch.ones(2, 2, 8, device="cuda"), torch.ones(2, 2, 8, device="cuda"), k_cache,
                         k_cache.clone(), torch.tensor([3, 999], device="cuda"))  # 999 skipped
    assert int(k_cache.sum()) == 16
    with pytest.raises(ValueError, match=r"slot_mapping\[1\]"):
        dspark_ops.append_kv(torch.ones(2, 2, 8, device="cuda"), torch.ones(2, 2, 8, device="cuda"), k_cache,
                             k_cache.clone(), torch.tensor([3, 999], device="cuda"), check=True)


@pytest.mark.cuda
@needs_cuda
def test_cuda_graph_capture_of_rollback_and_cache_with_device_counts():
    gen = torch.Generator().manual_seed(fresh_seed())
    p, k, v, start, accept, num_acc = _rollback_setup(gen, layers=2, dtype=torch.bfloat16, B=4)
    kc, vc, table = k.cuda(), v.cuda(), p.page_table.cuda()
    lens, s, a, n = p.seq_lens.cuda(), start.cuda(), accept.cuda(), num_acc.cuda()
    lens0, kc0, vc0 = lens.clone(), kc.clone(), vc.clone()
    dspark_ops.kv_rollback(kc.clone(), vc.clone(), table, lens.clone(), s, a, n)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dspark_ops.kv_rollback(kc, vc, table, lens, s, a, n)
    want_k, want_v, want_lens = k.clone(), v.clone(), p.seq_lens.clone()
    dspark_ops.kv_rollback(want_k, want_v, p.page_table, want_lens, start, accept, num_acc)
    for _ in range(2):   # replay from the same inputs, restored in place: the same result each time
        lens.copy_(lens0)
        kc.copy_(kc0)
        vc.copy_(vc0)
        graph.replay()
        assert bits_equal(kc.cpu(), want_k) and bits_equal(vc.cpu(), want_v) and torch.equal(lens.cpu(), want_lens)
    # PagedKVCache on CUDA with device-side accept counts: pages return once the host settles
    cache = PagedKVCache(2, 16, 4, 2, 16, torch.bfloat16, "cuda")
    slots = cache.reserve(0, 12)
    cache.append(0, torch.randn(12, 2, 16, device="cuda").bfloat16(), torch.randn(12, 2, 16, device="cuda").bfloat16(),
                 slots)
    cache.rollback([0], torch.tensor([3], dtype=torch.int32, device="cuda"), block_start=[0])
    assert cache.length(0) == 3 and cache.num_free_pages == 15

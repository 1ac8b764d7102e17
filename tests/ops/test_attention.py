"""draft_block_attention: agreement with the gather + SDPA reference (ragged blocks, shuffled pages,
GQA, page sizes, both masks, dtypes, head dims), isolation from other pages, bad input,
torch.compile, every CPU ISA build, CUDA parity and graph replay, and on CUDA the tensor-core path against
the reference and the SIMT path (DSPARK_ATTENTION_IMPL=simt|tc forces one)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dspark_ops
from dspark_ops import reference

from cuda_graphs import capture
from paged_helpers import TOLERANCES, poisoned_empty, random_blocks, random_problem
from randomness import fresh_seed

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TC_READY = (dspark_ops.build_info().get("attention_tc", False) and torch.cuda.is_available()
            and torch.cuda.get_device_capability()[0] >= 8)
needs_tc = pytest.mark.skipif(not TC_READY, reason="needs an sm_80+ GPU and a build with the CUTLASS/CuTe headers "
                                                   "(tensor-core path; see `dspark info`)")


def check_against_reference(p, *, causal, scale=None, seed=None):
    with poisoned_empty():
        got = dspark_ops.draft_block_attention(*p.args(), causal=causal, scale=scale)
    want = reference.draft_block_attention(*p.args(), causal=causal, scale=scale)
    assert got.dtype == p.q.dtype and got.shape == p.q.shape
    assert torch.isfinite(got.float()).all(), f"seed {seed}: unwritten or non-finite output"
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCES[p.q.dtype], msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_matches_reference(dtype, group, page_size):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    rows, lens = random_blocks(gen, 6, 150 if page_size == 1 else 300)
    head_dim = 64 if group != 3 else 128
    p = random_problem(gen, block_rows=rows, seq_lens=lens, num_kv_heads=2, group=group, head_dim=head_dim,
                       page_size=page_size, dtype=dtype)
    for causal in (True, False):
        check_against_reference(p, causal=causal, seed=seed)


@pytest.mark.parametrize("head_dim", [16, 64, 96, 128, 256])
def test_head_dims(head_dim):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    rows, lens = random_blocks(gen, 4, 100)
    p = random_problem(gen, block_rows=rows, seq_lens=lens, num_kv_heads=1, group=4, head_dim=head_dim,
                       page_size=16, dtype=torch.bfloat16)
    check_against_reference(p, causal=True, seed=seed)


def test_block_is_the_whole_sequence_and_tile_edges():
    """Lengths equal to the block (row i sees 0..i) and lengths around the 32-position tile edge."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    rows = [16, 1, 5, 16, 8, 16, 3]
    lens = [16, 1, 31, 32, 33, 64, 65]
    p = random_problem(gen, block_rows=rows, seq_lens=lens, num_kv_heads=2, group=2, head_dim=64, page_size=8,
                       dtype=torch.float32)
    for causal in (True, False):
        check_against_reference(p, causal=causal, seed=seed)


def test_long_contexts_are_split_and_combined():
    """Lengths past the CPU kernel's 1024-position splits (boundaries at multiples of 1024)."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    rows, lens = [16, 1, 8, 0, 5, 3], [2500, 1025, 1024, 3000, 4100, 2049]
    p = random_problem(gen, block_rows=rows, seq_lens=lens, num_kv_heads=1, group=3, head_dim=64, page_size=16,
                       dtype=torch.float32)
    for causal in (True, False):
        check_against_reference(p, causal=causal, seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_long_blocks_with_max_block_rows(dtype):
    """Prefill-sized blocks (opt-in): whole prompts, a block longer than 16 over a cached prefix."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    rows, lens = [100, 17, 0, 40, 3], [100, 1300, 7, 2100, 3]
    p = random_problem(gen, block_rows=rows, seq_lens=lens, num_kv_heads=2, group=2, head_dim=64, page_size=16,
                       dtype=dtype)
    for causal in (True, False):
        with poisoned_empty():
            got = dspark_ops.draft_block_attention(*p.args(), causal=causal, max_block_rows=100)
        want = reference.draft_block_attention(*p.args(), causal=causal)
        torch.testing.assert_close(got.float(), want.float(), **TOLERANCES[dtype], msg=lambda m: f"seed {seed}: {m}")
    with pytest.raises(ValueError, match="max_block_rows = 99"):
        dspark_ops.draft_block_attention(*p.args(), max_block_rows=99)
    with pytest.raises(ValueError, match="max_block_rows"):
        dspark_ops.draft_block_attention(*p.args(), max_block_rows=0)


def test_a_rows_result_depends_only_on_its_own_visible_prefix():
    """Row i of a verified block equals, bit for bit, the same query decoded alone over the same
    visible prefix, or inside a longer (prefill-sized, several 16-row chunks) block: the engine's
    greedy equivalence with plain decoding relies on it. Lengths cross the 1024-position splits."""
    gen = torch.Generator().manual_seed(fresh_seed())
    n, long_n, length = 9, 40, 2100
    # One request whose 40-row block ends at length + 31; its first 9 rows form a 9-row block ending at `length`.
    p = random_problem(gen, block_rows=[long_n], seq_lens=[length - n + long_n], num_kv_heads=2, group=4,
                       head_dim=64, page_size=16, dtype=torch.bfloat16)
    longer = dspark_ops.draft_block_attention(*p.args(), max_block_rows=long_n)
    block = dspark_ops.draft_block_attention(p.q[:n], p.k_cache, p.v_cache, p.page_table,
                                             torch.tensor([length], dtype=torch.int32),
                                             torch.tensor([0, n], dtype=torch.int32))
    for i in range(n):
        alone = dspark_ops.draft_block_attention(p.q[i:i + 1], p.k_cache, p.v_cache, p.page_table,
                                                 torch.tensor([length - n + i + 1], dtype=torch.int32),
                                                 torch.tensor([0, 1], dtype=torch.int32))
        assert torch.equal(alone[0], block[i]), f"row {i}"
        assert torch.equal(longer[i], block[i]), f"row {i} in the {long_n}-row block"


def test_empty_blocks_and_empty_batch():
    gen = torch.Generator().manual_seed(fresh_seed())
    p = random_problem(gen, block_rows=[0, 0, 0], seq_lens=[5, 0, 40], num_kv_heads=2, group=2, head_dim=32,
                       page_size=16, dtype=torch.bfloat16)
    assert dspark_ops.draft_block_attention(*p.args()).shape == (0, 4, 32)
    empty = dspark_ops.draft_block_attention(p.q, p.k_cache, p.v_cache, p.page_table[:0], p.seq_lens[:0],
                                             p.cu_q_lens[:1])
    assert empty.shape == (0, 4, 32)


def test_scale_and_strided_q():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    rows, lens = random_blocks(gen, 5, 90)
    p = random_problem(gen, block_rows=rows, seq_lens=lens, num_kv_heads=3, group=3, head_dim=64, page_size=16,
                       dtype=torch.float32)
    check_against_reference(p, causal=True, scale=0.3, seed=seed)
    # q as a view of a fused projection: rows and heads strided, head dim contiguous
    fused = torch.randn(p.q.shape[0], p.q.shape[1] + 5, 64, generator=gen)
    fused[:, 2:2 + p.q.shape[1]] = p.q
    view = fused[:, 2:2 + p.q.shape[1]]
    assert not view.is_contiguous()
    got = dspark_ops.draft_block_attention(view, *p.args()[1:])
    assert torch.equal(got, dspark_ops.draft_block_attention(*p.args()))


def test_reads_only_the_requests_visible_positions():
    """Every cache element outside a request's [0, seq_len) positions (other requests' pages, spare
    pages, the tail of its last page) is NaN: the output must stay finite and match."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    rows, lens = [3, 16, 1], [37, 20, 50]
    p = random_problem(gen, block_rows=rows, seq_lens=lens, num_kv_heads=2, group=2, head_dim=64, page_size=16,
                       dtype=torch.bfloat16, spare_pages=4)
    for b in range(3):
        keep_k, keep_v = p.k_cache.clone(), p.v_cache.clone()
        mask = torch.ones(p.k_cache.shape[:2], dtype=torch.bool)
        for pos in range(lens[b]):
            mask[int(p.page_table[b, pos // 16]), pos % 16] = False
        p.k_cache[mask] = float("nan")
        p.v_cache[mask] = float("nan")
        one = [0] * 3
        one[b] = rows[b]
        cu = torch.tensor([0] + list(torch.tensor(one).cumsum(0)), dtype=torch.int32)
        q = p.q[int(p.cu_q_lens[b]):int(p.cu_q_lens[b + 1])]
        got = dspark_ops.draft_block_attention(q, p.k_cache, p.v_cache, p.page_table, p.seq_lens, cu)
        assert torch.isfinite(got.float()).all()
        want = reference.draft_block_attention(q, keep_k, keep_v, p.page_table, p.seq_lens, cu)
        torch.testing.assert_close(got.float(), want.float(), **TOLERANCES[torch.bfloat16])
        p.k_cache.copy_(keep_k)
        p.v_cache.copy_(keep_v)


def test_results_do_not_depend_on_thread_count_or_batch_order():
    gen = torch.Generator().manual_seed(fresh_seed())
    rows, lens = random_blocks(gen, 7, 2600)
    p = random_problem(gen, block_rows=rows, seq_lens=lens, num_kv_heads=2, group=4, head_dim=64, page_size=16,
                       dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dspark_ops.draft_block_attention(*p.args())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, dspark_ops.draft_block_attention(*p.args()))
    # reversed batch: every request's rows come out bit-identical
    order = list(range(len(rows)))[::-1]
    cu = p.cu_q_lens.tolist()
    q_rev = torch.cat([p.q[cu[b]:cu[b + 1]] for b in order])
    cu_rev = torch.tensor([0] + list(torch.tensor([rows[b] for b in order]).cumsum(0)), dtype=torch.int32)
    rev = dspark_ops.draft_block_attention(q_rev, p.k_cache, p.v_cache, p.page_table[order], p.seq_lens[order], cu_rev)
    assert torch.equal(rev, torch.cat([one[cu[b]:cu[b + 1]] for b in order]))


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_every_cpu_isa_build_agrees(isa):
    code = textwrap.dedent("""
        import sys, torch, dspark_ops
        sys.path.insert(0, sys.argv[1])
        from paged_helpers import random_problem
        g = torch.Generator().manual_seed(11)
        outs = []
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            p = random_problem(g, block_rows=[3, 16, 0, 7], seq_lens=[40, 100, 3, 77], num_kv_heads=2, group=3,
                               head_dim=96, page_size=16, dtype=dt)
            outs.append(dspark_ops.draft_block_attention(*p.args()).float())
        torch.save(outs, sys.argv[2])
        print(dspark_ops.build_info()["cpu_isa"])
    """)

    def run(env_isa, path):
        env = dict(os.environ)
        env.pop("DSPARK_CPU_ISA", None)
        if env_isa:
            env["DSPARK_CPU_ISA"] = env_isa
        out = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__), path], env=env,
                             capture_output=True, text=True, check=True)
        return out.stdout.strip(), torch.load(path)

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (name, forced), (_, best) = run(isa, f"{tmp}/a.pt"), run(None, f"{tmp}/b.pt")
    assert name == isa
    for dt, a, b in zip(FLOATS, forced, best):
        torch.testing.assert_close(a, b, **TOLERANCES[dt])


# ---------------------------------------------------------------------------------------------
# Bad input: a Python exception naming the argument, never a crash.


def _base():
    gen = torch.Generator().manual_seed(3)
    return random_problem(gen, block_rows=[2, 4], seq_lens=[10, 20], num_kv_heads=2, group=2, head_dim=64,
                          page_size=4, dtype=torch.float32)


def _with(**changes):
    p = _base()
    args = dict(q=p.q, k_cache=p.k_cache, v_cache=p.v_cache, page_table=p.page_table, seq_lens=p.seq_lens,
                cu_q_lens=p.cu_q_lens)
    args.update({k: (v(args) if callable(v) else v) for k, v in changes.items()})
    return args


def _table_with(value, row=1, col=2):
    def f(a):
        t = a["page_table"].clone()
        t[row, col] = value
        return t
    return f


BAD = [
    ("q", dict(q=lambda a: a["q"][0]), "q"),
    ("q dtype", dict(q=lambda a: a["q"].to(torch.int32)), "q"),
    ("q vs cache dtype", dict(q=lambda a: a["q"].to(torch.bfloat16)), "k_cache"),
    ("k_cache dims", dict(k_cache=lambda a: a["k_cache"][0]), "k_cache"),
    ("v_cache shape", dict(v_cache=lambda a: a["v_cache"][:, :2]), "v_cache"),
    ("head dim", dict(q=lambda a: a["q"][..., :16].contiguous()), "head_dim"),
    ("gqa", dict(q=lambda a: a["q"][:, :3].contiguous()), "Hq"),
    ("page_table dtype", dict(page_table=lambda a: a["page_table"].float()), "page_table"),
    ("page_table dims", dict(page_table=lambda a: a["page_table"][0]), "page_table"),
    ("page id too big", dict(page_table=_table_with(10_000)), r"page_table\[1, 2\]"),
    ("page id negative", dict(page_table=_table_with(-1, 0, 1)), r"page_table\[0, 1\]"),
    ("seq_lens shape", dict(seq_lens=lambda a: a["seq_lens"][:1]), "seq_lens"),
    ("seq_lens past capacity", dict(seq_lens=torch.tensor([10, 1000], dtype=torch.int32)), r"seq_lens\[1\]"),
    ("seq_lens shorter than block", dict(seq_lens=torch.tensor([1, 20], dtype=torch.int32)), r"seq_lens\[0\]"),
    ("cu_q_lens shape", dict(cu_q_lens=lambda a: a["cu_q_lens"][:2]), "cu_q_lens"),
    ("cu_q_lens not monotone", dict(cu_q_lens=torch.tensor([0, 5, 3], dtype=torch.int32)), "cu_q_lens"),
    ("cu_q_lens start", dict(cu_q_lens=torch.tensor([1, 2, 6], dtype=torch.int32)), r"cu_q_lens\[0\]"),
    ("cu_q_lens end", dict(cu_q_lens=torch.tensor([0, 2, 5], dtype=torch.int32)), "cu_q_lens"),
    ("block over 16", dict(q=torch.randn(19, 4, 64), cu_q_lens=torch.tensor([0, 2, 19], dtype=torch.int32),
                           seq_lens=torch.tensor([10, 20], dtype=torch.int32)), "max_block_rows = 16"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_names_the_argument(case):
    _, changes, pattern = case
    args = _with(**changes)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=pattern):
        dspark_ops.draft_block_attention(**args)


def test_bad_input_through_the_raw_op_raises():
    args = _with(page_table=_table_with(10_000))
    with pytest.raises(ValueError, match="page_table"):
        torch.ops.dspark.draft_block_attention(*args.values(), True, None)
    args = _with(cu_q_lens=torch.tensor([0, 5, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_q_lens"):
        torch.ops.dspark.draft_block_attention(*args.values())


def test_bad_scale_and_types():
    p = _base()
    with pytest.raises(RuntimeError, match="scale"):
        dspark_ops.draft_block_attention(*p.args(), scale=math.inf)
    with pytest.raises(TypeError, match="seq_lens"):
        dspark_ops.draft_block_attention(p.q, p.k_cache, p.v_cache, p.page_table, p.seq_lens.float(), p.cu_q_lens)


# ---------------------------------------------------------------------------------------------
# torch.compile / fake tensors.


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = _base()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(t) for t in p.args()]
        out = dspark_ops.draft_block_attention(*fake)
    assert out.shape == p.q.shape and out.dtype == p.q.dtype


def test_torch_compile_fullgraph_step():
    """append the block's K/V, attend, roll back: one compiled graph, same bytes as eager."""
    gen = torch.Generator().manual_seed(fresh_seed())
    rows, lens = [3, 5], [20, 33]
    p = random_problem(gen, block_rows=rows, seq_lens=lens, num_kv_heads=2, group=2, head_dim=32, page_size=8,
                       dtype=torch.float32)
    T = sum(rows)
    k_new, v_new = torch.randn(T, 2, 32, generator=gen), torch.randn(T, 2, 32, generator=gen)
    flat = [int(p.page_table[b, pos // 8]) * 8 + pos % 8 for b in range(2) for pos in range(lens[b] - rows[b], lens[b])]
    slots = torch.tensor(flat)
    accept = torch.tensor([[0, 2, 0, 0, 0], [1, 2, 4, 0, 0]], dtype=torch.int32)
    num_acc = torch.tensor([2, 3], dtype=torch.int32)
    block_start = p.seq_lens - torch.tensor(rows, dtype=torch.int32)

    def step(q, k_cache, v_cache, seq_lens):
        dspark_ops.append_kv(k_new, v_new, k_cache, v_cache, slots)
        out = dspark_ops.draft_block_attention(q, k_cache, v_cache, p.page_table, seq_lens, p.cu_q_lens)
        dspark_ops.kv_rollback(k_cache, v_cache, p.page_table, seq_lens, block_start, accept, num_acc)
        return out * 2

    eager_state = [p.k_cache.clone(), p.v_cache.clone(), p.seq_lens.clone()]
    comp_state = [p.k_cache.clone(), p.v_cache.clone(), p.seq_lens.clone()]
    want = step(p.q, *eager_state)
    got = torch.compile(step, fullgraph=True, backend="inductor")(p.q, *comp_state)
    assert torch.equal(got, want)
    for a, b in zip(comp_state, eager_state):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU).


def _cuda(p):
    return type(p)(*[t.cuda() for t in p.args()])


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_cuda_matches_reference(dtype, group, page_size):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    head_dim = 128 if group == 3 else 64
    rows, lens = random_blocks(gen, 9, 2000)
    p = random_problem(gen, block_rows=rows, seq_lens=lens, num_kv_heads=2, group=group, head_dim=head_dim,
                       page_size=page_size, dtype=dtype)
    g = _cuda(p)
    for causal in (True, False):
        got = dspark_ops.draft_block_attention(*g.args(), causal=causal, check=True)
        want = reference.draft_block_attention(*p.args(), causal=causal)
        torch.testing.assert_close(got.cpu().float(), want.float(), **TOLERANCES[dtype],
                                   msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("head_dim", [96, 256])
def test_cuda_other_head_dims_and_long_context(head_dim):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    p = random_problem(gen, block_rows=[16, 1, 7], seq_lens=[9000, 40, 20000], num_kv_heads=1, group=8,
                       head_dim=head_dim, page_size=16, dtype=torch.bfloat16)
    got = dspark_ops.draft_block_attention(*_cuda(p).args())
    want = reference.draft_block_attention(*p.args())
    torch.testing.assert_close(got.cpu().float(), want.float(), **TOLERANCES[torch.bfloat16])


@pytest.mark.cuda
@needs_cuda
def test_cuda_long_blocks_with_max_block_rows():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    rows, lens = [300, 17, 0, 64, 1], [300, 5000, 7, 2100, 9]
    p = random_problem(gen, block_rows=rows, seq_lens=lens, num_kv_heads=2, group=4, head_dim=128, page_size=16,
                       dtype=torch.bfloat16)
    for causal in (True, False):
        got = dspark_ops.draft_block_attention(*_cuda(p).args(), causal=causal, max_block_rows=300, check=True)
        want = reference.draft_block_attention(*p.args(), causal=causal)
        torch.testing.assert_close(got.cpu().float(), want.float(), **TOLERANCES[torch.bfloat16],
                                   msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.cuda
@needs_cuda
def test_cuda_invalid_request_gives_nan_rows_and_check_raises():
    p = _cuda(_base())
    table = p.page_table.clone()
    table[1, 2] = 10_000
    out = dspark_ops.draft_block_attention(p.q, p.k_cache, p.v_cache, table, p.seq_lens, p.cu_q_lens)
    assert torch.isnan(out[2:]).all() and torch.isfinite(out[:2]).all()
    with pytest.raises(ValueError, match=r"page_table\[1, 2\]"):
        dspark_ops.draft_block_attention(p.q, p.k_cache, p.v_cache, table, p.seq_lens, p.cu_q_lens, check=True)
    too_long = torch.tensor([10, 10_000], dtype=torch.int32, device="cuda")
    out = dspark_ops.draft_block_attention(p.q, p.k_cache, p.v_cache, p.page_table, too_long, p.cu_q_lens)
    assert torch.isnan(out[2:]).all() and torch.isfinite(out[:2]).all()


def _impls_available():
    return ["simt", "tc"] if TC_READY else ["simt"]


def _stale_output(g, **kwargs):
    """Runs a valid call of g's shape and frees its output, so the caching allocator hands the next output of
    that shape finite stale values: a row the op leaves unwritten then shows as finite, not as NaN."""
    out = dspark_ops.draft_block_attention(*g.args(), **kwargs)
    assert torch.isfinite(out).all()
    del out


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("long_context", [False, True], ids=["one_split", "kv_splits"])
def test_cuda_cu_q_lens_that_does_not_cover_the_rows_gives_nan_everywhere_and_check_raises(long_context,
                                                                                             monkeypatch):
    """cu_q_lens ending before T, decreasing, or not starting at 0: no row may keep stale memory (with KV
    splits the combine step would read workspace rows nobody wrote), so every row is NaN; check=True raises
    naming cu_q_lens."""
    gen = torch.Generator().manual_seed(fresh_seed())
    lens = [3000, 2500, 4000] if long_context else [10, 20, 9]
    g = _cuda(random_problem(gen, block_rows=[2, 4, 3], seq_lens=lens, num_kv_heads=2, group=2, head_dim=64,
                             page_size=16, dtype=torch.bfloat16))
    bad = {"short": [0, 2, 6, 8], "decreasing": [0, 5, 2, 9], "offset": [1, 3, 7, 9]}
    for impl in _impls_available():
        monkeypatch.setenv("DSPARK_ATTENTION_IMPL", impl)
        for name, cu in bad.items():
            cu = torch.tensor(cu, dtype=torch.int32, device="cuda")
            _stale_output(g)
            out = dspark_ops.draft_block_attention(g.q, g.k_cache, g.v_cache, g.page_table, g.seq_lens, cu)
            assert torch.isnan(out).all(), f"{impl}, {name}: rows left unwritten or computed"
            with pytest.raises(ValueError, match="cu_q_lens"):
                dspark_ops.draft_block_attention(g.q, g.k_cache, g.v_cache, g.page_table, g.seq_lens, cu, check=True)


@pytest.mark.cuda
@needs_cuda
def test_cuda_block_longer_than_max_block_rows_is_nan_in_every_row():
    """A request whose block exceeds max_block_rows gets NaN in all its rows (the grid is sized for
    max_block_rows, the rows past it too); the other requests are computed."""
    gen = torch.Generator().manual_seed(fresh_seed())
    g = _cuda(random_problem(gen, block_rows=[2, 20, 3], seq_lens=[10, 40, 3000], num_kv_heads=2, group=2,
                             head_dim=64, page_size=16, dtype=torch.bfloat16))
    _stale_output(g, max_block_rows=20)
    out = dspark_ops.draft_block_attention(*g.args(), max_block_rows=16)
    assert torch.isnan(out[2:22]).all()
    assert torch.isfinite(out[:2]).all() and torch.isfinite(out[22:]).all()


@pytest.mark.cuda
@needs_cuda
def test_cuda_prefill_rows_spread_over_ctas(monkeypatch):
    """Prefill-sized blocks (n_b x G in the thousands: many row chunks, no KV split needed) on both paths, with
    a decode-sized request beside them, against the reference; no row unwritten."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    p = random_problem(gen, block_rows=[700, 1, 300, 0], seq_lens=[700, 3000, 2100, 50], num_kv_heads=2, group=3,
                       head_dim=128, page_size=16, dtype=torch.bfloat16)
    g = _cuda(p)
    for impl in _impls_available():
        monkeypatch.setenv("DSPARK_ATTENTION_IMPL", impl)
        for causal in (True, False):
            with poisoned_empty():
                got = dspark_ops.draft_block_attention(*g.args(), causal=causal, max_block_rows=700)
            want = reference.draft_block_attention(*p.args(), causal=causal)
            assert torch.isfinite(got.float()).all(), f"seed {seed}: {impl}: unwritten rows"
            torch.testing.assert_close(got.cpu().float(), want.float(), **TOLERANCES[torch.bfloat16],
                                       msg=lambda m: f"seed {seed}: {impl}, causal {causal}: {m}")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("impl", ["simt", "tc"])
def test_cuda_graph_capture_and_replay(impl, monkeypatch):
    if impl == "tc" and not TC_READY:
        pytest.skip("tensor-core path not available (see `dspark info`)")
    monkeypatch.setenv("DSPARK_ATTENTION_IMPL", impl)
    gen = torch.Generator().manual_seed(fresh_seed())
    rows, lens = random_blocks(gen, 8, 3000)
    p = _cuda(random_problem(gen, block_rows=rows, seq_lens=lens, num_kv_heads=2, group=4, head_dim=128,
                             page_size=16, dtype=torch.bfloat16, pad=40))
    graph, out = capture(lambda: dspark_ops.draft_block_attention(*p.args()))
    for _ in range(3):
        # new data in place: queries, lengths (shorter by a random amount), cache contents
        p.q.copy_(torch.randn(p.q.shape, generator=gen).to(p.q.dtype))
        p.seq_lens.copy_(torch.maximum(p.seq_lens - torch.randint(0, 50, p.seq_lens.shape, generator=gen).cuda(),
                                       p.cu_q_lens[1:] - p.cu_q_lens[:-1]))
        p.k_cache.mul_(0.5)
        graph.replay()
        eager = dspark_ops.draft_block_attention(*p.args())
        assert torch.equal(out, eager)
        want = reference.draft_block_attention(*[t.cpu() for t in p.args()])
        torch.testing.assert_close(out.cpu().float(), want.float(), **TOLERANCES[torch.bfloat16])


def _impls(monkeypatch, g, **kwargs):
    """The op's output with each CUDA path forced."""
    outs = {}
    for impl in ("simt", "tc"):
        monkeypatch.setenv("DSPARK_ATTENTION_IMPL", impl)
        with poisoned_empty():
            outs[impl] = dspark_ops.draft_block_attention(*g.args(), **kwargs).cpu()
    monkeypatch.delenv("DSPARK_ATTENTION_IMPL")
    return outs


def _check_impls(monkeypatch, p, seed, **kwargs):
    """Both CUDA paths against the reference and against each other (same tolerance: both are within it of
    the fp32 reference; the tensor-core path also rounds the probabilities to the input type before P.V)."""
    outs = _impls(monkeypatch, _cuda(p), **kwargs)
    want = reference.draft_block_attention(*p.args(), **{k: v for k, v in kwargs.items() if k != "max_block_rows"})
    tol = TOLERANCES[p.q.dtype]
    for impl, got in outs.items():
        assert torch.isfinite(got.float()).all(), f"seed {seed}: {impl}: unwritten or non-finite output"
        torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m: f"seed {seed}: {impl}: {m}")
    torch.testing.assert_close(outs["tc"].float(), outs["simt"].float(), **tol, msg=lambda m: f"seed {seed}: tc vs simt: {m}")


# Each of dtype, GQA group, page size and head dim takes every value at least once (kept small: a few seconds).
# A request's n_b G rows take 1, 2 or 4 row tiles per pass (R <= 16, <= 32, more; the 4 warps then split each
# KV tile 4, 2 or 1 ways) and more than one pass past 64 rows (G = 8, n_b > 8): random blocks of 0..16 rows
# with these groups cover every arrangement.
TC_CASES = [(torch.bfloat16, 1, 1, 64), (torch.float16, 1, 16, 128), (torch.bfloat16, 2, 16, 128),
            (torch.float16, 2, 64, 64), (torch.bfloat16, 3, 16, 128), (torch.float16, 3, 64, 64),
            (torch.bfloat16, 8, 64, 128), (torch.float16, 8, 1, 64), (torch.float16, 3, 1, 128)]


@pytest.mark.cuda
@needs_tc
@pytest.mark.parametrize("dtype,group,page_size,head_dim", TC_CASES,
                         ids=[f"{str(c[0])[6:]}-g{c[1]}-p{c[2]}-d{c[3]}" for c in TC_CASES])
def test_cuda_tensor_core_matches_reference_and_simt(dtype, group, page_size, head_dim, monkeypatch):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    rows, lens = random_blocks(gen, 9, 2000)  # blocks of 0 and 16 rows included
    p = random_problem(gen, block_rows=rows, seq_lens=lens, num_kv_heads=2, group=group, head_dim=head_dim,
                       page_size=page_size, dtype=dtype)
    for causal in (True, False):
        _check_impls(monkeypatch, p, seed, causal=causal)


@pytest.mark.cuda
@needs_tc
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_tensor_core_tile_edges_passes_and_empty_splits(head_dim, monkeypatch):
    """Lengths around the 64-position tile, a block of one row (one row tile), blocks whose rows need more than
    one 64-row pass (max_block_rows raised), and a long page table with short requests (many KV splits, most of
    them empty for most requests)."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    rows = [1, 16, 5, 0, 16, 40, 33, 2]
    lens = [63, 64, 65, 7, 129, 40, 5000, 2]
    p = random_problem(gen, block_rows=rows, seq_lens=lens, num_kv_heads=1, group=4, head_dim=head_dim,
                       page_size=16, dtype=torch.bfloat16, pad=300)
    single = random_problem(gen, block_rows=[1], seq_lens=[200], num_kv_heads=1, group=1, head_dim=head_dim,
                            page_size=16, dtype=torch.float16)
    for causal in (True, False):
        _check_impls(monkeypatch, p, seed, causal=causal, max_block_rows=40)
        _check_impls(monkeypatch, single, seed, causal=causal)


@pytest.mark.cuda
@needs_tc
def test_cuda_tensor_core_invalid_request_gives_nan_rows(monkeypatch):
    monkeypatch.setenv("DSPARK_ATTENTION_IMPL", "tc")
    gen = torch.Generator().manual_seed(fresh_seed())
    p = _cuda(random_problem(gen, block_rows=[2, 4], seq_lens=[10, 2000], num_kv_heads=2, group=2, head_dim=64,
                             page_size=4, dtype=torch.bfloat16))
    table = p.page_table.clone()
    table[1, 2] = 10_000
    out = dspark_ops.draft_block_attention(p.q, p.k_cache, p.v_cache, table, p.seq_lens, p.cu_q_lens)
    assert torch.isnan(out[2:]).all() and torch.isfinite(out[:2]).all()
    too_long = torch.tensor([10, 100_000], dtype=torch.int32, device="cuda")
    out = dspark_ops.draft_block_attention(p.q, p.k_cache, p.v_cache, p.page_table, too_long, p.cu_q_lens)
    assert torch.isnan(out[2:]).all() and torch.isfinite(out[:2]).all()


@pytest.mark.cuda
@needs_cuda
def test_cuda_impl_selection_errors(monkeypatch):
    p = _cuda(_base())  # fp32: the tensor-core path does not take it
    monkeypatch.setenv("DSPARK_ATTENTION_IMPL", "tc")
    with pytest.raises(RuntimeError, match="DSPARK_ATTENTION_IMPL=tc needs fp16/bf16"):
        dspark_ops.draft_block_attention(*p.args())
    monkeypatch.setenv("DSPARK_ATTENTION_IMPL", "fast")
    with pytest.raises(RuntimeError, match="DSPARK_ATTENTION_IMPL must be auto, simt or tc, got 'fast'"):
        dspark_ops.draft_block_attention(*p.args())
    monkeypatch.setenv("DSPARK_ATTENTION_IMPL", "simt")
    torch.testing.assert_close(dspark_ops.draft_block_attention(*p.args()).cpu(),
                               reference.draft_block_attention(*_base().args()), **TOLERANCES[torch.float32])

"""linear / linear_silu_mul: agreement with float64 within the fp32 error bound for every block height
1..16 (and taller ones up to the kernel's 64) and odd shapes, both weight dtypes, epilogues, the matmul fallback, every CPU ISA build, packing
round trips and serialisation, bad input, torch.compile, CUDA."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dspark_ops
from dspark_ops import reference
from cuda_graphs import capture
from randomness import fresh_seed

WDTYPES = [torch.float32, torch.bfloat16]
# (in, out): in/out off the vector widths, in = 1, out = 1, several k-chunks (128) with a remainder,
# several column groups (32) per thread, and a SmolLM2 shape.
SHAPES = [(1, 1), (1, 37), (37, 1), (45, 77), (300, 33), (64, 1000), (576, 192)]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def assert_within_bound(got, want, bound, what):
    assert got.dtype == torch.float32 and got.shape == want.shape, (what, got.dtype, got.shape, want.shape)
    assert torch.isfinite(got).all(), what
    excess = (got.double() - want).abs() / bound
    assert excess.max() <= 1.0, f"{what}: error {excess.max().item():.3g} x the fp32 bound"


def check_linear(M, k, n, wdtype, gen, *, bias, residual, lead=()):
    x = torch.randn(*lead, M, k, generator=gen)
    w = torch.randn(n, k, generator=gen).to(wdtype)
    b = torch.randn(n, generator=gen) if bias else None
    r = torch.randn(*lead, M, n, generator=gen) if residual else None
    got = dspark_ops.linear(x, dspark_ops.pack_linear_weight(w), b, residual=r)
    want = reference.linear(x, w, b, r)
    assert_within_bound(got, want, reference.linear_error_bound(x, w, b, r),
                        f"M={M} in={k} out={n} {wdtype} bias={bias} residual={residual} lead={lead}")


def check_silu_mul(M, k, inter, wdtype, gen, lead=()):
    x = torch.randn(*lead, M, k, generator=gen)
    wg = torch.randn(inter, k, generator=gen).to(wdtype)
    wu = torch.randn(inter, k, generator=gen).to(wdtype)
    got = dspark_ops.linear_silu_mul(x, dspark_ops.pack_linear_weight(torch.cat([wg, wu]), gate_up=True))
    want = reference.linear_silu_mul(x, wg, wu)
    assert_within_bound(got, want, reference.linear_silu_mul_error_bound(x, wg, wu),
                        f"silu_mul M={M} in={k} I={inter} {wdtype} lead={lead}")


@pytest.mark.parametrize("wdtype", WDTYPES, ids=str)
@pytest.mark.parametrize("M", range(1, 17))
def test_linear_every_block_height(M, wdtype):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    for i, (k, n) in enumerate(SHAPES):
        check_linear(M, k, n, wdtype, gen, bias=i % 2 == 0, residual=i % 3 == 0)


@pytest.mark.parametrize("wdtype", WDTYPES, ids=str)
@pytest.mark.parametrize("M", range(1, 17))
def test_linear_silu_mul_every_block_height(M, wdtype):
    gen = torch.Generator().manual_seed(fresh_seed())
    for k, inter in [(1, 1), (37, 17), (300, 40), (64, 500)]:
        check_silu_mul(M, k, inter, wdtype, gen)


@pytest.mark.parametrize("M", [17, 24, 37, 64])
@pytest.mark.parametrize("wdtype", WDTYPES, ids=str)
def test_blocks_up_to_max_rows_run_the_kernel(M, wdtype):
    gen = torch.Generator().manual_seed(fresh_seed())
    for k, n in [(37, 45), (300, 33)]:
        check_linear(M, k, n, wdtype, gen, bias=True, residual=True)
        check_silu_mul(M, k, n, wdtype, gen)


@pytest.mark.parametrize("M", [65, 100])
@pytest.mark.parametrize("wdtype", WDTYPES, ids=str)
def test_taller_blocks_fall_back_to_matmul(M, wdtype):
    gen = torch.Generator().manual_seed(fresh_seed())
    for k, n in [(37, 45), (300, 33)]:
        check_linear(M, k, n, wdtype, gen, bias=True, residual=True)
        check_silu_mul(M, k, n, wdtype, gen)


def test_leading_batch_dims_are_rows_of_one_block():
    gen = torch.Generator().manual_seed(fresh_seed())
    check_linear(3, 45, 77, torch.float32, gen, bias=True, residual=True, lead=(2,))   # 6 rows: the kernel
    check_linear(5, 45, 77, torch.float32, gen, bias=False, residual=True, lead=(7, 2))  # 70 rows: matmul
    check_silu_mul(4, 37, 17, torch.bfloat16, gen, lead=(3,))
    x = torch.randn(2, 3, 45, generator=gen)
    pw = dspark_ops.pack_linear_weight(torch.randn(77, 45, generator=gen))
    assert torch.equal(dspark_ops.linear(x, pw), dspark_ops.linear(x.reshape(6, 45), pw).reshape(2, 3, 77))


def test_empty_block_and_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(fresh_seed())
    w = torch.randn(40, 24, generator=gen)
    pw = dspark_ops.pack_linear_weight(w)
    assert dspark_ops.linear(torch.randn(0, 24), pw).shape == (0, 40)
    no_inputs = dspark_ops.pack_linear_weight(torch.randn(5, 0))     # in = 0: y = bias
    b = torch.randn(5, generator=gen)
    for rows in (3, 70):
        assert torch.equal(dspark_ops.linear(torch.randn(rows, 0), no_inputs, b), b.expand(rows, 5))
    assert torch.equal(dspark_ops.linear_silu_mul(torch.randn(3, 0), dspark_ops.pack_linear_weight(
        torch.randn(10, 0), gate_up=True)), torch.zeros(3, 5))
    x = torch.randn(24, 5, generator=gen).t()            # [5, 24] with strides (1, 5)
    r = torch.randn(40, 5, generator=gen).t()
    got = dspark_ops.linear(x, pw, residual=r)
    assert torch.equal(got, dspark_ops.linear(x.contiguous(), pw, residual=r.contiguous()))
    assert_within_bound(got, reference.linear(x, w, None, r), reference.linear_error_bound(x, w, None, r), "strided")


def test_thread_count_does_not_change_the_result():
    """Threads split output columns only: every output is the same sum in the same order."""
    gen = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(9, 300, generator=gen)
    pw = dspark_ops.pack_linear_weight(torch.randn(2000, 300, generator=gen))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dspark_ops.linear(x, pw)
        torch.set_num_threads(max(2, before))
        many = dspark_ops.linear(x, pw)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


@pytest.mark.parametrize("gate_up", [False, True])
def test_bf16_storage_of_bf16_valued_weights_is_bit_identical(gate_up):
    """The engine stores bf16-valued fp32 weights (bf16 checkpoints) as bf16: the kernel must widen them exactly."""
    gen = torch.Generator().manual_seed(fresh_seed())
    w = torch.randn(2 * 150, 300, generator=gen).to(torch.bfloat16).float()
    op = dspark_ops.linear_silu_mul if gate_up else dspark_ops.linear
    for M in (1, 7, 16, 40):
        x = torch.randn(M, 300, generator=gen)
        as_fp32 = op(x, dspark_ops.pack_linear_weight(w, torch.float32, gate_up=gate_up))
        as_bf16 = op(x, dspark_ops.pack_linear_weight(w, torch.bfloat16, gate_up=gate_up))
        assert torch.equal(as_fp32, as_bf16), M


def test_nan_and_inf_propagate_like_matmul():
    gen = torch.Generator().manual_seed(fresh_seed())
    w = torch.randn(50, 20, generator=gen)
    x = torch.randn(4, 20, generator=gen)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    y = dspark_ops.linear(x, dspark_ops.pack_linear_weight(w))
    want = x @ w.T
    assert torch.isnan(y[1]).all()
    assert torch.equal(torch.isinf(y[2]), torch.isinf(want[2])) and torch.equal(torch.isnan(y[2]), torch.isnan(want[2]))
    assert torch.isfinite(y[[0, 3]]).all()


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_every_cpu_isa_build_within_bound(isa):
    """The generic and AVX2 builds (forced with DSPARK_CPU_ISA) pass the same checks as the best one."""
    code = textwrap.dedent(f"""
        import sys, torch, dspark_ops
        sys.path[:0] = [{os.path.dirname(__file__)!r}, {os.path.dirname(os.path.dirname(__file__))!r}]
        from test_linear import check_linear, check_silu_mul
        print(dspark_ops.build_info()["cpu_isa"])
        gen = torch.Generator().manual_seed({fresh_seed()})
        for wdtype in (torch.float32, torch.bfloat16):
            for M in range(1, 17):
                for k, n in [(1, 37), (45, 77), (300, 33)]:
                    check_linear(M, k, n, wdtype, gen, bias=M % 2 == 0, residual=M % 3 == 0)
                check_silu_mul(M, 300, 40, wdtype, gen)
            for M in (17, 40, 64):
                check_linear(M, 300, 33, wdtype, gen, bias=True, residual=True)
        print("ok")
    """)
    env = dict(os.environ, DSPARK_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    used, status = out.stdout.split()
    if used != isa:
        pytest.skip(f"this CPU cannot run the {isa} build")
    assert status == "ok"


# ---------------------------------------------------------------------------------------------
# Packing.


@pytest.mark.parametrize("wdtype", WDTYPES, ids=str)
def test_pack_round_trip(wdtype):
    gen = torch.Generator().manual_seed(fresh_seed())
    for n, k in [(1, 1), (33, 7), (64, 5), (100, 3), (3, 0), (1100, 1000)]:  # the last: huge-page advice
        w = torch.randn(n, k, generator=gen)
        pw = dspark_ops.pack_linear_weight(w, wdtype)
        assert pw.dtype == wdtype and pw.out_features == n and pw.in_features == k and not pw.gate_up
        assert torch.equal(pw.unpack(), w.to(wdtype))
        gu = torch.randn(2 * n, k, generator=gen)
        pgu = dspark_ops.pack_linear_weight(gu, wdtype, gate_up=True)
        assert pgu.gate_up and pgu.out_features == n
        assert torch.equal(pgu.unpack(), gu.to(wdtype))
    assert dspark_ops.pack_linear_weight(w.to(torch.bfloat16)).dtype == torch.bfloat16  # default keeps bf16
    assert dspark_ops.pack_linear_weight(w.to(torch.float16)).dtype == torch.float32
    assert pw.to("cpu") is pw


def test_packed_weight_survives_torch_save_and_load():
    gen = torch.Generator().manual_seed(fresh_seed())
    pw = dspark_ops.pack_linear_weight(torch.randn(70, 30, generator=gen), torch.bfloat16)
    pgu = dspark_ops.pack_linear_weight(torch.randn(40, 30, generator=gen), gate_up=True)
    buf = io.BytesIO()
    torch.save({"o": pw, "mlp": pgu}, buf)
    buf.seek(0)
    loaded = torch.load(buf)  # weights_only=True, torch's default
    x = torch.randn(3, 30, generator=gen)
    assert torch.equal(dspark_ops.linear(x, loaded["o"]), dspark_ops.linear(x, pw))
    assert torch.equal(dspark_ops.linear_silu_mul(x, loaded["mlp"]), dspark_ops.linear_silu_mul(x, pgu))


# ---------------------------------------------------------------------------------------------
# Bad input.

_X = torch.randn(2, 8)
_W = torch.randn(12, 8)
_PW = dspark_ops.pack_linear_weight(_W)
_PGU = dspark_ops.pack_linear_weight(torch.randn(12, 8), gate_up=True)

# name: (exception type, pattern the message must match, call)
BAD_CALLS = {
    "unpacked weight": (TypeError, "w_packed must be a PackedLinear", lambda: dspark_ops.linear(_X, _W)),
    "gate_up weight to linear": (ValueError, "w_packed was packed with gate_up=True",
                                 lambda: dspark_ops.linear(_X, _PGU)),
    "plain weight to silu_mul": (ValueError, "w_gate_up_packed was packed with gate_up=False",
                                 lambda: dspark_ops.linear_silu_mul(_X, _PW)),
    "x float64": (TypeError, "x must be float32, got torch.float64", lambda: dspark_ops.linear(_X.double(), _PW)),
    "x bfloat16": (TypeError, "x must be float32, got torch.bfloat16", lambda: dspark_ops.linear(_X.bfloat16(), _PW)),
    "x in mismatch": (ValueError, r"x must be \[\.\.\., 8\] \(the weight's in_features\), got \[2, 9\]",
                      lambda: dspark_ops.linear(torch.randn(2, 9), _PW)),
    "x scalar": (ValueError, r"x must be \[\.\.\., 8\].*got \[\]", lambda: dspark_ops.linear(torch.tensor(1.0), _PW)),
    "x not a tensor": (TypeError, "x must be a tensor, got list", lambda: dspark_ops.linear([1.0] * 8, _PW)),
    "bias shape": (ValueError, r"bias must be a float32 tensor of shape \[12\], got \(torch.float32, \[11\]\)",
                   lambda: dspark_ops.linear(_X, _PW, torch.randn(11))),
    "bias dtype": (ValueError, r"bias must be a float32 tensor.*got \(torch.float64",
                   lambda: dspark_ops.linear(_X, _PW, torch.randn(12).double())),
    "residual shape": (ValueError, r"residual must be a float32 tensor of shape \[2, 12\], got \(.*\[2, 11\]",
                       lambda: dspark_ops.linear(_X, _PW, residual=torch.randn(2, 11))),
    "residual dtype": (ValueError, r"residual must be a float32 tensor.*got \(torch.float16",
                       lambda: dspark_ops.linear(_X, _PW, residual=torch.randn(2, 12).half())),
    "pack 1-D": (ValueError, r"w must be \[out, in\], got shape \[8\]",
                 lambda: dspark_ops.pack_linear_weight(torch.randn(8))),
    "pack integer": (TypeError, "w must be a floating-point tensor, got torch.int32",
                     lambda: dspark_ops.pack_linear_weight(torch.ones(4, 4, dtype=torch.int32))),
    "pack dtype": (TypeError, "dtype must be torch.float32 or torch.bfloat16, got torch.float16",
                   lambda: dspark_ops.pack_linear_weight(_W, torch.float16)),
    "pack odd gate_up": (ValueError, "w must have an even number of rows",
                         lambda: dspark_ops.pack_linear_weight(torch.randn(5, 8), gate_up=True)),
    "pack no rows": (ValueError, "w must have at least one row",
                     lambda: dspark_ops.pack_linear_weight(torch.randn(0, 8))),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_names_the_argument(name):
    exc, pattern, call = BAD_CALLS[name]
    with pytest.raises(exc, match=pattern):
        call()


# name: (pattern the message must match, call on torch.ops.dspark)
RAW_BAD_CALLS = {
    "2-D weight": (r"linear: w_packed must be a weight packed for CPU.*got shape \[12, 8\]",
                   lambda op: op.linear(_X, _W, 12)),
    "wrong out_features": ("linear: w_packed has 1 column groups but 40 output features need 2",
                           lambda op: op.linear(_X, _PW.data, 40)),
    "zero out_features": ("linear: out_features must be >= 1, got 0", lambda op: op.linear(_X, _PW.data, 0)),
    "in mismatch": ("linear: w_packed has in_features 8 but x has 9",
                    lambda op: op.linear(torch.randn(2, 9), _PW.data, 12)),
    "non-contiguous weight": ("linear: w_packed must be contiguous",
                              lambda op: op.linear(_X, _PW.data.transpose(1, 2).contiguous().transpose(1, 2), 12)),
    "float16 weight": ("linear: w_packed must be float32 or bfloat16, got Half",
                       lambda op: op.linear(_X, _PW.data.half(), 12)),
    "x float64": ("linear: x must be float32, got Double", lambda op: op.linear(_X.double(), _PW.data, 12)),
    "bias shape": (r"bias must have shape \[12\], got \[3\]", lambda op: op.linear(_X, _PW.data, 12, torch.randn(3))),
    "residual shape": (r"linear: residual must have the output's shape \[2, 12\], got \[3, 12\]",
                       lambda op: op.linear(_X, _PW.data, 12, None, torch.randn(3, 12))),
    "silu groups": ("linear_silu_mul: w_packed has 1 column groups but 40 output features need 3",
                    lambda op: op.linear_silu_mul(_X, _PW.data, 40)),
    "silu 2-D weight": (r"linear_silu_mul: w_packed must be a weight packed for CPU.*got shape \[12, 8\]",
                        lambda op: op.linear_silu_mul(_X, _W, 6)),
}


@pytest.mark.parametrize("name", list(RAW_BAD_CALLS))
def test_raw_op_bad_input_raises(name):
    """The registered ops check their own arguments (callers may bypass the wrapper), each naming what is wrong."""
    pattern, call = RAW_BAD_CALLS[name]
    with pytest.raises(RuntimeError, match=pattern):
        call(torch.ops.dspark)


# ---------------------------------------------------------------------------------------------
# torch.compile / fake tensors.


def test_fake_tensor_shapes():
    x = torch.empty(2, 3, 8, device="meta")
    assert torch.ops.dspark.linear(x, _PW.data.to("meta"), 12).shape == (2, 3, 12)
    assert torch.ops.dspark.linear_silu_mul(x, _PGU.data.to("meta"), 6).shape == (2, 3, 6)


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(fresh_seed())
    d, inter = 40, 24
    o = dspark_ops.pack_linear_weight(torch.randn(d, d, generator=gen))
    gate_up = dspark_ops.pack_linear_weight(torch.randn(2 * inter, d, generator=gen), torch.bfloat16, gate_up=True)
    down = dspark_ops.pack_linear_weight(torch.randn(d, inter, generator=gen))
    bias = torch.randn(d, generator=gen)

    def block(h, o, gate_up, down):
        h = dspark_ops.linear(h, o, bias, residual=h)
        return dspark_ops.linear(dspark_ops.linear_silu_mul(h, gate_up), down, residual=h)

    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    for rows in (1, 5):
        h = torch.randn(1, rows, d, generator=gen)
        assert torch.equal(compiled(h, o, gate_up, down), block(h, o, gate_up, down))


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): the op is cuBLAS on the rows layout.


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("wdtype", WDTYPES, ids=str)
def test_cuda_within_bound(wdtype):
    gen = torch.Generator().manual_seed(fresh_seed())
    for M in (1, 8, 16, 40):
        for k, n in [(1, 37), (45, 77), (576, 192)]:
            x, w = torch.randn(M, k, generator=gen), torch.randn(n, k, generator=gen).to(wdtype)
            b, r = torch.randn(n, generator=gen), torch.randn(M, n, generator=gen)
            pw = dspark_ops.pack_linear_weight(w.cuda())
            assert pw.data.dim() == 2
            got = dspark_ops.linear(x.cuda(), pw, b.cuda(), residual=r.cuda()).cpu()
            # cuBLAS may use TF32 only when allowed; the default (highest precision) keeps fp32.
            assert_within_bound(got, reference.linear(x, w, b, r), reference.linear_error_bound(x, w, b, r),
                                f"cuda M={M} in={k} out={n}")
            wg, wu = torch.randn(n, k, generator=gen).to(wdtype), torch.randn(n, k, generator=gen).to(wdtype)
            pgu = dspark_ops.pack_linear_weight(torch.cat([wg, wu]).cuda(), gate_up=True)
            got = dspark_ops.linear_silu_mul(x.cuda(), pgu).cpu()
            assert_within_bound(got, reference.linear_silu_mul(x, wg, wu),
                                reference.linear_silu_mul_error_bound(x, wg, wu), f"cuda silu M={M}")


@pytest.mark.cuda
@needs_cuda
def test_cuda_repack_between_devices_and_graph_capture():
    gen = torch.Generator().manual_seed(fresh_seed())
    w = torch.randn(96, 64, generator=gen)
    cpu = dspark_ops.pack_linear_weight(w)
    gpu = cpu.to("cuda")
    assert torch.equal(gpu.unpack().cpu(), w) and torch.equal(gpu.to("cpu").data, cpu.data)
    with pytest.raises(RuntimeError, match="w_packed"):
        torch.ops.dspark.linear(torch.randn(2, 64, device="cuda"), cpu.data.cuda(), 96)
    x = torch.randn(4, 64, device="cuda")
    eager = dspark_ops.linear(x, gpu)
    graph, out = capture(lambda: dspark_ops.linear(x, gpu))
    x.copy_(torch.randn(4, 64, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(out, dspark_ops.linear(x, gpu), rtol=0, atol=0)
    assert not torch.equal(out, eager)

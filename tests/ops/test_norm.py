"""rms_norm / add_rms_norm against the reference (dspark_ops.reference.rms_norm) and the Hugging Face form."""
from __future__ import annotations

import pytest
import torch

import dspark_ops
from dspark_ops import reference as ref
from paged_helpers import poisoned_empty
from randomness import fresh_seed

CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _random_case(gen, dtype, shape, residual: bool):
    dim = shape[-1]
    x = (torch.randn(shape, generator=gen) * torch.rand((), generator=gen) * 8).to(dtype)
    w = (1 + 0.3 * torch.randn(dim, generator=gen)).to(dtype)
    r = (torch.randn(shape, generator=gen) * 2).to(dtype) if residual else None
    eps = float(torch.rand((), generator=gen)) * 1e-4
    return x, w, r, eps


def _bits(t):
    return t.view(torch.uint8) if t.is_floating_point() else t


def _assert_bits_equal(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(_bits(got.contiguous()), _bits(want.contiguous()))


SHAPES = [(1, 576), (3, 5, 64), (37, 96), (2, 7), (1, 1), (4, 4099), (300, 128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_matches_reference_bit_for_bit(dtype, residual):
    gen = torch.Generator().manual_seed(fresh_seed())
    for shape in SHAPES:
        x, w, r, eps = _random_case(gen, dtype, shape, residual)
        with poisoned_empty():
            got = dspark_ops.rms_norm(x, w, eps, r)
        want = ref.rms_norm(x, w, eps, r)
        for g, v in zip(got if residual else (got,), want if residual else (want,)):
            _assert_bits_equal(g, v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_close_to_the_hugging_face_form(dtype):
    """Only the sum of squares (double here, float in torch) and the correctly rounded inverse square root
    differ: fp32 within 4 ulp; in bf16 / fp16 at most one rounding step of the stored value apart."""
    gen = torch.Generator().manual_seed(fresh_seed())
    for shape in SHAPES:
        x, w, _, eps = _random_case(gen, dtype, shape, False)
        xf = x.float()
        textbook = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
        got = dspark_ops.rms_norm(x, w, eps)
        ulp = torch.finfo(dtype).eps       # one ulp relative to a value in [1, 2)
        torch.testing.assert_close(got, textbook, rtol=(4 if dtype == torch.float32 else 2) * ulp, atol=0)


def test_rows_are_independent_of_batch_and_threads():
    """A row's result does not depend on the rows around it or on the thread count (the textbook torch form's
    vectorised rsqrt does depend on where the row falls)."""
    gen = torch.Generator().manual_seed(fresh_seed())
    x, w, r, eps = _random_case(gen, torch.float32, (513, 576), True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dspark_ops.rms_norm(x, w, eps, r)
        torch.set_num_threads(2)
        two = dspark_ops.rms_norm(x, w, eps, r)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        _assert_bits_equal(a, b)
    for i in (0, 17, 512):
        alone = dspark_ops.rms_norm(x[i:i + 1], w, eps, r[i:i + 1])
        _assert_bits_equal(alone[0], one[0][i:i + 1])


def test_strided_input_and_nan():
    gen = torch.Generator().manual_seed(fresh_seed())
    x, w, _, eps = _random_case(gen, torch.float32, (6, 2 * 64), False)
    view = x[:, ::2]                                   # non-contiguous: read through a copy
    _assert_bits_equal(dspark_ops.rms_norm(view, w[:64].contiguous(), eps),
                       ref.rms_norm(view.contiguous(), w[:64], eps))
    x[2, 5] = float("nan")                             # NaN stays in its row, as in torch
    out = dspark_ops.rms_norm(x, torch.ones(128), eps)
    assert bool(out[2].isnan().all()) and not bool(out[[0, 1, 3, 4, 5]].isnan().any())


def test_bad_input_names_the_argument():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        dspark_ops.rms_norm(x, torch.randn(9), 1e-5)
    with pytest.raises(RuntimeError, match="weight must be Float"):
        dspark_ops.rms_norm(x, w.double(), 1e-5)
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16"):
        dspark_ops.rms_norm(x.double(), w.double(), 1e-5)
    with pytest.raises(RuntimeError, match="residual must have x's shape"):
        dspark_ops.rms_norm(x, w, 1e-5, torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="residual must be"):
        dspark_ops.rms_norm(x, w, 1e-5, torch.randn(4, 8).bfloat16())
    with pytest.raises(RuntimeError, match="eps must be finite"):
        dspark_ops.rms_norm(x, w, float("nan"))
    with pytest.raises(RuntimeError, match="at least one dimension"):
        dspark_ops.rms_norm(torch.tensor(1.0), torch.randn(1), 1e-5)
    with pytest.raises(RuntimeError, match="last dimension must be >= 1"):
        dspark_ops.rms_norm(torch.randn(3, 0), torch.randn(0), 1e-5)
    with pytest.raises(TypeError, match="residual must be a tensor"):
        dspark_ops.rms_norm(x, w, 1e-5, [1.0])
    assert dspark_ops.rms_norm(torch.randn(0, 8), w, 1e-5).shape == (0, 8)


def test_meta_and_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(fresh_seed())
    x, w, r, eps = _random_case(gen, torch.bfloat16, (5, 64), True)
    out, total = torch.ops.dspark.add_rms_norm(x.to("meta"), r.to("meta"), w.to("meta"), eps)
    assert out.shape == total.shape == x.shape and out.dtype == torch.bfloat16

    def layer(x, r):
        normed, total = torch.ops.dspark.add_rms_norm(x, r, w, eps)
        return torch.ops.dspark.rms_norm(normed * 2, w, eps), total

    got = torch.compile(layer, fullgraph=True)(x, r)
    want = layer(x, r)
    for a, b in zip(got, want):
        _assert_bits_equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_matches_cpu_and_graph_capture():
    from cuda_graphs import capture
    gen = torch.Generator().manual_seed(fresh_seed())
    for dtype in DTYPES:
        for shape in SHAPES + [(2, 8192)]:
            for residual in (False, True):
                x, w, r, eps = _random_case(gen, dtype, shape, residual)
                want = dspark_ops.rms_norm(x, w, eps, r)
                with poisoned_empty():
                    got = dspark_ops.rms_norm(x.cuda(), w.cuda(), eps, None if r is None else r.cuda())
                for g, v in zip(got if residual else (got,), want if residual else (want,)):
                    _assert_bits_equal(g.cpu(), v)
    x, w, r, eps = _random_case(gen, torch.bfloat16, (64, 576), True)
    x, w, r = x.cuda(), w.cuda(), r.cuda()
    graph, out = capture(lambda: torch.ops.dspark.add_rms_norm(x, r, w, eps))
    for _ in range(2):
        x.copy_(torch.randn(64, 576, device="cuda"))
        graph.replay()
        want = ref.rms_norm(x.cpu(), w.cpu(), eps, r.cpu())
        for g, v in zip(out, want):
            _assert_bits_equal(g.cpu(), v)

"""rotary against the reference (dspark_ops.reference.rotary, the Hugging Face rotate-half formula): bit for bit."""
from __future__ import annotations

import pytest
import torch

import dspark_ops
from dspark_ops import reference as ref
from dspark_ops.models.layers import rope_cos_sin, rope_inv_freq
from paged_helpers import poisoned_empty
from randomness import fresh_seed

CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _case(gen, dtype, lead, heads, dim, fused_qkv=False):
    """x [*lead, heads, dim] (with fused_qkv: the first `heads` heads of a wider fused projection, strided)."""
    width = heads + 3 if fused_qkv else heads
    full = torch.randn(*lead, width * dim, generator=gen) * 2
    x = full[..., :heads * dim].unflatten(-1, (heads, dim)).to(dtype) if not fused_qkv else \
        full.to(dtype)[..., :heads * dim].unflatten(-1, (heads, dim))
    positions = torch.randint(0, 8192, lead, generator=gen)
    cos, signed_sin = rope_cos_sin(positions, rope_inv_freq(dim, 10000.0, None), dtype)
    return x, cos, signed_sin


def _bits(t):
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_hugging_face_formula_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(fresh_seed())
    for lead, heads, dim, fused in [((1,), 12, 64, True), ((7,), 9, 64, False), ((2, 5), 3, 128, True),
                                    ((300,), 2, 32, False), ((3,), 1, 2, False), ((0,), 4, 64, False)]:
        x, cos, sin = _case(gen, dtype, lead, heads, dim, fused)
        with poisoned_empty():
            got = dspark_ops.rotary(x, cos, sin)
        want = ref.rotary(x, cos, sin)
        assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous()
        assert torch.equal(_bits(got), _bits(want)), (lead, heads, dim)


def test_threads_do_not_change_the_bits():
    gen = torch.Generator().manual_seed(fresh_seed())
    x, cos, sin = _case(gen, torch.float32, (400,), 12, 64, True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dspark_ops.rotary(x, cos, sin)
        torch.set_num_threads(2)
        two = dspark_ops.rotary(x, cos, sin)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(_bits(one), _bits(two))


def test_bad_input_names_the_argument():
    gen = torch.Generator().manual_seed(fresh_seed())
    x, cos, sin = _case(gen, torch.float32, (4,), 3, 64)
    with pytest.raises(RuntimeError, match="cos must have shape"):
        dspark_ops.rotary(x, cos[:3], sin)
    with pytest.raises(RuntimeError, match="signed_sin must be Float"):
        dspark_ops.rotary(x, cos, sin.double())
    with pytest.raises(RuntimeError, match="head_dim must be even"):
        dspark_ops.rotary(x[..., :63], cos[..., :63], sin[..., :63])
    with pytest.raises(RuntimeError, match=r"x must be \[..., heads, head_dim\]"):
        dspark_ops.rotary(x[0, 0], cos[0], sin[0])
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16"):
        dspark_ops.rotary(x.double(), cos.double(), sin.double())
    with pytest.raises(TypeError, match="cos must be a tensor"):
        dspark_ops.rotary(x, None, sin)


def test_meta_and_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(fresh_seed())
    x, cos, sin = _case(gen, torch.bfloat16, (5,), 4, 64, True)
    assert torch.ops.dspark.rotary(x.to("meta"), cos.to("meta"), sin.to("meta")).shape == x.shape

    def step(x, cos, sin):
        return torch.ops.dspark.rotary(x * 2, cos, sin)

    got = torch.compile(step, fullgraph=True)(x, cos, sin)
    assert torch.equal(_bits(got), _bits(step(x, cos, sin)))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_matches_cpu_and_graph_capture():
    from cuda_graphs import capture
    gen = torch.Generator().manual_seed(fresh_seed())
    for dtype in DTYPES:
        for lead, heads, dim, fused in [((1,), 12, 64, True), ((33,), 9, 128, False), ((2, 5), 3, 256, True)]:
            x, cos, sin = _case(gen, dtype, lead, heads, dim, fused)
            want = dspark_ops.rotary(x, cos, sin)
            full = x.cuda() if not fused else x.contiguous().cuda()
            with poisoned_empty():
                got = dspark_ops.rotary(full, cos.cuda(), sin.cuda())
            assert torch.equal(_bits(got.cpu()), _bits(want))
    x, cos, sin = (t.cuda() for t in _case(gen, torch.float32, (64,), 12, 64))
    graph, out = capture(lambda: torch.ops.dspark.rotary(x, cos, sin))
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(_bits(out.cpu()), _bits(ref.rotary(x.cpu(), cos.cpu(), sin.cpu())))

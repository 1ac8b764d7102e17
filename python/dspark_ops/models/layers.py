"""Building blocks shared by the target model and the drafters.

Every tensor that flows through here has arbitrary leading dimensions
(``[B, T, ...]`` for the dense backends, ``[N, ...]`` for a flattened ragged
batch); the attention backend decides what the leading dimensions mean.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..norm import rms_norm
from ..rotary import rotary

LinearFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class LinearImpl:
    """The one function every projection of a model goes through.

    The engine replaces ``fn`` (e.g. with ``dspark_ops.linear`` over packed
    weights); ``fn(x, weight, bias)`` always receives the module's own weight
    Parameter, so a packed copy can be looked up by identity.
    """

    __slots__ = ("fn", "silu_mul_fn")

    def __init__(self, fn: LinearFn = F.linear, silu_mul_fn: LinearFn | None = None):
        self.fn = fn
        self.silu_mul_fn = silu_mul_fn  # optional fused silu(gate) * up of a gate/up weight

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.fn(x, weight, bias)

    def silu_mul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """silu(gate) * up where ``weight`` stacks the gate rows over the up rows."""
        if self.silu_mul_fn is not None:
            return self.silu_mul_fn(x, weight, bias)
        gate, up = self.fn(x, weight, bias).chunk(2, dim=-1)
        return F.silu(gate) * up


class Linear(nn.Module):
    """``y = x W^T + b`` with ``W [out, in]``, computed by the owner's shared :class:`LinearImpl`."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, impl: LinearImpl,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self._impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._impl(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


def one_op_on_cpu(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether a one-op kernel (rms_norm, rotary) replaces an eager form: on CPU, where the eager form's
    dispatches cost more than its arithmetic at decode sizes, and with no autograd through the tensors (the
    kernels are not differentiable; training keeps the eager form). On CUDA the engine's graphs already remove
    the per-op launch cost."""
    return x.device.type == "cpu" and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params)))


class RMSNorm(nn.Module):
    """Llama/Qwen RMSNorm: normalise in fp32, cast back, then scale (Hugging Face's rounding order).

    Where :func:`one_op_on_cpu` allows, it runs as one op (``dspark_ops.rms_norm``, sum of squares in double:
    within a few ulp of this eager form) instead of the eager form's ten-odd.
    """

    def __init__(self, dim: int, eps: float, *, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if one_op_on_cpu(x, self.weight):
            return rms_norm(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add fused into the norm where :meth:`forward` is."""
        if one_op_on_cpu(x, self.weight):
            return rms_norm(x, self.weight, self.eps, residual)
        total = x + residual
        return self(total), total


# --------------------------------------------------------------------------- RoPE

def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] (fp32) for rotate-half RoPE, with optional scaling.

    Supported ``scaling`` (Hugging Face's ``rope_scaling`` / ``rope_parameters``):
    None or type "default"; "linear" (positions divided by ``factor``); "llama3"
    (the Llama-3.1 frequency-band rule: long wavelengths divided by ``factor``,
    short ones kept, a linear blend in between).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        # Fraction of the way from the low-frequency band (scaled) to the high-frequency band (kept).
        smooth = ((old_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return torch.where(wavelen < old_len / high, inv_freq,
                           torch.where(wavelen > old_len / low, inv_freq / factor, scaled))
    raise NotImplementedError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos and signed sin [..., head_dim] for integer ``positions`` [...], computed in fp32 then cast: the sin
    of the first half negated, which is what :func:`apply_rope` multiplies its rolled input by."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    half = freqs.shape[-1]
    sign = torch.ones(2 * half, device=emb.device)
    sign[:half] = -1
    return emb.cos().to(dtype), (emb.sin() * sign).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [..., H, D]: x cos + [-x2, x1] sin, written as x cos + [x2, x1] [-sin1, sin2]
    (the same products bit for bit, negation being exact) to save the negation and concatenation per call.
    cos and signed_sin [..., D] come from :func:`rope_cos_sin`. One op (``dspark_ops.rotary``, the same bits)
    where :func:`one_op_on_cpu` allows."""
    if one_op_on_cpu(x, cos, signed_sin):
        return rotary(x, cos, signed_sin)
    return x * cos.unsqueeze(-2) + x.roll(x.shape[-1] // 2, -1) * signed_sin.unsqueeze(-2)


# --------------------------------------------------------------------------- decoder layer

class Attention(nn.Module):
    """Fused QKV projection, optional per-head QK RMSNorm (Qwen3), RoPE, backend attention, output projection."""

    def __init__(self, *, input_size: int, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 qk_norm: bool, qkv_bias: bool, o_bias: bool, eps: float, impl: LinearImpl, device=None, dtype=None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of "
                             f"num_key_value_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.qkv_proj = Linear(input_size, self.q_size + 2 * self.kv_size, bias=qkv_bias, impl=impl,
                               device=device, dtype=dtype)
        self.o_proj = Linear(self.q_size, hidden_size, bias=o_bias, impl=impl, device=device, dtype=dtype)
        self.q_norm = RMSNorm(head_dim, eps, device=device, dtype=dtype) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps, device=device, dtype=dtype) if qk_norm else None

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q [..., Hq, D], k, v [..., Hkv, D] of the (already normed) input x [..., input_size], RoPE applied."""
        qkv = self.qkv_proj(x)
        v = qkv[..., self.q_size + self.kv_size:].unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.q_norm is None:     # q and k heads are adjacent in qkv: one rotation for both
            qk = qkv[..., :self.q_size + self.kv_size].unflatten(-1, (self.num_heads + self.num_kv_heads,
                                                                      self.head_dim))
            q, k = apply_rope(qk, cos, sin).split((self.num_heads, self.num_kv_heads), dim=-2)
            return q, k, v
        q = self.q_norm(qkv[..., :self.q_size].unflatten(-1, (self.num_heads, self.head_dim)))
        k = self.k_norm(qkv[..., self.q_size:self.q_size + self.kv_size].unflatten(-1, (self.num_kv_heads,
                                                                                         self.head_dim)))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, backend, layer: int) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin)
        out = backend.attend(layer, q, k, v)
        return self.o_proj(out.flatten(-2))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) with gate and up fused into one projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, bias: bool, impl: LinearImpl,
                 device=None, dtype=None):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=bias, impl=impl, device=device, dtype=dtype)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias, impl=impl, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_up_proj
        return self.down_proj(g._impl.silu_mul(x, g.weight, g.bias))


class DecoderLayer(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg, impl: LinearImpl, *, attn_input_size: int | None = None, device=None, dtype=None):
        super().__init__()
        d = cfg.hidden_size
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps, device=device, dtype=dtype)
        self.self_attn = Attention(input_size=attn_input_size or d, hidden_size=d,
                                   num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
                                   head_dim=cfg.head_dim, qk_norm=cfg.qk_norm, qkv_bias=cfg.qkv_bias,
                                   o_bias=cfg.o_bias, eps=cfg.rms_norm_eps, impl=impl, device=device, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps, device=device, dtype=dtype)
        self.mlp = MLP(d, cfg.intermediate_size, bias=cfg.mlp_bias, impl=impl, device=device, dtype=dtype)

    def forward(self, x, cos, sin, backend, layer: int) -> torch.Tensor:
        h, x = self.post_attention_layernorm.add_forward(self.self_attn(self.input_layernorm(x), cos, sin, backend,
                                                                        layer), x)
        return x + self.mlp(h)


def init_normal_(module: nn.Module, std: float, generator: torch.Generator | None = None) -> None:
    """Random init for fresh models: normal(0, std) matrices and embeddings, zero biases, unit norms."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.device.type == "meta":
                continue
            if isinstance(module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module, RMSNorm):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * std)


class RotaryEmbedding(nn.Module):
    """cos/sin of positions; the inverse frequencies stay fp32 whatever the model is cast to."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None, *, device=None):
        super().__init__()
        self._inv_freq_cpu = rope_inv_freq(head_dim, theta, scaling)
        self.register_buffer("inv_freq", self._inv_freq_cpu.to(device), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # Casting the model to bf16 must not round the frequencies; moving it must still move them.
        self.inv_freq = self._inv_freq_cpu.to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        return rope_cos_sin(positions, self.inv_freq, dtype)

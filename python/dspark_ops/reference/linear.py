"""Executable specification of ``linear`` and ``linear_silu_mul`` (float64)."""
from __future__ import annotations

import torch


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + bias + residual in float64 (W [out, in] as stored: bf16 weights count exactly as stored)."""
    y = x.double() @ w.double().T
    if bias is not None:
        y = y + bias.double()
    if residual is not None:
        y = y + residual.double()
    return y


def linear_silu_mul(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """silu(x Wg^T) * (x Wu^T) in float64."""
    return torch.nn.functional.silu(linear(x, w_gate)) * linear(x, w_up)


def linear_error_bound(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """Worst-case rounding error of an fp32 evaluation of ``linear`` in any summation order.

    gamma_n * (|x| |W|^T + |bias| + |residual|) with n = in + 2 terms per output
    and gamma_n = n u / (1 - n u), u = 2^-24, plus the rounding of the result.
    """
    n = x.shape[-1] + 2
    u = 2.0 ** -24
    gamma = n * u / (1 - n * u)
    mag = x.double().abs() @ w.double().abs().T
    if bias is not None:
        mag = mag + bias.double().abs()
    if residual is not None:
        mag = mag + residual.double().abs()
    return gamma * mag + u * linear(x, w, bias, residual).abs()


def linear_silu_mul_error_bound(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """Worst-case error of an fp32 ``linear_silu_mul``: the products' rounding carried
    through silu (|silu'| < 1.1) and the multiply, plus a few ulp for silu itself."""
    gate, up = linear(x, w_gate), linear(x, w_up)
    silu = torch.nn.functional.silu(gate)
    return (silu.abs() * linear_error_bound(x, w_up) + 1.1 * linear_error_bound(x, w_gate) * up.abs()
            + 16 * 2.0 ** -24 * (silu * up).abs())

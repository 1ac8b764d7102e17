"""Helpers the op wrappers share: per-request arguments and early, named checks."""
from __future__ import annotations

import math

import torch


def per_request(value, name: str, batch: int, device: torch.device, dtype: torch.dtype, default,
                valid=None, rule: str = "") -> torch.Tensor:
    """A [B] tensor of `dtype` on `device` from None, a Python number or a tensor.

    Python numbers and CPU tensors are range-checked here (free); device tensors
    are checked inside the kernel so the call never syncs with the host.
    """
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a number or a tensor of shape [{batch}], got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        if valid is not None and not valid(value):
            raise ValueError(f"{name} must satisfy {rule}, got {value}")
        return torch.full((batch,), value, dtype=dtype, device=device)
    if value.dim() == 0:
        value = value.reshape(1).expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"{name} must have shape [{batch}], got {list(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the op runs on {device}")
    if value.is_floating_point() != (dtype.is_floating_point):
        kind = "floating-point" if dtype.is_floating_point else "integer"
        raise TypeError(f"{name} must be a {kind} tensor, got {value.dtype}")
    if valid is not None and is_concrete_cpu(value):
        bad = [v for v in value.tolist() if not valid(v)]
        if bad:
            raise ValueError(f"{name} must satisfy {rule}, got {bad[0]}")
    return value.to(dtype).contiguous()


def seed_arg(value, batch: int, device: torch.device) -> torch.Tensor:
    """The ``seed`` of a sampling op as its kernels take it: [1] for one seed shared by the batch (None, a
    Python int, a 0-d or 1-element tensor; row b then draws from its own stream b), or [B] for a seed per row
    (row b's result depends on its seed and offset only)."""
    if value is None:
        value = 0
    if isinstance(value, bool) or not isinstance(value, (int, torch.Tensor)):
        raise TypeError(f"seed must be an int or an integer tensor of shape [{batch}] or [1], "
                        f"got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        return torch.full((1,), value, dtype=torch.int64, device=device)
    if value.is_floating_point() or value.dtype == torch.bool:
        raise TypeError(f"seed must be an integer tensor, got {value.dtype}")
    if value.numel() == 1 and value.dim() <= 1:
        value = value.reshape(1)
    elif value.shape != (batch,):
        raise ValueError(f"seed must have shape [{batch}] (a seed per row) or [1] (one seed), got {list(value.shape)}")
    if value.device != device:
        raise ValueError(f"seed is on {value.device} but the op runs on {device}")
    return value.to(torch.int64).contiguous()


def is_concrete_cpu(t: torch.Tensor) -> bool:
    """A real CPU tensor whose values can be read now (not fake, not being traced)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return t.device.type == "cpu" and not isinstance(t, FakeTensor) and not torch.compiler.is_compiling()


def is_finite_nonneg(v) -> bool:
    return math.isfinite(v) and v >= 0


def check_floating(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def token_ids_int32(t, name: str, *, lowest_valid: int = 0) -> torch.Tensor:
    """Integer ids as int32 without letting a huge int64 id wrap into range (values below ``lowest_valid``
    stay below it, so the kernel still rejects them)."""
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor")
    if t.dtype != torch.int32:
        t = t.clamp(lowest_valid - 1, 2**31 - 1).to(torch.int32)
    return t.contiguous()

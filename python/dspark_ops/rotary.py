"""Rotate-half rotary embedding in one op (``torch.ops.dspark.rotary``), bit-identical to the Hugging Face
formula. Not differentiable; models use it where no gradient is needed (dspark_ops.models.layers.apply_rope)."""
from __future__ import annotations

import torch

from ._ops import ops


def rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``x cos + [x2, x1] signed_sin`` per head row, i.e. ``x cos + rotate_half(x) sin``.

    Args:
        x: ``[..., heads, head_dim]`` (even head_dim), float32 / bfloat16 / float16; any strides with a
            contiguous last dimension (e.g. the q and k heads of a fused QKV output) are read in place.
        cos, signed_sin: ``[..., head_dim]`` with x's leading dimensions and dtype: the cosines and the sines
            with their first half negated, as ``dspark_ops.models.layers.rope_cos_sin`` returns them.

    Returns a new contiguous tensor of x's shape.
    """
    for name, t in (("x", x), ("cos", cos), ("signed_sin", signed_sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    return ops.rotary(x, cos, signed_sin)

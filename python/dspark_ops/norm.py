"""RMSNorm in one op, optionally fused with the residual add before it (``torch.ops.dspark.rms_norm`` /
``add_rms_norm``): what a decoder layer's pre-norm does in about ten eager ops. Not differentiable; models use
it where no gradient is needed (dspark_ops.models.layers.RMSNorm)."""
from __future__ import annotations

import torch

from ._ops import ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension of ``x [..., dim]``.

    Args:
        x: float32, bfloat16 or float16, CPU or CUDA.
        weight: ``[dim]``, x's dtype and device.
        eps: added to the mean square (finite, >= 0).
        residual: optional, x's shape and dtype: the op then normalises ``x + residual`` (rounded to x's dtype,
            as the unfused add is) and returns ``(normed, x + residual)``.

    Rounding is that of the Hugging Face Llama / Qwen RMSNorm (fp32 normalisation, cast, weight multiply in
    x's dtype) with the sum of squares taken in double: the same on CPU and CUDA, within about an ulp of the
    mean of fp32 torch's own sum (``dspark_ops.reference.rms_norm`` is the specification).
    """
    for name, t in (("x", x), ("weight", weight), ("residual", residual)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if residual is None:
        return ops.rms_norm(x, weight, float(eps))
    return ops.add_rms_norm(x, residual, weight, float(eps))

"""Reference RMSNorm (``rms_norm`` / ``add_rms_norm``): the Llama / Qwen form of Hugging Face transformers,
normalised in fp32, cast to the input's dtype, then scaled by the weight in that dtype, with the sum of squares
taken in double (dspark/rms_norm.h says why)."""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dimension; with ``residual``, the same of
    ``x + residual`` (rounded to x's dtype), returned as ``(normed, x + residual)``."""
    if residual is not None:
        x = x + residual
    mean = (x.double().square().sum(-1, keepdim=True) / x.shape[-1]).float()
    inverse = torch.sqrt((mean + eps).double()).reciprocal().float()   # rounded once, as the kernels do
    out = weight * (x.float() * inverse).to(x.dtype)
    return out if residual is None else (out, x)

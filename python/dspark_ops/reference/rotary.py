"""Reference rotary embedding (``rotary``): the Hugging Face rotate-half formula."""
from __future__ import annotations

import torch


def rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``x cos + rotate_half(x) sin`` for x [..., H, D], with ``signed_sin`` the sin whose first half is negated
    (so ``sin = |signed_sin|`` up to sign: the first half is negated back here)."""
    half = x.shape[-1] // 2
    sin = torch.cat((-signed_sin[..., :half], signed_sin[..., half:]), -1)
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)

"""dspark_ops: kernels for DSpark-style speculative decoding (torch.ops.dspark.*)."""
from __future__ import annotations

from ._ops import build_info, ops
from .linear import PackedLinear, linear, linear_silu_mul, pack_linear_weight
from .verify import verify

__version__ = "0.1.0"

__all__ = ["build_info", "ops", "verify", "PackedLinear", "linear", "linear_silu_mul", "pack_linear_weight",
           "__version__"]

"""dspark_ops: kernels for DSpark-style speculative decoding (torch.ops.dspark.*)."""
from __future__ import annotations

from ._ops import build_info, ops
from .markov import markov_sample
from .verify import verify

__version__ = "0.1.0"

__all__ = ["build_info", "markov_sample", "ops", "verify", "__version__"]

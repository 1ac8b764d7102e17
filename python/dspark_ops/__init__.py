"""dspark_ops: kernels for DSpark-style speculative decoding (torch.ops.dspark.*)."""
from __future__ import annotations

from ._ops import build_info, ops
from .attention import append_kv, draft_block_attention, kv_rollback
from .kv_cache import OutOfPagesError, PagedKVCache
from .linear import PackedLinear, linear, linear_silu_mul, pack_linear_weight
from .verify import verify

__version__ = "0.1.0"

__all__ = ["OutOfPagesError", "PackedLinear", "PagedKVCache", "append_kv", "build_info", "draft_block_attention",
           "kv_rollback", "linear", "linear_silu_mul", "ops", "pack_linear_weight", "verify", "__version__"]

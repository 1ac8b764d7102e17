"""dspark_ops: kernels for DSpark-style speculative decoding (torch.ops.dspark.*)."""
from __future__ import annotations

from ._ops import build_info, ops
from .attention import append_kv, draft_block_attention, kv_rollback
from .kv_cache import OutOfPagesError, PagedKVCache
from .verify import verify

__version__ = "0.1.0"

__all__ = ["OutOfPagesError", "PagedKVCache", "append_kv", "build_info", "draft_block_attention", "kv_rollback", "ops",
           "verify", "__version__"]

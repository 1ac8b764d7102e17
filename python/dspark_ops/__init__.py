"""dspark_ops: kernels for DSpark-style speculative decoding (torch.ops.dspark.*)."""
from __future__ import annotations

from ._ops import build_info, ops
from .attention import append_kv, draft_block_attention, kv_rollback
from .kv_cache import OutOfPagesError, PagedKVCache
from .linear import PackedLinear, linear, linear_silu_mul, pack_linear_weight
from .markov import markov_sample
from .norm import rms_norm
from .rotary import rotary
from .schedule import load_sps_table, plan_capacity, profile_sps, save_sps_table, schedule_verify_lengths
from .verify import verify
from . import calibrate  # noqa: E402

__version__ = "0.1.0"

__all__ = ["OutOfPagesError", "PackedLinear", "PagedKVCache", "append_kv", "build_info", "calibrate",
           "draft_block_attention", "kv_rollback", "linear", "linear_silu_mul", "load_sps_table", "markov_sample",
           "ops", "pack_linear_weight", "plan_capacity", "profile_sps", "rms_norm", "rotary", "save_sps_table",
           "schedule_verify_lengths", "verify", "__version__"]

"""dspark_ops: kernels for DSpark-style speculative decoding (torch.ops.dspark.*)."""
from __future__ import annotations

from ._ops import build_info, ops
from .markov import markov_sample
from .schedule import load_sps_table, plan_capacity, profile_sps, save_sps_table, schedule_verify_lengths
from .verify import verify
from . import calibrate  # noqa: E402

__version__ = "0.1.0"

__all__ = ["build_info", "calibrate", "load_sps_table", "markov_sample", "ops", "plan_capacity", "profile_sps", "save_sps_table",
           "schedule_verify_lengths", "verify", "__version__"]

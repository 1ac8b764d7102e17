"""Pure-PyTorch reference semantics of every dspark op: the executable specification tests compare against."""
from .attention import append_kv, draft_block_attention, gather_kv, kv_rollback
from .linear import linear, linear_error_bound, linear_silu_mul, linear_silu_mul_error_bound
from .markov import markov_sample
from .norm import rms_norm
from .rotary import rotary
from .schedule import plan_capacity, schedule_verify_lengths
from .verify import filtered_masses, verify

__all__ = ["append_kv", "draft_block_attention", "filtered_masses", "gather_kv", "kv_rollback", "linear",
           "linear_error_bound", "linear_silu_mul", "linear_silu_mul_error_bound", "markov_sample", "plan_capacity",
           "rms_norm", "rotary", "schedule_verify_lengths", "verify"]

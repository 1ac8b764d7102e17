"""Pure-PyTorch reference semantics of every dspark op: the executable specification tests compare against."""
from .linear import linear, linear_error_bound, linear_silu_mul, linear_silu_mul_error_bound
from .verify import filtered_masses, verify

__all__ = ["filtered_masses", "linear", "linear_error_bound", "linear_silu_mul", "linear_silu_mul_error_bound", "verify"]

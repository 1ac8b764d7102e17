"""Pure-PyTorch reference semantics of every dspark op: the executable specification tests compare against."""
from .linear import linear, linear_silu_mul
from .verify import filtered_masses, verify

__all__ = ["filtered_masses", "linear", "linear_silu_mul", "verify"]

"""Pure-PyTorch reference semantics of every dspark op: the executable specification tests compare against."""
from .verify import filtered_masses, verify

__all__ = ["filtered_masses", "verify"]

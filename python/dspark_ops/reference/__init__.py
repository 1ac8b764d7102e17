"""Pure-PyTorch reference semantics of every dspark op: the executable specification tests compare against."""
from .markov import markov_sample
from .verify import filtered_masses, verify

__all__ = ["filtered_masses", "markov_sample", "verify"]

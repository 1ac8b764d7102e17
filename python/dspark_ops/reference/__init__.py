"""Pure-PyTorch reference semantics of every dspark op: the executable specification tests compare against."""
from .markov import markov_sample
from .schedule import plan_capacity, schedule_verify_lengths
from .verify import filtered_masses, verify

__all__ = ["filtered_masses", "markov_sample", "plan_capacity", "schedule_verify_lengths", "verify"]

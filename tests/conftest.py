import pytest
import torch

from randomness import fresh_seed


@pytest.fixture(autouse=True)
def _fresh_global_rng():
    """Tests that draw from torch's global RNG get fresh inputs each run too (its default seed is fixed)."""
    torch.manual_seed(fresh_seed())

import os

import pytest
import torch

# The CPU projections run the packed kernel everywhere in tests (deterministic kernels, no timing at engine
# start); tests/test_linear_plan.py covers the measured choice (auto).
os.environ.setdefault("DSPARK_LINEAR_IMPL", "packed")

from randomness import fresh_seed


@pytest.fixture(autouse=True)
def _fresh_global_rng():
    """Tests that draw from torch's global RNG get fresh inputs each run too (its default seed is fixed)."""
    torch.manual_seed(fresh_seed())

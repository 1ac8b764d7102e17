"""No drafting: blocks of the anchor alone, plain autoregressive decoding through the same step (the
baseline every speedup is measured against)."""
from __future__ import annotations

import torch

from .base import Proposer


class NoProposer(Proposer):
    """Proposes nothing: block_size 0, no cache, no state (every step of the engine is plain)."""

    def propose(self, s):
        return torch.empty(s.anchor.shape[0], 0, dtype=torch.int32, device=s.anchor.device), None, None

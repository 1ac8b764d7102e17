"""The serving engine: :class:`SpeculativeEngine` and its parts.

- :mod:`.speculative`: the engine, a loop of admission, prefill and the decode step
  (draft -> schedule -> verify -> rollback);
- :mod:`dspark_ops.proposers`: the drafting strategies (DSpark, EAGLE-3, none) behind one interface;
- :mod:`.draft_policy`: whether a step drafts (``draft_max_batch``) and the step-cost model of "auto";
- :mod:`.slots`: the per-slot decode state on the device;
- :mod:`.results`: the launched steps' results on their way back, applied to the requests;
- :mod:`.graphs`: the decode step captured as CUDA graphs;
- :mod:`.requests`: requests, sampling parameters and statistics.
"""
from __future__ import annotations

from .requests import EngineStats, Request, RequestStats, SamplingParams
from .slots import SlotState
from .speculative import SCHEDULERS, SpeculativeEngine

__all__ = ["EngineStats", "Request", "RequestStats", "SCHEDULERS", "SamplingParams", "SlotState",
           "SpeculativeEngine"]

"""Requests as the engine takes them (token ids, sampling settings) and what it reports of them."""
from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass
class SamplingParams:
    """Per-request generation settings (temperature 0 = greedy)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def check(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")


def checked_prompt(prompt, params: SamplingParams, vocab_size: int) -> list[int]:
    """``prompt`` as a list of ints, once it and ``params`` are valid for a vocabulary of ``vocab_size`` ids
    (else ValueError naming what is wrong)."""
    params.check()
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("prompt is empty")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids must lie in [0, {vocab_size}), got {bad[0]}")
    bad = [t for t in params.stop_token_ids if not 0 <= int(t) < vocab_size]
    if bad:
        raise ValueError(f"stop_token_ids must lie in [0, {vocab_size}), got {bad[0]}")
    return prompt


@dataclasses.dataclass
class RequestStats:
    rounds: int = 0                 # decode steps the request took part in (prefill excluded)
    emitted: int = 0                # tokens emitted by those steps
    drafted_verified: int = 0       # drafts sent to verification
    attempts: list[int] = dataclasses.field(default_factory=list)  # per block position j: verified with all < j accepted
    accepts: list[int] = dataclasses.field(default_factory=list)   # ... and accepted

    @property
    def tau(self) -> float:
        """Mean tokens per decode step, bonus/correction token included."""
        return self.emitted / self.rounds if self.rounds else 0.0


@dataclasses.dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    output: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stats: RequestStats = dataclasses.field(default_factory=RequestStats)
    prefill_slots: torch.Tensor | None = None   # KV slots of the prompt between admission and prefill
    drafter_slots: torch.Tensor | None = None   # ... in the drafting strategy's cache (None: it has none)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class EngineStats:
    steps: int = 0
    drafting_steps: int = 0         # decode steps that drafted (the others decoded plainly, see draft_max_batch)
    prefill_s: float = 0.0
    draft_s: float = 0.0            # phase times: measured on CPU only (on CUDA the host merely launches work)
    schedule_s: float = 0.0
    verify_s: float = 0.0
    decode_s: float = 0.0           # wall time of decode steps (launch, results, bookkeeping)
    verify_tokens: int = 0          # verify rows scheduled in decode steps (anchor + scheduled drafts)
    emitted: int = 0
    attempts: list[int] = dataclasses.field(default_factory=list)
    accepts: list[int] = dataclasses.field(default_factory=list)

    def summary(self) -> dict:
        rounds = max(self.steps, 1)
        return {
            "decode_tokens_per_s": self.emitted / self.decode_s if self.decode_s else 0.0,
            "verify_tokens_per_step": self.verify_tokens / rounds,
            "drafting_steps": self.drafting_steps,
            "acceptance_by_position": [a / t if t else None for a, t in zip(self.accepts, self.attempts)],
            "time_s": {"prefill": self.prefill_s, "draft": self.draft_s, "schedule": self.schedule_s,
                       "verify": self.verify_s},
        }

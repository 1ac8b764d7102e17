"""Result collection: each launched step's packed results travel to the host and are applied to the requests.

A step returns one int32 row per request, ``tokens [G+1] | accepted | verified drafts`` (tokens past the
accepted ones are -1; accepted < 0 flags a row the device found invalid). The host copies it back
asynchronously on CUDA and reads it when asked (one step late there, so the host never waits for the step it
just launched); applying a row appends its tokens, cuts the output at a stop token or the budget, and counts
the acceptance per block position.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterator

import torch

from .requests import EngineStats, Request


@dataclasses.dataclass
class LaunchedStep:
    """A launched step's packed results on their way to the host: [B, G + 3] = tokens | accepted | verified."""

    requests: list[Request]
    host: torch.Tensor
    event: torch.cuda.Event | None
    decode: bool
    drafted: bool     # a decode step that drafted (else plain, or a prefill)


@dataclasses.dataclass
class AppliedStep:
    """What a drafting decode step achieved, summed over its requests (what draft_max_batch="auto" learns from)."""

    rows: int = 0
    emitted: int = 0
    verified: int = 0


class ResultQueue:
    """Launched steps whose results have not been applied yet, oldest first."""

    def __init__(self):
        self._steps: collections.deque[LaunchedStep] = collections.deque()

    def __bool__(self) -> bool:
        return bool(self._steps)

    def push(self, requests: list[Request], packed: torch.Tensor, *, decode: bool, drafted: bool = False) -> None:
        """Start copying a step's packed results to the host (asynchronously on CUDA)."""
        event = None
        if packed.device.type == "cuda":
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = packed.to("cpu", copy=True)   # a graph's output buffer is overwritten by its next replay
        self._steps.append(LaunchedStep(requests, host, event, decode, drafted))

    def ready(self, keep: int) -> Iterator[LaunchedStep]:
        """All but the last ``keep`` launched steps, in launch order, once their results are on the host."""
        while len(self._steps) > keep:
            step = self._steps.popleft()
            if step.event is not None:
                step.event.synchronize()
            yield step


def apply_step(step: LaunchedStep, stats: EngineStats, new: dict[int, list[int]],
               record: Callable[[Request, int, int], None]) -> AppliedStep:
    """Apply a step's rows to its requests (``record(request, verified, accepted)`` per decode row) and add the
    tokens each request gained to ``new``."""
    if step.decode:
        stats.steps += 1
        stats.drafting_steps += step.drafted
    applied = AppliedStep()
    for req, row in zip(step.requests, step.host.tolist()):
        if req.finished:  # ran one step past its end on the device: discarded
            continue
        *tokens, accepted, verified = row
        if accepted < 0:
            req.finish_reason = "error"   # the device flagged the row invalid (e.g. NaN logits)
            continue
        if step.decode:
            record(req, verified, accepted)
            stats.verify_tokens += verified + 1
            applied.rows, applied.emitted, applied.verified = (applied.rows + 1, applied.emitted + accepted + 1,
                                                               applied.verified + verified)
        before = len(req.output)
        req.output.extend(tokens[:accepted + 1])
        settle(req)  # may cut after a stop token or at the budget
        new.setdefault(req.id, []).extend(req.output[before:])
    return applied


def record_acceptance(req: Request, stats: EngineStats, verified: int, accepted: int) -> None:
    """Count a decode row in the request's and the engine's statistics."""
    st = req.stats
    st.rounds += 1
    st.emitted += accepted + 1
    stats.emitted += accepted + 1
    st.drafted_verified += verified
    for counts in (st.attempts, st.accepts, stats.attempts, stats.accepts):
        counts.extend([0] * (verified - len(counts)))
    for j in range(min(accepted + 1, verified)):  # position j was reached
        st.attempts[j] += 1
        stats.attempts[j] += 1
        if j < accepted:
            st.accepts[j] += 1
            stats.accepts[j] += 1


def settle(req: Request) -> None:
    """Cut the output at a stop token or the token budget and mark the request finished."""
    p = req.params
    for i, t in enumerate(req.output):
        if t in p.stop_token_ids:
            del req.output[i + 1:]
            req.finish_reason = "stop"
            break
    if len(req.output) >= p.max_new_tokens:
        del req.output[p.max_new_tokens:]
        req.finish_reason = req.finish_reason or "length"

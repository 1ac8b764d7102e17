"""The draft policy: whether a decode step drafts (``draft_max_batch``), and the step-cost model behind "auto".

The schedulers choose verify lengths after drafting, so they cannot save the drafter's own cost; at large
batches the target's step is compute-bound and drafting may not pay. ``draft_max_batch=N`` drafts only while
at most N requests run (their batch bucket under CUDA graphs). ``"auto"`` drafts when a drafting step is
expected to emit more tokens per second than a plain one: tau * plain_s > drafting_s, with the step costs from
a table of timed steps per batch size (``step_cost_table``), tau and the verified drafts from recent drafting
steps, and on CPU each kind of step's cost scaled by what such steps really took (the profile attends to no
context). It drafts once after a run of plain steps to keep measuring. Every choice uses past steps only, so
the output stays lossless.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

# draft_max_batch="auto" drafts once after a run of plain steps, since acceptance drifts with the text and a plain
# step measures none: after 16 plain steps, or more where a drafting step costs more, so that these drafting steps
# cost at most about 2% of the plain steps' time where drafting does not pay.
EXPLORE_MIN_PLAIN = 16
EXPLORE_OVERHEAD = 0.02
# Auto's running means (tau, verified drafts, step-cost scales): a plain mean over the first observations, then an
# exponential window of this many, since acceptance drifts with the text and costs with the context.
MEAN_WINDOW = 32


def mean_weight(observations: int) -> float:
    """Weight of the newest of ``observations`` in a running mean (see MEAN_WINDOW)."""
    return max(1 / observations, 1 / MEAN_WINDOW)


def check_draft_max_batch(draft_max_batch, has_drafter: bool) -> None:
    if draft_max_batch is not None and (not has_drafter or (
            draft_max_batch != "auto" and (not isinstance(draft_max_batch, int) or draft_max_batch < 1))):
        raise ValueError(f"draft_max_batch must be an int >= 1 or 'auto' and needs a drafter, "
                         f"got {draft_max_batch!r}")


def check_step_costs(table, max_batch: int) -> torch.Tensor:
    """``table`` as float64 on the host, or ValueError naming step_cost_table."""
    table = torch.as_tensor(table, dtype=torch.float64).cpu()
    if table.shape != (max_batch + 1, 2):
        raise ValueError(f"step_cost_table must be [max_batch + 1, 2] = [{max_batch + 1}, 2], "
                         f"got {list(table.shape)}")
    if not bool((table[1:] > 0).all()) or not bool(table.isfinite().all()):
        raise ValueError("step_cost_table must hold finite seconds > 0 in rows 1..max_batch")
    return table


def time_step_costs(run_step: Callable[[int, bool], object], max_batch: int, *, bucket: Callable[[int], int] | None,
                    sync: Callable[[], None], warmup: int, iters: int) -> torch.Tensor:
    """Median seconds of ``run_step(B, drafting)`` for a plain and a drafting step over B = 1..max_batch slots:
    [max_batch + 1, 2] float64, row B. With ``bucket`` (CUDA graphs) each bucket is timed and its rows share
    its figures."""
    table = torch.zeros(max_batch + 1, 2, dtype=torch.float64)
    for B in sorted({bucket(B) if bucket else B for B in range(1, max_batch + 1)}):
        for col, drafting in enumerate((False, True)):
            times = []
            for _ in range(warmup + iters):
                sync()
                t0 = time.perf_counter()
                run_step(B, drafting)
                sync()
                times.append(time.perf_counter() - t0)
            table[B, col] = sorted(times[warmup:])[iters // 2]
    if bucket:
        for B in range(1, max_batch + 1):
            table[B] = table[bucket(B)]
    return table


class DraftPolicy:
    """Whether the decode step over B slots drafts (module docstring).

    Args:
      draft_max_batch: None (always draft, if there is a drafter), an int N, or "auto".
      has_drafter: whether the engine has a drafting strategy at all.
      max_batch: the engine's slots (rows of ``step_cost_table``: 0..max_batch).
      fixed_shapes: steps forward every draft row whatever the verify lengths (CUDA graphs), so a profiled
        drafting step's cost includes them; eagerly the rows of the verified drafts are added from ``sps``.
      sps: steps/s of a verify batch of B tokens, index B (needed by "auto" when not ``fixed_shapes``).
      step_cost_table: [max_batch + 1, 2] seconds of a plain and of a drafting step (row B), used as it is;
        None under "auto": the engine profiles it at its first decode step (:meth:`set_profiled`).
    """

    def __init__(self, draft_max_batch: int | str | None, *, has_drafter: bool, max_batch: int, fixed_shapes: bool,
                 sps: list[float] | None = None, step_cost_table: torch.Tensor | None = None):
        check_draft_max_batch(draft_max_batch, has_drafter)
        if step_cost_table is not None and draft_max_batch != "auto":
            raise ValueError("step_cost_table is only used with draft_max_batch='auto'")
        self.draft_max_batch, self.has_drafter, self.max_batch = draft_max_batch, has_drafter, max_batch
        self.fixed_shapes, self.sps = fixed_shapes, sps
        self.step_cost_table = None if step_cost_table is None else check_step_costs(step_cost_table, max_batch)
        # What recent drafting steps achieved per request (tokens emitted, drafts verified), and how many plain
        # steps ran since the last drafting one.
        self.tau = self.verified = 0.0
        self.observed = self.plain_run = 0
        # With a profiled table on CPU, what real steps cost against it, per kind (plain, drafting): the profile
        # attends to no context and runs once, while attention over a growing context (more so with a drafting
        # step's extra rows) and other load on the machine change the costs, and not by the same factor.
        self.learn_costs = False
        self.cost_scale = [1.0, 1.0]
        self.cost_seen = [0, 0]

    @property
    def auto(self) -> bool:
        return self.draft_max_batch == "auto"

    @property
    def needs_profile(self) -> bool:
        """"auto" without a step-cost table yet."""
        return self.auto and self.step_cost_table is None

    def set_profiled(self, table: torch.Tensor, *, learn_costs: bool) -> None:
        """Use a profiled table, scaled by the measured step times when ``learn_costs`` (a CPU step's wall
        time is its cost; a CUDA step's host time is not)."""
        self.step_cost_table = check_step_costs(table, self.max_batch)
        self.learn_costs = learn_costs

    def choose(self, B: int) -> bool:
        """Whether the step about to run over B slots drafts; counts the plain steps in a row."""
        drafting = self.drafts(B)
        self.plain_run = 0 if drafting else self.plain_run + 1
        return drafting

    def drafts(self, B: int) -> bool:
        """Whether a step over B slots drafts (see ``draft_max_batch``)."""
        if self.draft_max_batch is None:
            return self.has_drafter
        if self.auto:
            return self.observed == 0 or self.plain_run >= self.explore_after(B) or self.drafting_pays(B)
        return B <= self.draft_max_batch

    def drafting_pays(self, B: int) -> bool:
        """A drafting step is worth its cost when tau * plain_s > drafting_s: the drafts it verifies
        emit tau tokens per request (recent drafting steps' mean) where a plain step emits one."""
        plain_s, drafting_s = self.step_costs(B)
        return self.tau * plain_s > drafting_s

    def explore_after(self, B: int) -> int:
        """Plain steps in a row after which the next one drafts to measure (see EXPLORE_OVERHEAD)."""
        plain_s, drafting_s = self.step_costs(B)
        return max(EXPLORE_MIN_PLAIN, math.ceil((drafting_s / plain_s - 1) / EXPLORE_OVERHEAD))

    def step_costs(self, B: int, *, scaled: bool = True) -> tuple[float, float]:
        """Expected seconds of a plain and of a drafting step over B slots.

        Under fixed shapes the profiled drafting step already verifies every draft row. Eagerly its
        profile verified the anchor alone (frozen slots), so the rows of ``verified`` drafts per request
        are added from the SPS table. ``scaled``: times what real steps cost against these (observe_cost)."""
        plain_s, drafting_s = self.step_cost_table[B].tolist()
        if not self.fixed_shapes:
            rows = min(round(B * (1 + self.verified)), len(self.sps) - 1)
            drafting_s += max(0.0, 1 / self.sps[rows] - 1 / self.sps[B])
        if not scaled:
            return plain_s, drafting_s
        return plain_s * self.cost_scale[0], drafting_s * self.cost_scale[1]

    def observe_cost(self, B: int, drafting: bool, seconds: float) -> None:
        """Fold a step's measured time into its kind's cost scale (a running mean, MEAN_WINDOW)."""
        k = int(drafting)
        expected = self.step_costs(B, scaled=False)[k]
        self.cost_seen[k] += 1
        self.cost_scale[k] += mean_weight(self.cost_seen[k]) * (seconds / expected - self.cost_scale[k])

    def observe(self, tau: float, verified: float) -> None:
        """Fold a drafting step's per-request tokens and verified drafts into the running means (MEAN_WINDOW)."""
        self.observed += 1
        w = mean_weight(self.observed)
        self.tau += w * (tau - self.tau)
        self.verified += w * (verified - self.verified)

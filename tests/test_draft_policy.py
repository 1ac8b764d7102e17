"""The draft policy (dspark_ops.engine.draft_policy): draft_max_batch="auto"'s rule and step-cost model by
hand, the step-cost profile, and the engine under the policy (greedy output always equals plain decoding)."""
from __future__ import annotations

import time

import pytest
import torch

from dspark_ops.engine import SamplingParams, SpeculativeEngine
from dspark_ops.engine.draft_policy import DraftPolicy, time_step_costs
from randomness import fresh_seed
from test_engine import eagle_drafter, plain_greedy, random_drafter, tiny_target


def _costs(max_batch: int, plain: float, drafting) -> torch.Tensor:
    """A step_cost_table: ``plain`` seconds for a plain step, drafting(B) for a drafting one."""
    table = torch.zeros(max_batch + 1, 2, dtype=torch.float64)
    for B in range(1, max_batch + 1):
        table[B] = torch.tensor([plain, drafting(B)])
    return table


def _auto(max_batch: int, table: torch.Tensor, sps=None) -> DraftPolicy:
    return DraftPolicy("auto", has_drafter=True, max_batch=max_batch, fixed_shapes=False,
                       sps=[0.0] + [100.0] * 40 if sps is None else sps, step_cost_table=table)


def test_auto_weighs_the_step_costs_against_recent_acceptance():
    """The rule by hand: draft when tau * plain_s > drafting_s (+ the SPS cost of the verified draft rows
    when steps run eagerly); tau and the verified drafts are plain means over the first drafting steps,
    then a 32-step exponential window. Before any drafting step, and after a run of plain steps (16, or as
    many as keep those drafting steps within 2% of the plain time), the policy drafts to measure."""
    policy = _auto(4, _costs(4, 1.0, lambda B: 2.0))   # SPS 100 everywhere: verify rows cost nothing extra
    assert policy.drafts(4) and not policy.drafting_pays(4)     # nothing measured yet
    policy.observe(3.0, 4.0)
    policy.observe(2.5, 4.0)
    assert policy.tau == pytest.approx(2.75) and policy.drafts(1)
    policy.observe(0.5, 4.0)        # (3 + 2.5 + 0.5) / 3 = 2: no longer more than the drafting step's 2 s
    assert policy.tau == pytest.approx(2.0) and not policy.drafts(1)
    policy.plain_run = 49           # a drafting step costs 1 s more than a plain one: once per 50 plain steps
    assert not policy.drafts(1)
    policy.plain_run = 50
    assert policy.drafts(1)
    policy.step_cost_table = _costs(4, 1.0, lambda B: 1.1)
    assert policy.explore_after(1) == 16 and policy.drafts(1)
    policy.step_cost_table = _costs(4, 1.0, lambda B: 2.0)
    for _ in range(200):             # the window forgets the first observations
        policy.observe(3.0, 1.0)
    assert policy.tau == pytest.approx(3.0, rel=1e-2) and policy.verified == pytest.approx(1.0, rel=1e-2)
    assert policy.drafting_pays(4)
    # Eagerly, 4 * (1 + 1) verify rows at SPS 0.5 cost 1.99 s more than 4 rows at SPS 100: 3 * 1 < 2 + 1.99
    policy.sps = [0.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 0.5, 0.5]
    assert not policy.drafting_pays(4) and policy.drafting_pays(1)   # 1 * (1 + 1) = 2 rows: SPS 100
    policy.fixed_shapes = True      # the profiled drafting step verified every row already
    assert policy.drafting_pays(4)


def test_auto_scales_a_profiled_table_by_the_measured_step_times():
    """By hand: each kind of step's measured seconds over the table's (plus the verified rows' SPS cost)
    is a running mean (plain over the first steps, then a 32-step window) that scales that kind's cost."""
    policy = _auto(4, _costs(4, 1.0, lambda B: 2.0))
    policy.observe(1.5, 1.0)
    assert policy.step_costs(2) == (1.0, 2.0) and not policy.drafting_pays(2)
    policy.observe_cost(2, False, 2.0)
    policy.observe_cost(2, False, 4.0)       # plain steps run 3x the table
    policy.observe_cost(2, True, 4.0)        # drafting steps 2x
    assert policy.step_costs(2) == pytest.approx((3.0, 4.0)) and policy.step_costs(2, scaled=False) == (1.0, 2.0)
    assert policy.drafting_pays(2)           # 1.5 * 3 > 4, where the table alone said 1.5 * 1 < 2
    assert policy.explore_after(2) == 17     # (4 / 3 - 1) / 2%
    for _ in range(200):                     # the window forgets: drafting steps now cost 4x the table
        policy.observe_cost(2, True, 8.0)
    assert policy.cost_scale[1] == pytest.approx(4.0, rel=1e-2) and not policy.drafting_pays(2)


def test_fixed_and_unset_draft_max_batch_and_the_plain_run():
    """None drafts whenever there is a drafter; N drafts up to N slots; choose() counts the plain steps in a
    row (what "auto" explores after) and resets at a drafting step. Bad settings raise, naming them."""
    assert DraftPolicy(None, has_drafter=True, max_batch=8, fixed_shapes=False).drafts(8)
    assert not DraftPolicy(None, has_drafter=False, max_batch=8, fixed_shapes=False).drafts(1)
    policy = DraftPolicy(2, has_drafter=True, max_batch=8, fixed_shapes=False)
    assert [policy.choose(B) for B in (1, 2, 3, 8, 4, 2)] == [True, True, False, False, False, True]
    assert policy.plain_run == 0
    policy.choose(3)
    assert policy.plain_run == 1 and not policy.needs_profile
    assert _auto(2, None).needs_profile and not _auto(2, _costs(2, 1.0, lambda B: 1.0)).needs_profile
    for bad, has_drafter in ((0, True), ("always", True), (2.5, True), ("auto", False), (2, False)):
        with pytest.raises(ValueError, match="draft_max_batch"):
            DraftPolicy(bad, has_drafter=has_drafter, max_batch=8, fixed_shapes=False)
    with pytest.raises(ValueError, match="step_cost_table"):
        DraftPolicy(2, has_drafter=True, max_batch=2, fixed_shapes=False, step_cost_table=_costs(2, 1.0, lambda B: 1))
    for bad in (_costs(4, 1.0, lambda B: 1.0), _costs(2, 1.0, lambda B: float("nan")), _costs(2, 0.0, lambda B: 1)):
        with pytest.raises(ValueError, match="step_cost_table"):
            _auto(2, bad)


def test_time_step_costs_times_each_bucket_and_shares_its_rows():
    """Every (batch size, plain / drafting) runs warmup + iters times and its row holds the median of the
    timed runs; with buckets only the buckets run, and every batch size takes its bucket's row."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    cost = {(B, d): float(torch.rand((), generator=gen)) * 1e-3 for B in range(1, 6) for d in (False, True)}
    calls = []

    def run_step(B, drafting):
        calls.append((B, drafting))
        warmup = len(calls) % 4 == 1   # the first of each four runs: a slow warm-up, never in the median
        busy = time.perf_counter() + (0.03 if warmup else cost[B, drafting])
        while time.perf_counter() < busy:
            pass

    table = time_step_costs(run_step, 5, bucket=None, sync=lambda: None, warmup=1, iters=3)
    assert calls == [(B, d) for B in range(1, 6) for d in (False, True) for _ in range(4)]
    for (B, d), seconds in cost.items():
        assert seconds <= table[B, int(d)] < seconds + 0.015, f"seed {seed}: {B, d}"
    calls.clear()
    bucketed = time_step_costs(run_step, 5, bucket=lambda B: min(5, 1 << (B - 1).bit_length()),
                               sync=lambda: None, warmup=1, iters=3)
    assert sorted({B for B, _ in calls}) == [1, 2, 4, 5]
    assert torch.equal(bucketed[3], bucketed[4]) and bucketed.shape == (6, 2)


def test_auto_draft_max_batch_learns_what_its_steps_cost_on_cpu():
    """A profiled table that understates both steps, the drafting one ten times more (as a profile at no
    context understates steps over a long one), is corrected by the steps' measured times: a random
    drafter then drafts only to keep measuring, and the greedy output equals plain decoding. A table
    passed in is used as it is (reproducible choices)."""
    seed = fresh_seed()
    target = tiny_target(seed)
    drafter = random_drafter(target, seed, rank=4, confidence=True, block=4)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 95, (n,), generator=gen).tolist() for n in (6, 11)]
    misleading = _costs(2, 1e-6, lambda B: 1e-7)
    learning = SpeculativeEngine(target, drafter, max_batch=2, max_tokens=512, draft_max_batch="auto",
                                 sps_table=torch.tensor([0.0] + [100.0] * 40))
    learning.profile_step_costs = lambda: misleading.clone()
    assert learning.generate(prompts, 100) == [plain_greedy(target, p, 100) for p in prompts], f"seed {seed}"
    assert learning.policy.learn_costs and min(learning.policy.cost_seen) > 0 and min(learning.policy.cost_scale) > 10
    assert learning.stats.drafting_steps <= learning.stats.steps // 8, f"seed {seed}: {learning.stats}"
    fixed = SpeculativeEngine(target, drafter, max_batch=2, max_tokens=512, draft_max_batch="auto",
                              sps_table=torch.tensor([0.0] + [100.0] * 40), step_cost_table=misleading)
    fixed.generate(prompts, 20)
    assert not fixed.policy.learn_costs and fixed.policy.cost_scale == [1.0, 1.0]
    assert fixed.stats.drafting_steps == fixed.stats.steps


@pytest.mark.parametrize("kind", ["eagle", "dspark_sync"])
def test_auto_draft_max_batch_stops_drafting_once_acceptance_does_not_pay(kind):
    """With drafting steps costing twice a plain one, a random drafter (tokens per step well under 2) drafts in
    the first step, then decodes plainly except for one drafting step after every 50 plain ones (it keeps
    measuring at 2% of the plain time); greedy output equals plain decoding."""
    seed = fresh_seed()
    target = tiny_target(seed)
    if kind == "eagle":
        drafter, scheduler = eagle_drafter(target, seed, block=4), "fixed"
    else:
        drafter, scheduler = random_drafter(target, seed, rank=4, confidence=True, block=4), "sync"
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 95, (n,), generator=gen).tolist() for n in (7, 12, 3)]
    engine = SpeculativeEngine(target, drafter, scheduler=scheduler, max_batch=3, max_tokens=256,
                               sps_table=torch.tensor([0.0] + [100.0] * 40), draft_max_batch="auto",
                               step_cost_table=_costs(3, 1.0, lambda B: 2.0))
    launched, launch = [], engine._run_step

    def recording(B, drafting):
        launched.append(drafting)
        return launch(B, drafting)

    engine._run_step = recording
    out = engine.generate(prompts, max_new_tokens=120)
    assert out == [plain_greedy(target, p, 120) for p in prompts], f"seed {seed}"
    plain_runs = [len(r) for r in "".join("d" if d else "p" for d in launched).split("d")]
    assert launched[0] and max(plain_runs) <= 50 and 50 in plain_runs[:-1], f"seed {seed}: {launched}"
    assert engine.stats.drafting_steps == sum(launched) <= len(launched) // 8, f"seed {seed}: {launched}"


def test_auto_draft_max_batch_profiles_the_step_costs_without_a_trace():
    """The profile (at the first decode step) times plain and drafting steps for every batch size on frozen
    slots; it changes neither the slots nor the tokens: an engine profiled again in mid-run gives the same
    sampled output as one that was not. Bad arguments are refused."""
    seed = fresh_seed()
    target = tiny_target(seed)
    drafter = random_drafter(target, seed, rank=4, confidence=True, block=4)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 95, (n,), generator=gen).tolist() for n in (5, 9)]
    profiled = SpeculativeEngine(target, drafter, max_batch=2, max_tokens=256, draft_max_batch="auto")
    assert profiled.step_cost_table is None
    assert profiled.generate(prompts, 12) == [plain_greedy(target, p, 12) for p in prompts], f"seed {seed}"
    table = profiled.step_cost_table
    assert table.shape == (3, 2) and bool((table[1:] > 0).all()) and bool(table.isfinite().all())

    def run(profile_midway: bool):
        engine = SpeculativeEngine(target, drafter, max_batch=2, max_tokens=256, draft_max_batch="auto",
                                   sps_table=torch.tensor([0.0] + [100.0] * 40),
                                   step_cost_table=_costs(2, 1.0, lambda B: 1e-3))   # always drafts
        ids = [engine.add_request(p, SamplingParams(max_new_tokens=16, temperature=1.0, seed=3 + i))
               for i, p in enumerate(prompts)]
        engine.step()
        engine.step()
        if profile_midway:
            before = engine.slots.snapshot()
            engine.profile_step_costs()
            assert all(torch.equal(before[k], v) for k, v in engine.slots.snapshot().items())
        while engine.has_work:
            engine.step()
        return [engine.finished[i].output for i in ids], engine.stats.drafting_steps

    assert run(True) == run(False), f"seed {seed}"
    for bad in (0, "always", 2.5):
        with pytest.raises(ValueError, match="draft_max_batch"):
            SpeculativeEngine(target, drafter, draft_max_batch=bad)
    with pytest.raises(ValueError, match="draft_max_batch"):
        SpeculativeEngine(target, None, draft_max_batch="auto")
    with pytest.raises(ValueError, match="step_cost_table"):
        SpeculativeEngine(target, drafter, step_cost_table=_costs(8, 1.0, lambda B: 1.0))
    for bad in (_costs(4, 1.0, lambda B: 1.0), _costs(8, 1.0, lambda B: float("nan")), _costs(8, 0.0, lambda B: 1)):
        with pytest.raises(ValueError, match="step_cost_table"):
            SpeculativeEngine(target, drafter, draft_max_batch="auto", step_cost_table=bad,
                              sps_table=torch.tensor([0.0] + [100.0] * 80))



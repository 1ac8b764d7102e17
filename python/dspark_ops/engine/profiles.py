"""The engine's profiles: the target's steps/s per verify batch (the SPS table the confidence schedulers and
the draft policy read) and the seconds of a plain and of a drafting decode step per batch size (the draft
policy's step-cost table)."""
from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import torch

from .. import profile_sps
from ..models.attention import PagedAttention
from .draft_policy import check_step_costs, time_step_costs

if TYPE_CHECKING:
    from .speculative import SpeculativeEngine


@torch.no_grad()
def verify_sps(engine: "SpeculativeEngine", *, context: int, warmup: int, iters: int) -> torch.Tensor:
    """Target steps/s for verify batches of B = 0..max_batch*(G+1) tokens (blocks of G+1 over dummy requests
    of ``context`` tokens, in the engine's target cache; their pages go back afterwards)."""
    G1 = engine.block_size + 1
    cache, dev = engine.target_cache, engine.device
    dummy = [-(i + 1) for i in range(engine.max_batch)]
    cache.reserve_batch(dummy, [context] * engine.max_batch)

    def step(B: int):
        counts = [min(G1, B - i * G1) for i in range(math.ceil(B / G1))]
        reqs = dummy[:len(counts)]
        slots = cache.reserve_batch(reqs, counts)
        cu = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32, device=dev)
        positions = torch.cat([context + torch.arange(c, device=dev) for c in counts])
        backend = PagedAttention(cache.layer_caches(), slot_mapping=slots, page_table=cache.page_table(reqs),
                                 seq_lens=cache.seq_lens(reqs), cu_q_lens=cu, causal=True)
        engine.target(torch.zeros(B, dtype=torch.long, device=dev), positions, kv=backend,
                      hidden_layers=engine.hidden_layers)
        cache.rollback(reqs, [0] * len(reqs))

    try:
        return profile_sps(step, engine.max_batch * G1, device=dev, warmup=warmup, iters=iters)
    finally:
        for r in dummy:
            cache.free(r)


@torch.no_grad()
def step_costs(engine: "SpeculativeEngine", *, warmup: int, iters: int) -> torch.Tensor:
    """Seconds of a plain and of a drafting decode step over B = 1..max_batch slots: [max_batch + 1, 2]
    float64, row B (under CUDA graphs each bucket is timed and its rows share its figures).

    The steps run on frozen slots (every slot made padding, restored afterwards), so they cost what a
    real step does except that they verify the anchor alone when run eagerly (the draft policy adds the
    verify rows from the SPS table) and attend to no context (on CPU the policy scales them by what the
    engine's steps measure). The slot state and the phase timers are left as they were."""
    if engine.drafter is None:
        raise ValueError("profile_step_costs needs a drafter")
    if not engine._pad_pages:
        raise RuntimeError("the engine reserved no padding pages (draft_max_batch='auto' or cuda_graphs)")
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    saved = engine.slots.snapshot()
    timers = {k: getattr(engine.stats, k) for k in ("draft_s", "schedule_s", "verify_s")}
    engine.slots.freeze(0, engine._pad_pages)
    try:
        table = time_step_costs(engine._run_step, engine.max_batch,
                                bucket=engine._bucket if engine.cuda_graphs else None,
                                sync=sync, warmup=warmup, iters=iters)
    finally:
        engine.slots.restore(saved)
        for k, v in timers.items():
            setattr(engine.stats, k, v)
    return check_step_costs(table, engine.max_batch)

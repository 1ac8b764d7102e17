"""``dspark calibrate``: Sequential Temperature Scaling of a trained drafter's confidence head.

The held-out outcomes come from the engine itself: the drafter drafts full
blocks on held-out prompts, the target verifies every draft ("fixed"
scheduler), and each decode step records the confidences the scheduler would
have seen (raw, temperatures off) together with how many drafts were
accepted. STS (:func:`dspark_ops.calibrate.sequential_temperature_scaling`)
then fits one temperature per block position, stored in the drafter's
config.json as ``confidence_temperatures`` (read by the engine).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from ..calibrate import calibration_report, sequential_temperature_scaling
from ..engine import SpeculativeEngine
from ..models.drafter import DSparkDrafter


class _RecordingEngine(SpeculativeEngine):
    """A SpeculativeEngine that keeps (confidence logits, accepted prefix) of every full verified block."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records: list[tuple[torch.Tensor, int]] = []
        self._pending: torch.Tensor | None = None
        self._row = 0

    def _draft(self, *args):
        drafts, probs, confidence = super()._draft(*args)
        self._pending, self._row = confidence.detach().double().cpu(), 0
        return drafts, probs, confidence

    def _record(self, req, verified: int, accepted: int) -> None:
        super()._record(req, verified, accepted)
        if self._pending is None:
            return
        conf = self._pending[self._row]
        self._row += 1
        if verified == self.block_size:     # blocks cut by the token budget have no outcome for their tail
            self.records.append((torch.logit(conf, eps=1e-7), accepted))


@torch.no_grad()
def collect_confidence(drafter: DSparkDrafter, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                       temperature: float = 1.0, seed: int = 0, max_batch: int = 8,
                       stop_token_ids: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(conf_logits [N, G], accepted [N, G] bool) of the engine's decode steps on ``prompts``.

    accepted[n, k]: drafts 1..k+1 of block n were all accepted.
    """
    if drafter.confidence_head is None:
        raise ValueError("this drafter has no confidence head to calibrate")
    if not prompts:
        raise ValueError("no held-out prompts to calibrate on")
    saved = drafter.config.confidence_temperatures
    drafter.config.confidence_temperatures = None          # raw confidences
    # The engine packs both models' projections for inference; restore them afterwards (training needs autograd).
    saved_linear = drafter.target.linear_impl.fn, drafter.linear_impl.fn
    try:
        need = max(len(p) for p in prompts) + max_new_tokens + drafter.config.block_size + 16
        engine = _RecordingEngine(drafter.target, drafter, max_batch=max_batch, max_tokens=max_batch * need)
        engine.generate(prompts, max_new_tokens, temperature=temperature, seed=seed, stop_token_ids=stop_token_ids)
    finally:
        drafter.config.confidence_temperatures = saved
        drafter.target.set_linear_impl(saved_linear[0])
        drafter.set_linear_impl(saved_linear[1])
    if not engine.records:
        raise ValueError("no full draft block was verified: give longer generations or more prompts")
    G = engine.block_size
    logits = torch.stack([r[0] for r in engine.records])
    accepted = torch.tensor([r[1] for r in engine.records]).unsqueeze(1) > torch.arange(G)
    return logits, accepted


def calibrate_drafter(drafter_dir, drafter: DSparkDrafter, prompts: Sequence[Sequence[int]], *,
                      num_bins: int = 15, write: bool = True, **collect_kwargs) -> dict:
    """Fit STS on the engine's held-out outcomes and store the temperatures in ``drafter_dir``/config.json.

    Returns the calibration report (ECE of the prefix survival per position
    before and after) with ``"temperatures"`` and ``"num_blocks"``.
    """
    logits, accepted = collect_confidence(drafter, prompts, **collect_kwargs)
    temps = sequential_temperature_scaling(logits, accepted, num_bins=num_bins)
    report = calibration_report(logits, accepted, temps, num_bins=num_bins)
    report.update(temperatures=[round(float(t), 6) for t in temps], num_blocks=int(logits.shape[0]),
                  acceptance_by_position=[float(a) for a in accepted.float().mean(0)])
    if write:
        file = Path(drafter_dir) / "config.json"
        cfg = json.loads(file.read_text())
        G = cfg["block_size"]
        # Positions past the calibrated block length (a shorter engine block) keep temperature 1.
        cfg["confidence_temperatures"] = report["temperatures"] + [1.0] * (G - len(report["temperatures"]))
        file.write_text(json.dumps(cfg, indent=2))
        drafter.config.confidence_temperatures = cfg["confidence_temperatures"]
    return report

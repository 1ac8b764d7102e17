"""``dspark calibrate``: sequential calibration of a trained drafter's confidence head.

The held-out outcomes come from the engine itself: the drafter drafts full
blocks on held-out prompts, the target verifies every draft ("fixed"
scheduler), and each decode step records the confidences the scheduler would
have seen (raw, calibration off) together with how many drafts were
accepted. :func:`dspark_ops.calibrate.sequential_calibration` then fits one
temperature (STS) and, by default, one offset per block position, stored in
the drafter's config.json as ``confidence_temperatures`` /
``confidence_offsets`` (read by the engine).

The ECE after calibration is also measured out of sample: fitted on one half
of the prompts and measured on the other (both ways, averaged), because a fit
scored on its own data looks better than it is. Each figure comes with its
sampling floor (:func:`dspark_ops.calibrate.ece_floor`): the binned ECE of a
few thousand blocks is a few % even for a perfect head.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from ..calibrate import calibration_report, sequential_calibration
from ..drafter_format import EXTRAS_KEY
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
    cfg = drafter.config
    saved = cfg.confidence_temperatures, cfg.confidence_offsets
    cfg.confidence_temperatures = cfg.confidence_offsets = None          # raw confidences
    # The engine packs both models' projections for inference; restore them afterwards (training needs autograd).
    saved_linear = drafter.target.linear_impl.fn, drafter.linear_impl.fn
    try:
        need = max(len(p) for p in prompts) + max_new_tokens + drafter.config.block_size + 16
        engine = _RecordingEngine(drafter.target, drafter, max_batch=max_batch, max_tokens=max_batch * need)
        engine.generate(prompts, max_new_tokens, temperature=temperature, seed=seed, stop_token_ids=stop_token_ids)
    finally:
        cfg.confidence_temperatures, cfg.confidence_offsets = saved
        drafter.target.set_linear_impl(saved_linear[0])
        drafter.set_linear_impl(saved_linear[1])
    if not engine.records:
        raise ValueError("no full draft block was verified: give longer generations or more prompts")
    G = engine.block_size
    logits = torch.stack([r[0] for r in engine.records])
    accepted = torch.tensor([r[1] for r in engine.records]).unsqueeze(1) > torch.arange(G)
    return logits, accepted


def calibrate_drafter(drafter_dir, drafter: DSparkDrafter, prompts: Sequence[Sequence[int]], *, offsets: bool = True,
                      num_bins: int = 15, write: bool = True, **collect_kwargs) -> dict:
    """Fit the calibration on the engine's held-out outcomes and store it in ``drafter_dir``/config.json.

    ``offsets=False`` fits temperatures only (the paper's STS). Returns the
    calibration report (ECE of the prefix survival per position: raw, after
    the fit on all prompts, and out of sample) with ``"temperatures"``,
    ``"offsets"`` and ``"num_blocks"``.
    """
    if len(prompts) < 2:
        raise ValueError("calibration needs at least 2 held-out prompts (the out-of-sample ECE splits them)")
    halves = [collect_confidence(drafter, prompts[h::2], **collect_kwargs) for h in (0, 1)]
    offset_grid = None if offsets else [0.0]

    def fit(logits, accepted):
        return sequential_calibration(logits, accepted, offset_grid=offset_grid, num_bins=num_bins)

    out_of_sample = []
    for fit_half, test_half in ((0, 1), (1, 0)):
        temps, offs = fit(*halves[fit_half])
        out_of_sample.append(calibration_report(*halves[test_half], temps, offs, num_bins=num_bins))
    logits = torch.cat([h[0] for h in halves])
    accepted = torch.cat([h[1] for h in halves])
    temps, offs = fit(logits, accepted)
    report = calibration_report(logits, accepted, temps, offs, num_bins=num_bins)
    for key, name in (("ece_after", "ece_out_of_sample"), ("ece_floor", "ece_floor_out_of_sample")):
        both = [(a + b) / 2 for a, b in zip(*(r[key] for r in out_of_sample))]  # the two held-out halves
        report[name], report["mean_" + name] = both, sum(both) / len(both)
    report.update(temperatures=[round(float(t), 6) for t in temps],
                  offsets=[round(float(o), 6) for o in offs] if offsets else None,
                  num_blocks=int(logits.shape[0]), acceptance_by_position=[float(a) for a in accepted.float().mean(0)])
    if write:
        file = Path(drafter_dir) / "config.json"
        cfg = json.loads(file.read_text())
        G = cfg["block_size"]
        # Positions past the calibrated block length (a shorter engine block) keep temperature 1, offset 0.
        # The standard layout keeps our keys under drafter_format.EXTRAS_KEY, our earlier one flat.
        ours = cfg.setdefault(EXTRAS_KEY, {}) if EXTRAS_KEY in cfg or "dflash_config" in cfg else cfg
        ours["confidence_temperatures"] = report["temperatures"] + [1.0] * (G - len(temps))
        ours.pop("confidence_offsets", None)
        if offsets:
            ours["confidence_offsets"] = report["offsets"] + [0.0] * (G - len(offs))
        file.write_text(json.dumps(cfg, indent=2))
        drafter.config.confidence_temperatures = ours["confidence_temperatures"]
        drafter.config.confidence_offsets = ours.get("confidence_offsets")
    return report

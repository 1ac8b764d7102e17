"""Drafter training losses (DSPARK.md section 2).

All terms take per-position values over blocks [N, G] and average them with
position weights w_k = exp(-(k-1)/G) (k = 1..G) over the valid positions:
``sum(w * valid * term) / sum(w * valid)``. The distributions are computed in
float32 whatever the logits' dtype.

- CE: -log p_d(x*_k), the ground-truth next token (teacher forcing);
- TV: ||p_d - p_t||_1 (the L1 distance, twice the total variation);
- confidence: BCE(sigmoid(c_k), c*_k) with the soft label
  c*_k = 1 - 0.5 ||p_d - p_t||_1 = sum_v min(p_d(v), p_t(v)), the exact
  probability that speculative sampling accepts a token drawn from p_d when
  verifying against p_t (no gradient flows through the label);
- soft CE (EAGLE-3-style baseline): -sum_v p_t(v) log p_d(v).

Over a draft vocabulary (``target_lse`` given) both logits cover only the K
drawable ids: the drafter's distribution is renormalised over them, as the
engine samples it, while the target's stays normalised over every id (its
log-sum-exp over the full vocabulary comes with the logits), so
``||p_d - p_t||_1 = sum_K |p_d - p_t| + (target mass outside K)`` and every
term above is the exact inference-time quantity. Labels outside K are -1 and
drop out of the CE (no draft can propose them); they still count in the TV.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    ce: float = 0.1
    tv: float = 0.9
    conf: float = 1.0
    soft_ce: float = 0.0


DSPARK_WEIGHTS = LossWeights(0.1, 0.9, 1.0, 0.0)
DSPARK_KL_WEIGHTS = LossWeights(0.1, 0.0, 1.0, 0.9)   # the forward KL (soft CE) in place of the L1 term
DFLASH_WEIGHTS = LossWeights(1.0, 0.0, 0.0, 0.0)
EAGLE3_WEIGHTS = LossWeights(0.0, 0.0, 0.0, 1.0)


def position_weights(block_size: int, device=None) -> torch.Tensor:
    """w_k = exp(-(k-1)/G) for k = 1..G, [G] float32."""
    return torch.exp(-torch.arange(block_size, dtype=torch.float32, device=device) / block_size)


def soft_acceptance(draft_probs: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """1 - 0.5 ||p_d - p_t||_1 over the last dim: the acceptance probability of speculative sampling."""
    return 1.0 - 0.5 * (draft_probs - target_probs).abs().sum(-1)


def _weighted_mean(term: torch.Tensor, weight: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    return (term * weight).sum() / total.clamp_min(1e-12)


def drafter_losses(draft_logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor,
                   valid: torch.Tensor, weights: LossWeights, conf_logits: torch.Tensor | None = None,
                   target_lse: torch.Tensor | None = None,
                   total_weights: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Loss terms and their weighted sum ``"loss"``.

    draft_logits, target_logits [N, G, V]; labels [N, G] (ground-truth next
    tokens); valid [N, G] bool (label inside the sequence); conf_logits [N, G]
    pre-sigmoid confidences (needed when ``weights.conf`` > 0); target_lse
    [N, G]: the target's log-sum-exp over its whole vocabulary when the logits
    cover a draft vocabulary only (labels then index it, -1 outside). Also returns
    ``"accept"`` [G]: the mean soft acceptance per position (a training-time
    estimate of the per-position acceptance rate, no gradient).

    Each term is a weighted mean over valid positions. ``total_weights`` maps
    this batch's weight sums [CE's, the other terms'] to the sums to divide
    by: under data parallelism, the sums over every rank's share of the global
    batch, so that the ranks' terms add up to the global batch's.
    """
    if draft_logits.shape != target_logits.shape or draft_logits.dim() != 3:
        raise ValueError(f"draft_logits {list(draft_logits.shape)} and target_logits {list(target_logits.shape)} "
                         f"must both be [N, G, V]")
    if labels.shape != draft_logits.shape[:2] or valid.shape != labels.shape:
        raise ValueError(f"labels and valid must be [N, G] = {list(draft_logits.shape[:2])}")
    if weights.conf > 0 and (conf_logits is None or conf_logits.shape != labels.shape):
        raise ValueError("the confidence loss needs conf_logits of shape [N, G]")
    if target_lse is not None and target_lse.shape != labels.shape:
        raise ValueError(f"target_lse must be [N, G] = {list(labels.shape)}, got {list(target_lse.shape)}")
    G = labels.shape[1]
    pw = position_weights(G, labels.device)
    w = pw * valid.float()
    logp_d = F.log_softmax(draft_logits.float(), dim=-1)
    if target_lse is None:
        p_t, outside = F.softmax(target_logits.float(), dim=-1), 0.0
    else:
        p_t = (target_logits.float() - target_lse.float().unsqueeze(-1)).exp()
        outside = (1.0 - p_t.sum(-1)).clamp_min(0.0)      # target mass the draft vocabulary cannot propose
    zero = logp_d.new_zeros(())
    out = {}
    drawable = valid & (labels >= 0)
    safe_labels = torch.where(drawable, labels, torch.zeros_like(labels))
    w_ce = pw * drawable.float()
    totals = torch.stack((w_ce.sum(), w.sum())).detach()
    ce_total, total = total_weights(totals) if total_weights is not None else totals
    out["ce"] = _weighted_mean(-logp_d.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1), w_ce, ce_total)
    need_tv = weights.tv > 0 or weights.conf > 0
    l1 = (logp_d.exp() - p_t).abs().sum(-1) + outside if need_tv else None
    out["tv"] = _weighted_mean(l1, w, total) if need_tv else zero
    if weights.conf > 0:
        label = (1.0 - 0.5 * l1).detach().clamp(0.0, 1.0)
        bce = F.binary_cross_entropy_with_logits(conf_logits.float(), label, reduction="none")
        out["conf"] = _weighted_mean(bce, w, total)
    else:
        out["conf"] = zero
    out["soft_ce"] = _weighted_mean(-(p_t * logp_d).sum(-1), w, total) if weights.soft_ce > 0 else zero
    out["loss"] = (weights.ce * out["ce"] + weights.tv * out["tv"] + weights.conf * out["conf"]
                   + weights.soft_ce * out["soft_ce"])
    with torch.no_grad():
        acc = l1 if l1 is not None else (logp_d.exp() - p_t).abs().sum(-1) + outside
        acc = 1.0 - 0.5 * acc
        vf = valid.float()
        out["accept"] = (acc * vf).sum(0) / vf.sum(0).clamp_min(1.0)
    return out

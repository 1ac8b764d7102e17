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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    ce: float = 0.1
    tv: float = 0.9
    conf: float = 1.0
    soft_ce: float = 0.0


DSPARK_WEIGHTS = LossWeights(0.1, 0.9, 1.0, 0.0)
DFLASH_WEIGHTS = LossWeights(1.0, 0.0, 0.0, 0.0)
EAGLE3_WEIGHTS = LossWeights(0.0, 0.0, 0.0, 1.0)


def position_weights(block_size: int, device=None) -> torch.Tensor:
    """w_k = exp(-(k-1)/G) for k = 1..G, [G] float32."""
    return torch.exp(-torch.arange(block_size, dtype=torch.float32, device=device) / block_size)


def soft_acceptance(draft_probs: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """1 - 0.5 ||p_d - p_t||_1 over the last dim: the acceptance probability of speculative sampling."""
    return 1.0 - 0.5 * (draft_probs - target_probs).abs().sum(-1)


def _weighted_mean(term: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (term * weight).sum() / weight.sum().clamp_min(1e-12)


def drafter_losses(draft_logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor,
                   valid: torch.Tensor, weights: LossWeights, conf_logits: torch.Tensor | None = None
                   ) -> dict[str, torch.Tensor]:
    """Loss terms and their weighted sum ``"loss"``.

    draft_logits, target_logits [N, G, V]; labels [N, G] (ground-truth next
    tokens); valid [N, G] bool (label inside the sequence); conf_logits [N, G]
    pre-sigmoid confidences (needed when ``weights.conf`` > 0). Also returns
    ``"accept"`` [G]: the mean soft acceptance per position (a training-time
    estimate of the per-position acceptance rate, no gradient).
    """
    if draft_logits.shape != target_logits.shape or draft_logits.dim() != 3:
        raise ValueError(f"draft_logits {list(draft_logits.shape)} and target_logits {list(target_logits.shape)} "
                         f"must both be [N, G, V]")
    if labels.shape != draft_logits.shape[:2] or valid.shape != labels.shape:
        raise ValueError(f"labels and valid must be [N, G] = {list(draft_logits.shape[:2])}")
    if weights.conf > 0 and (conf_logits is None or conf_logits.shape != labels.shape):
        raise ValueError("the confidence loss needs conf_logits of shape [N, G]")
    G = labels.shape[1]
    w = position_weights(G, labels.device) * valid.float()
    logp_d = F.log_softmax(draft_logits.float(), dim=-1)
    p_t = F.softmax(target_logits.float(), dim=-1)
    zero = logp_d.new_zeros(())
    out = {}
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    out["ce"] = _weighted_mean(-logp_d.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1), w)
    need_tv = weights.tv > 0 or weights.conf > 0
    l1 = (logp_d.exp() - p_t).abs().sum(-1) if need_tv else None
    out["tv"] = _weighted_mean(l1, w) if need_tv else zero
    if weights.conf > 0:
        label = (1.0 - 0.5 * l1).detach().clamp(0.0, 1.0)
        bce = F.binary_cross_entropy_with_logits(conf_logits.float(), label, reduction="none")
        out["conf"] = _weighted_mean(bce, w)
    else:
        out["conf"] = zero
    out["soft_ce"] = _weighted_mean(-(p_t * logp_d).sum(-1), w) if weights.soft_ce > 0 else zero
    out["loss"] = (weights.ce * out["ce"] + weights.tv * out["tv"] + weights.conf * out["conf"]
                   + weights.soft_ce * out["soft_ce"])
    with torch.no_grad():
        acc = l1 if l1 is not None else (logp_d.exp() - p_t).abs().sum(-1)
        acc = 1.0 - 0.5 * acc
        vf = valid.float()
        out["accept"] = (acc * vf).sum(0) / vf.sum(0).clamp_min(1.0)
    return out

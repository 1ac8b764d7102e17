"""Sequential Temperature Scaling (STS) of the confidence head (DSpark section 3).

The head predicts c_k = P(draft k survives | drafts < k survived); the
scheduler needs the prefix survival a_k = prod_{i<=k} c_i to be calibrated.
STS fits one temperature per position, left to right: t_k minimises the
Expected Calibration Error of a_k = a_{k-1} * sigmoid(logit_k / t_k) against
the observed prefix-acceptance outcomes, with t_1..t_{k-1} already fixed.
Temperature scaling keeps the order of the confidences. Pass the temperatures
to markov_sample(conf_temperature=...) or apply them with apply_temperatures.
"""
from __future__ import annotations

import torch

__all__ = ["apply_temperatures", "calibration_report", "default_grid", "expected_calibration_error",
           "prefix_survival", "sequential_temperature_scaling"]


def default_grid() -> torch.Tensor:
    """Temperatures 0.1 .. 10, log-spaced (201 points, 1.0 among them)."""
    return torch.logspace(-1.0, 1.0, 201, dtype=torch.float64)


def _check(conf_logits, accepted):
    if not isinstance(conf_logits, torch.Tensor) or not conf_logits.is_floating_point() or conf_logits.dim() != 2:
        raise ValueError("conf_logits must be a floating-point tensor [N, G]")
    if not isinstance(accepted, torch.Tensor) or accepted.shape != conf_logits.shape:
        raise ValueError(f"accepted must be a tensor of shape {list(conf_logits.shape)}")
    if not bool(torch.isfinite(conf_logits).all()):
        raise ValueError("conf_logits must be finite")
    acc = accepted.to(torch.bool)
    if acc.shape[1] > 1 and bool((acc[:, 1:] & ~acc[:, :-1]).any()):
        raise ValueError("accepted must be prefix-shaped: draft k accepted implies drafts < k accepted")
    return conf_logits.detach().double().cpu(), acc.cpu()


def expected_calibration_error(probs: torch.Tensor, outcomes: torch.Tensor, num_bins: int = 15) -> torch.Tensor:
    """ECE over equal-width bins of [0, 1] along the last dim: sum_b n_b / N * |mean p_b - mean y_b|.

    probs, outcomes: [..., N]; returns [...] (float64).
    """
    p = probs.double()
    y = outcomes.double().expand_as(p)
    n = p.shape[-1]
    if n == 0:
        raise ValueError("expected_calibration_error needs at least one sample")
    bins = (p * num_bins).floor().clamp(0, num_bins - 1).long()
    shape = p.shape[:-1] + (num_bins,)
    sum_p = torch.zeros(shape, dtype=torch.float64).scatter_add_(-1, bins, p)
    sum_y = torch.zeros(shape, dtype=torch.float64).scatter_add_(-1, bins, y)
    return (sum_p - sum_y).abs().sum(-1) / n  # n_b/N * |sum_p/n_b - sum_y/n_b|


def apply_temperatures(conf_logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """Calibrated per-position confidences sigmoid(logit_k / t_k), [N, G]."""
    return torch.sigmoid(conf_logits / temperatures.to(conf_logits.device, conf_logits.dtype))


def prefix_survival(confidence: torch.Tensor) -> torch.Tensor:
    """a_k = prod_{i<=k} c_i along the last dim."""
    return torch.cumprod(confidence, dim=-1)


def sequential_temperature_scaling(conf_logits: torch.Tensor, accepted: torch.Tensor, grid=None,
                                   num_bins: int = 15) -> torch.Tensor:
    """One temperature per position, fitted left to right (see module doc).

    Args:
      conf_logits: [N, G] confidence-head logits on held-out drafts.
      accepted: [N, G] bool, accepted[n, k] = drafts 0..k of block n were all accepted.
      grid: candidate temperatures (default default_grid()); ties go to the first.
    Returns: temperatures [G] float32.
    """
    logits, acc = _check(conf_logits, accepted)
    grid = default_grid() if grid is None else torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
    if grid.numel() == 0 or not bool((grid > 0).all()) or not bool(torch.isfinite(grid).all()):
        raise ValueError("grid must be a non-empty set of finite temperatures > 0")
    G = logits.shape[1]
    temps = torch.empty(G, dtype=torch.float64)
    prev = torch.ones(logits.shape[0], dtype=torch.float64)
    for k in range(G):
        cand = prev * torch.sigmoid(logits[:, k] / grid[:, None])  # [len(grid), N]
        ece = expected_calibration_error(cand, acc[:, k], num_bins)
        best = int(torch.argmin(ece))  # first minimum
        temps[k] = grid[best]
        prev = cand[best]
    return temps.float()


def calibration_report(conf_logits: torch.Tensor, accepted: torch.Tensor, temperatures: torch.Tensor,
                       num_bins: int = 15) -> dict:
    """ECE of the prefix survival a_k per position, before (t = 1) and after STS."""
    logits, acc = _check(conf_logits, accepted)
    before = prefix_survival(torch.sigmoid(logits))
    after = prefix_survival(apply_temperatures(logits, temperatures.double().cpu()))
    ece_before = [float(expected_calibration_error(before[:, k], acc[:, k], num_bins)) for k in range(logits.shape[1])]
    ece_after = [float(expected_calibration_error(after[:, k], acc[:, k], num_bins)) for k in range(logits.shape[1])]
    return {"ece_before": ece_before, "ece_after": ece_after,
            "mean_ece_before": sum(ece_before) / len(ece_before), "mean_ece_after": sum(ece_after) / len(ece_after)}

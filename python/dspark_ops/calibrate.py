"""Sequential calibration of the confidence head (DSpark section 3's STS, optionally with offsets).

The head predicts c_k = P(draft k survives | drafts < k survived); the
scheduler needs the prefix survival a_k = prod_{i<=k} c_i to be calibrated.
Sequential Temperature Scaling fits one temperature per position, left to
right: t_k minimises the Expected Calibration Error of
a_k = a_{k-1} * sigmoid(logit_k / t_k) against the observed prefix-acceptance
outcomes, with positions < k already fixed. A temperature cannot move a biased
mean (a head that learnt the training set's acceptance is too confident on new
prompts), so `sequential_calibration` can also fit an offset per position:
c_k = sigmoid(logit_k / t_k + o_k) (Platt scaling, still order-preserving
within a position). The engine folds the offsets into per-step biases of
markov_sample (fold_offsets).
"""
from __future__ import annotations

import torch

__all__ = ["apply_temperatures", "calibration_report", "default_grid", "default_offset_grid",
           "ece_floor", "expected_calibration_error", "fold_offsets", "prefix_survival", "sequential_calibration",
           "sequential_temperature_scaling"]


def default_grid(points: int = 201) -> torch.Tensor:
    """Temperatures 0.1 .. 10, log-spaced (odd ``points``: 1.0 among them)."""
    return torch.logspace(-1.0, 1.0, points, dtype=torch.float64)


def default_offset_grid() -> torch.Tensor:
    """Offsets -4 .. 4 in steps of 0.1 (81 points, 0 among them)."""
    return torch.linspace(-4.0, 4.0, 81, dtype=torch.float64)


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


def ece_floor(probs: torch.Tensor, num_bins: int = 15, draws: int = 64, seed: int = 0) -> torch.Tensor:
    """Mean ECE a perfectly calibrated predictor scores with these confidences and this sample size.

    Outcomes are drawn from the confidences themselves, so this is what sampling noise alone adds to
    the binned estimate: a measured ECE near it cannot be told from perfect calibration.
    probs: [..., N]; returns [...] (float64; fixed ``seed``, so reports are reproducible).
    """
    p = probs.double()
    gen = torch.Generator().manual_seed(seed)
    outcomes = torch.rand((draws,) + tuple(p.shape), generator=gen, dtype=torch.float64) < p
    return expected_calibration_error(p.expand_as(outcomes), outcomes, num_bins).mean(0)


def apply_temperatures(conf_logits: torch.Tensor, temperatures: torch.Tensor, offsets=None) -> torch.Tensor:
    """Calibrated per-position confidences sigmoid(logit_k / t_k + o_k), [N, G] (offsets default 0)."""
    z = conf_logits / temperatures.to(conf_logits.device, conf_logits.dtype)
    if offsets is not None:
        z = z + torch.as_tensor(offsets).to(conf_logits.device, conf_logits.dtype)
    return torch.sigmoid(z)


def fold_offsets(bias: torch.Tensor, temperatures: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-step biases b_k = bias + o_k * t_k, so that sigmoid((s + b_k) / t_k) = sigmoid((s + bias) / t_k + o_k):
    the [G] conf_bias that makes markov_sample apply calibrated offsets."""
    return bias.reshape(1).float() + offsets.float() * temperatures.float()


def prefix_survival(confidence: torch.Tensor) -> torch.Tensor:
    """a_k = prod_{i<=k} c_i along the last dim."""
    return torch.cumprod(confidence, dim=-1)


def sequential_calibration(conf_logits: torch.Tensor, accepted: torch.Tensor, grid=None, offset_grid=None,
                           num_bins: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """One (temperature, offset) per position, fitted left to right (see module doc).

    Args:
      conf_logits: [N, G] confidence-head logits on held-out drafts.
      accepted: [N, G] bool, accepted[n, k] = drafts 0..k of block n were all accepted.
      grid: candidate temperatures (default default_grid(), or default_grid(81) when offsets are fitted:
        the search is over every pair).
      offset_grid: candidate offsets (default default_offset_grid(); [0] is STS).
      Ties go to the first temperature, then the first offset.
    Returns: (temperatures [G], offsets [G]) float32.
    """
    logits, acc = _check(conf_logits, accepted)
    offset_grid = default_offset_grid() if offset_grid is None else \
        torch.as_tensor(offset_grid, dtype=torch.float64).reshape(-1)
    if offset_grid.numel() == 0 or not bool(torch.isfinite(offset_grid).all()):
        raise ValueError("offset_grid must be a non-empty set of finite offsets")
    if grid is None:
        grid = default_grid(201 if offset_grid.numel() == 1 else 81)
    grid = torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
    if grid.numel() == 0 or not bool((grid > 0).all()) or not bool(torch.isfinite(grid).all()):
        raise ValueError("grid must be a non-empty set of finite temperatures > 0")
    G = logits.shape[1]
    temps, offsets = torch.empty(G, dtype=torch.float64), torch.empty(G, dtype=torch.float64)
    prev = torch.ones(logits.shape[0], dtype=torch.float64)
    for k in range(G):
        best = None
        for t in grid:      # one temperature at a time keeps memory at [offsets, N]
            cand = prev * torch.sigmoid(logits[:, k] / t + offset_grid[:, None])
            ece = expected_calibration_error(cand, acc[:, k], num_bins)
            j = int(torch.argmin(ece))  # first minimum
            if best is None or ece[j] < best[0]:
                best = (ece[j], t, offset_grid[j], cand[j])
        _, temps[k], offsets[k], prev = best
    return temps.float(), offsets.float()


def sequential_temperature_scaling(conf_logits: torch.Tensor, accepted: torch.Tensor, grid=None,
                                   num_bins: int = 15) -> torch.Tensor:
    """The paper's STS: sequential_calibration without offsets; returns temperatures [G] float32."""
    return sequential_calibration(conf_logits, accepted, grid, offset_grid=[0.0], num_bins=num_bins)[0]


def calibration_report(conf_logits: torch.Tensor, accepted: torch.Tensor, temperatures: torch.Tensor,
                       offsets=None, num_bins: int = 15) -> dict:
    """ECE of the prefix survival a_k per position, before (raw head) and after calibration, and the
    sampling floor of the latter (ece_floor: what a perfectly calibrated head would score here)."""
    logits, acc = _check(conf_logits, accepted)
    before = prefix_survival(torch.sigmoid(logits))
    after = prefix_survival(apply_temperatures(logits, temperatures, offsets))
    ece_before = expected_calibration_error(before.T, acc.T, num_bins).tolist()  # one row per position
    ece_after = expected_calibration_error(after.T, acc.T, num_bins).tolist()
    floor = ece_floor(after.T, num_bins).tolist()
    return {"ece_before": ece_before, "ece_after": ece_after, "ece_floor": floor,
            "mean_ece_before": sum(ece_before) / len(ece_before), "mean_ece_after": sum(ece_after) / len(ece_after),
            "mean_ece_floor": sum(floor) / len(floor)}

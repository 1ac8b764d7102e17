"""Executable specification of the confidence scheduler (DSpark Algorithm 1 and the async rule).

The kernels must return exactly these lengths: survival products in float32,
tau summed as integers in units of 2^-32, Theta = float(tau) * SPS(B).
"""
from __future__ import annotations

import torch

TAU_SCALE = 2**32


def ranked_candidates(confidence: torch.Tensor, max_len=None) -> list[tuple[float, int, int]]:
    """(a_{r,j}, r, j) for every candidate with a > 0 and j < max_len_r, best first (ties: lower r, then lower j)."""
    c = confidence.detach().float().cpu()
    R, G = c.shape
    limits = [G] * R if max_len is None else [int(m) for m in torch.as_tensor(max_len).reshape(-1).expand(R)]
    a = torch.ones(R, dtype=torch.float32)
    cands = []
    for j in range(G):
        a = a * c[:, j]  # float32 products, left to right
        cands += [(float(a[r]), r, j) for r in range(R) if j < limits[r] and float(a[r]) > 0.0]
    cands.sort(key=lambda t: (-t[0], t[1], t[2]))
    return cands


def _theta(tau_units: int, batch_tokens: int, sps: list[float]) -> float:
    return float(tau_units) * sps[batch_tokens] if batch_tokens < len(sps) else 0.0


def admission_path(confidence, sps_table, max_len=None):
    """Theta_i for i = 0..n (i candidates admitted in ranked order) and the ranked candidates."""
    sps = [float(s) for s in torch.as_tensor(sps_table, dtype=torch.float64).reshape(-1)]
    R = confidence.shape[0]
    cands = ranked_candidates(confidence, max_len)
    tau = R * TAU_SCALE
    thetas = [_theta(tau, R, sps)]
    for i, (a, _, _) in enumerate(cands, start=1):
        tau += int(a * TAU_SCALE)
        thetas.append(_theta(tau, R + i, sps))
    return thetas, cands


def _lengths(cands, admitted: int, R: int) -> torch.Tensor:
    lengths = torch.zeros(R, dtype=torch.int32)
    for _, r, _ in cands[:admitted]:
        lengths[r] += 1
    return lengths


def schedule_verify_lengths(confidence, sps_table, *, mode="sync", capacity=None, max_len=None) -> torch.Tensor:
    """Same contract as :func:`dspark_ops.schedule_verify_lengths`."""
    R = confidence.shape[0]
    thetas, cands = admission_path(confidence, sps_table, max_len)
    if mode == "async":
        admitted = min(int(capacity) - R, len(cands))
    else:  # Algorithm 1: admit while Theta strictly improves, break at the first non-improvement
        admitted = 0
        while admitted < len(cands) and thetas[admitted + 1] > thetas[admitted]:
            admitted += 1
    return _lengths(cands, admitted, R)


def plan_capacity(confidence, sps_table, *, max_len=None) -> torch.Tensor:
    """R + the first argmax of Theta over the whole greedy admission path (no break)."""
    thetas, _ = admission_path(confidence, sps_table, max_len)
    best = max(range(len(thetas)), key=lambda i: (thetas[i], -i))
    return torch.tensor([confidence.shape[0] + best], dtype=torch.int32)

"""The law of a verify row under the kernels' fixed-point rules (csrc/include/dspark/sampling.h), computed
exactly, and the ideal law it approximates: exact arithmetic on the same float inputs.

Fixed-point rules, as the kernels run them at one position with target masses p (reference.filtered_masses,
total z) and drafted id x with draft probability q:
  accept  iff u * q * z < p[x] in double, u = (k + 1/2) / 2^23 with k the top 23 bits of a Philox word;
  reject: draw from the masses max(0, p_v - floor(q_v * z)) (one-hot drafts: p without x), or from p when
          those are all 0;
  a draw with 64 Philox bits b picks the first v whose cumulative mass c_v exceeds floor(b * total / 2^64).
So accept_count below gives the acceptance probability as a count of u values, and draw_counts the probability
of each token as a count of 64-bit values: exact rational numbers, no sampling.
"""
from __future__ import annotations

import math

import torch

from dspark_ops import reference

U_VALUES = 2**23
BITS_VALUES = 2**64


def accept_count(q: float, p_mass: int, z: int) -> int:
    """How many of the 2^23 values of u accept draft x: the k with (k + 1/2) / 2^23 * q * z < p_mass, evaluated
    in double as the kernels evaluate it. The product grows with k, so they are the first accept_count values."""
    lo, hi = 0, U_VALUES
    while lo < hi:   # the first k that rejects
        mid = (lo + hi) // 2
        if (mid + 0.5) / U_VALUES * q * float(z) < p_mass:
            lo = mid + 1
        else:
            hi = mid
    return lo


def draw_counts(masses: list[int]) -> list[int]:
    """For each token, how many of the 2^64 values of the draw's random bits pick it: b picks v iff
    c_{v-1} <= floor(b * total / 2^64) < c_v, and floor(b * total / 2^64) < c iff b < ceil(c * 2^64 / total)."""
    total = sum(masses)
    below, out, cum = 0, [], 0
    for m in masses:
        cum += m
        upto = -(-(cum * BITS_VALUES) // total)
        out.append(upto - below)
        below = upto
    return out


def draw(masses: list[int], bits: int) -> int:
    """The token the 64 random bits pick (the interval of draw_counts that holds them)."""
    start = 0
    for v, n in enumerate(draw_counts(masses)):
        if start <= bits < start + n:
            return v
        start += n
    raise AssertionError("draw_counts must cover all 2^64 values")


def residual_masses(p: list[int], q: list[float] | None, x: int) -> list[int]:
    """What a rejected draft x draws from: max(0, p_v - floor(q_v * z)) (q None: one-hot, p without x), or p."""
    z = sum(p)
    if q is None:
        r = [0 if v == x else m for v, m in enumerate(p)]
    else:
        r = [max(0, m - int(qv * float(z))) for m, qv in zip(p, q)]
    return r if sum(r) > 0 else list(p)


class NearThreshold(Exception):
    """A filter decision of the ideal law lies within the quantisation bound of its threshold, so the fixed-point
    kernels may decide it either way: the test draws another problem."""


MARGIN = 2.0**-16   # far above the 2^-21 error of a fixed-point numerator (sampling.h)


def ideal_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """The exact filtered softmax of float32 logits (float64 arithmetic): e_v = exp((x_v - max) / T), top-k, then
    top-p, then min-p as thresholds on e with ties kept, renormalised. Raises NearThreshold when a decision is
    within MARGIN of its threshold."""
    x = logits.double()
    t = float(torch.tensor(temperature, dtype=torch.float32))
    e = torch.exp((x - x.max()) / t)
    keep = torch.ones_like(e, dtype=torch.bool)
    V = e.numel()
    if 0 < top_k < V:
        s = torch.sort(e, descending=True).values
        if 0 < float(s[top_k - 1] - s[top_k]) < MARGIN:
            raise NearThreshold("top_k")
        keep &= e >= s[top_k - 1]
    if top_p < 1.0:
        kept = torch.where(keep, e, torch.zeros_like(e))
        want = float(torch.tensor(top_p, dtype=torch.float32)) * float(kept.sum())
        s = torch.sort(kept, descending=True).values
        cum = torch.cumsum(s, 0)
        if bool(((cum - want).abs() < V * MARGIN).any()):
            raise NearThreshold("top_p")
        i = int((cum < want).sum())             # the first prefix whose mass reaches top_p
        if i + 1 < V and 0 < float(s[i] - s[i + 1]) < MARGIN:
            raise NearThreshold("top_p tie")
        keep &= e >= s[i]
    if min_p > 0.0:
        m = float(torch.tensor(min_p, dtype=torch.float32))
        if bool(((e - m).abs() < MARGIN).any()):
            raise NearThreshold("min_p")
        keep &= e >= m
    p = torch.where(keep, e, torch.zeros_like(e))
    return p / p.sum()


def bound(V: int, positions: int) -> float:
    """sampling.h's quantisation bound on the total variation of `positions` emitted tokens."""
    return positions * (V * 2.0**-21 + 2.0**-22)


class TreeProblem:
    """A target and a drafter over every prefix of up to K tokens (V ids), drawn lazily: target(prefix) float32
    logits, drafter(prefix) float32 probabilities on a 2^-20 grid, so they sum to exactly 1 as the kernels read
    them; `masked` ids get -inf logits at every position."""

    def __init__(self, V: int, K: int, gen: torch.Generator, masked: tuple[int, ...] = ()):
        self.V, self.K, self.gen, self.masked = V, K, gen, list(masked)
        self._t, self._d, self._ideal, self._fixed = {}, {}, {}, {}

    def target(self, prefix) -> torch.Tensor:
        key = tuple(prefix)
        if key not in self._t:
            logits = torch.randn(self.V, generator=self.gen) * 1.5
            logits[self.masked] = float("-inf")
            self._t[key] = logits
        return self._t[key]

    def drafter(self, prefix) -> torch.Tensor:
        key = tuple(prefix)
        if key not in self._d:
            q = torch.softmax(torch.randn(self.V, generator=self.gen, dtype=torch.float64) * 1.5, -1)
            grid = torch.floor(q * 2**20)
            grid[int(grid.argmax())] += 2**20 - grid.sum()     # integers summing to 2^20
            self._d[key] = (grid / 2**20).float()
        return self._d[key]

    def ideal(self, prefix, filters: dict) -> list[float]:
        """The ideal target law after `prefix` (ideal_probs)."""
        key = (tuple(prefix), tuple(sorted(filters.items())))
        if key not in self._ideal:
            self._ideal[key] = ideal_probs(self.target(prefix), **filters).tolist()
        return self._ideal[key]

    def masses(self, prefix, filters: dict) -> list[int]:
        """The fixed-point target masses after `prefix`, as the kernels compute them (reference.filtered_masses)."""
        key = (tuple(prefix), tuple(sorted(filters.items())))
        if key not in self._fixed:
            self._fixed[key] = reference.filtered_masses(self.target(prefix), **filters).tolist()
        return self._fixed[key]


def fixed_round_law(problem: TreeProblem, filters: dict, one_hot: bool) -> dict[tuple, float]:
    """{K+1 tokens: probability} when one verify row (K drafts, drawn from the drafter) runs the fixed-point rules
    and the positions after the token it emits are drawn from the ideal target."""
    V, K = problem.V, problem.K
    out: dict[tuple, float] = {}

    def ideal_rest(prefix, weight):
        if len(prefix) == K + 1:
            out[tuple(prefix)] = out.get(tuple(prefix), 0.0) + weight
            return
        p = problem.ideal(prefix, filters)
        for y in range(V):
            if p[y] > 0:
                ideal_rest(prefix + [y], weight * p[y])

    def emit(prefix, masses, weight):
        for y, n in enumerate(draw_counts(masses)):
            if n:
                ideal_rest(prefix + [y], weight * n / BITS_VALUES)

    def position(prefix, weight):
        p = problem.masses(prefix, filters)
        if len(prefix) == K:                        # every draft accepted: the bonus token
            emit(prefix, p, weight)
            return
        q = problem.drafter(prefix).tolist()
        for x in range(V):
            if q[x] == 0:
                continue
            accepted = accept_count(1.0 if one_hot else q[x], p[x], sum(p)) / U_VALUES
            if accepted > 0:
                position(prefix + [x], weight * q[x] * accepted)
            if accepted < 1:
                emit(prefix, residual_masses(p, None if one_hot else q, x), weight * q[x] * (1 - accepted))

    position([], 1.0)
    return out


def ideal_joint(problem: TreeProblem, filters: dict) -> dict[tuple, float]:
    """{K+1 tokens: probability} of plain sampling from the ideal target."""
    out: dict[tuple, float] = {}

    def walk(prefix, weight):
        if len(prefix) == problem.K + 1:
            out[tuple(prefix)] = weight
            return
        p = problem.ideal(prefix, filters)
        for y in range(problem.V):
            if p[y] > 0:
                walk(prefix + [y], weight * p[y])

    walk([], 1.0)
    return out


def total_variation(a: dict, b: dict) -> float:
    return 0.5 * math.fsum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))

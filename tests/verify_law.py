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


def ideal_filter(logits: torch.Tensor, temperature, top_k, top_p, min_p, margin: float = MARGIN,
                 relative: float = 0.0):
    """The exact filtered softmax of rows of float32 logits [R, V] (float64 arithmetic), each row with its own
    parameters (numbers or [R] tensors): e_v = exp((x_v - max) / T), top-k, then top-p, then min-p as thresholds
    on e with ties kept, renormalised; T = 0 is the one-hot argmax (lowest id among ties). Returns the laws
    [R, V] and which rows have a decision within ``margin`` + ``relative`` * value of its threshold (ambiguous:
    kernels whose numbers differ by less may decide it either way)."""

    def near(a, b):   # distinct, and closer than the margins (equal values tie and are kept together)
        return (a != b) & ((a - b).abs() < margin + relative * torch.maximum(a.abs(), b.abs()))

    x = logits.double()
    R, V = x.shape
    col = lambda v, dt: torch.as_tensor(v, dtype=dt).expand(R).unsqueeze(1)  # noqa: E731
    t = col(temperature, torch.float32).double()
    k, top_p, min_p = col(top_k, torch.long), col(top_p, torch.float32).double(), col(min_p, torch.float32).double()
    greedy = t == 0
    e = torch.exp((x - x.max(1, keepdim=True).values) / torch.where(greedy, 1.0, t))
    s = torch.sort(e, 1, descending=True).values
    ambiguous = greedy & near(s[:, :1], s[:, 1:2])
    use_k = (k > 0) & (k < V)
    kth = s.gather(1, (k - 1).clamp(0, V - 1))
    nxt = s.gather(1, k.clamp(0, V - 1))
    ambiguous |= use_k & near(kth, nxt)
    keep = ~use_k | (e >= kth)
    use_p = top_p < 1.0
    s = torch.sort(torch.where(keep, e, 0.0), 1, descending=True).values
    cum = torch.cumsum(s, 1)
    want = top_p * cum[:, -1:]
    i = (cum < want).sum(1, keepdim=True).clamp(max=V - 1)     # the first prefix whose mass reaches top_p
    boundary = near(s.gather(1, i), s.gather(1, (i + 1).clamp(max=V - 1)))
    ambiguous |= use_p & (near(cum, want).any(1, keepdim=True) | boundary)
    keep &= ~use_p | (e >= s.gather(1, i))
    use_m = min_p > 0
    ambiguous |= use_m & near(e, min_p).any(1, keepdim=True)
    keep &= ~use_m | (e >= min_p)
    first = torch.zeros_like(e).scatter_(1, x.argmax(1, keepdim=True), 1.0)
    p = torch.where(greedy, first, torch.where(keep, e, 0.0))
    return p / p.sum(1, keepdim=True), ambiguous.squeeze(1)


def ideal_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """ideal_filter of one row of logits [V]; raises NearThreshold when a decision is ambiguous."""
    p, ambiguous = ideal_filter(logits.unsqueeze(0), temperature, top_k, top_p, min_p)
    if bool(ambiguous[0]):
        raise NearThreshold(f"T={temperature}, top_k={top_k}, top_p={top_p}, min_p={min_p}")
    return p[0]


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

"""The arithmetic the kernels share (csrc/include/dspark/*.h), in plain Python/PyTorch.

Readable restatements used by the reference ops, so that a reference and a
kernel given the same seed pick the same tokens.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MASS_SCALE = 2**40

PURPOSE_VERIFY_ACCEPT = 1
PURPOSE_VERIFY_SAMPLE = 2
PURPOSE_MARKOV_SAMPLE = 3


def philox4x32_10(counter: tuple[int, int, int, int], key0: int, key1: int) -> tuple[int, int, int, int]:
    """Philox4x32 with 10 rounds (Salmon et al., 2011)."""
    c0, c1, c2, c3 = counter
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ key0) & MASK32, p1 & MASK32, ((p0 >> 32) ^ c3 ^ key1) & MASK32, p0 & MASK32
        key0 = (key0 + 0x9E3779B9) & MASK32
        key1 = (key1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def random_words(seed: int, stream: int, offset: int, position: int, purpose: int) -> tuple[int, int, int, int]:
    """Philox words of (seed, stream, offset, position, purpose); stream: the row under a batch seed, else 0."""
    seed &= 2**64 - 1
    offset &= 2**64 - 1
    counter = (stream & MASK32, ((purpose << 24) | (position & 0xFFFFFF)) & MASK32, offset & MASK32, offset >> 32)
    return philox4x32_10(counter, seed & MASK32, seed >> 32)


def seeds_and_streams(seed, batch: int) -> list[tuple[int, int]]:
    """(seed, stream) of each row: one seed (None = 0, an int, a 1-element tensor) gives row b stream b; a [B]
    tensor gives each row its own seed and stream 0."""
    if isinstance(seed, torch.Tensor) and seed.numel() == batch and seed.dim() == 1 and batch != 1:
        return [(int(s), 0) for s in seed.tolist()]
    one = 0 if seed is None else int(seed.reshape(-1)[0]) if isinstance(seed, torch.Tensor) else int(seed)
    return [(one, b) for b in range(batch)]


def uniform_open01(bits: int) -> float:
    """Uniform in the open interval (0, 1): (k + 0.5) / 2^23."""
    return ((bits >> 9) + 0.5) / 2**23


def random_u64(words) -> int:
    return (words[1] << 32) | words[0]


def scaled_draw(bits: int, total: int) -> int:
    """Uniform integer in [0, total)."""
    return (bits * total) >> 64


def _fma32(a: torch.Tensor, b: torch.Tensor | float, c: torch.Tensor | float) -> torch.Tensor:
    # float32 fused multiply-add: the product is exact in float64.
    return (a.double() * b + c).float()


def exp_nonpositive(x: torch.Tensor) -> torch.Tensor:
    """The kernels' exp for x <= 0 (csrc/include/dspark/math.h), step by step."""
    x = x.float()
    xc = torch.clamp(x, min=-87.0)
    n = torch.round(xc * torch.tensor(1.44269504088896341, dtype=torch.float32))
    ln2_hi = float(torch.tensor(0.693145751953125, dtype=torch.float32))
    ln2_lo = float(torch.tensor(1.428606765330187045e-06, dtype=torch.float32))
    r = _fma32(-n, ln2_hi, xc)
    r = _fma32(-n, ln2_lo, r)
    coeffs = [1 / 720, 1 / 120, 1 / 24, 1 / 6, 0.5, 1.0, 1.0]
    p = torch.full_like(r, float(torch.tensor(1 / 5040, dtype=torch.float32)))
    for c in coeffs:
        p = _fma32(p, r.double(), float(torch.tensor(c, dtype=torch.float32)))
    scale = ((n.to(torch.int32) + 127) << 23).view(torch.float32)
    return torch.where(x < -87.0, torch.zeros_like(p), p * scale)


def mass_of(e: torch.Tensor) -> torch.Tensor:
    """40-bit fixed-point mass of numerators e in [0, 1] (truncation), int64."""
    return (e.float() * float(MASS_SCALE)).to(torch.int64)


def float_bits(e: torch.Tensor) -> torch.Tensor:
    return e.float().view(torch.int32).to(torch.int64) & MASK32


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 fmaf(a, b, c), correctly rounded (the kernels' fma chains).

    a * b is exact in float64; s = a * b + c is rounded once to float64 and the
    rounding error recovered exactly (TwoSum). Rounding s to float32 is then
    right except when s lies exactly halfway between two floats and the error
    is not zero: the error's sign picks the neighbour.
    """
    p = a.double() * b.double()
    cd = c.double()
    s = p + cd
    bp = s - p
    err = (p - (s - bp)) + (cd - bp)
    f = s.float()
    fd = f.double()
    toward = torch.where(s > fd, torch.tensor(float("inf")), torch.tensor(float("-inf"))).float()
    nf = torch.nextafter(f, toward)
    nfd = nf.double()
    midpoint = (fd != s) & ((s - fd) == (nfd - s)) & (err != 0)
    upper = torch.where(nfd > fd, nf, f)
    lower = torch.where(nfd > fd, f, nf)
    return torch.where(midpoint, torch.where(err > 0, upper, lower), f)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """The kernels' sigmoid (csrc/include/dspark/math.h): exp of a non-positive number only."""
    x = x.float()
    e = exp_nonpositive(torch.where(x >= 0, -x, x))
    return torch.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))

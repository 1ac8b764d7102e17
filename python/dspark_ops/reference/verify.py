"""Executable specification of ``verify`` (the kernels must agree token for token)."""
from __future__ import annotations

import math

import torch

from .numerics import (PURPOSE_VERIFY_ACCEPT, PURPOSE_VERIFY_SAMPLE, exp_nonpositive, float_bits, mass_of,
                       random_u64, random_words, scaled_draw, seeds_and_streams, uniform_open01)


def _as_list(value, batch: int, default):
    if value is None:
        return [default] * batch
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).expand(batch).tolist() if value.numel() == 1 else value.tolist()
    return [value] * batch


def filtered_masses(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float):
    """Fixed-point masses of the filtered target distribution at one position (int64 [V]).

    Temperature, then top-k, then top-p, then min-p, each a threshold on the
    numerators e_v = exp((x_v - max) / T); ties at a threshold are kept. A
    logit of -inf (a masked id) has e_v = 0: mass 0, below every threshold.
    """
    x = logits.float()
    m = x.max()
    inv_t = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(temperature, dtype=torch.float32)
    e = exp_nonpositive((x - m) * inv_t)
    mass = mass_of(e)
    bits = float_bits(e)
    keep = torch.ones_like(e, dtype=torch.bool)
    V = e.numel()
    if 0 < top_k < V:
        kth = torch.sort(bits, descending=True).values[top_k - 1]
        keep &= bits >= kth
    if top_p < 1.0:
        z = int(mass[keep].sum())
        want = max(1, min(z, math.ceil(top_p * z)))
        kept_bits, order = torch.sort(bits[keep], descending=True)
        cum = torch.cumsum(mass[keep][order], 0)
        idx = int(torch.searchsorted(cum, want))  # first index with cum >= want
        if idx < cum.numel():
            keep &= bits >= kept_bits[idx]
    if min_p > 0.0:
        keep &= e >= torch.tensor(min_p, dtype=torch.float32)
    return torch.where(keep, mass, torch.zeros_like(mass))


def _draw(masses: torch.Tensor, bits: int) -> int:
    total = int(masses.sum())
    u = scaled_draw(bits, total)
    return int(torch.searchsorted(torch.cumsum(masses, 0), u, right=True))


def verify(target_logits, draft_tokens, draft_probs=None, *, draft_index=None, num_draft=None, temperature=None,
           top_k=None, top_p=None, min_p=None, seed=None, offset=None):
    """Same contract as :func:`dspark_ops.verify`, one request and position at a time."""
    B, K1, V = target_logits.shape
    if draft_index is not None:  # draft vocabulary columns -> [B, K, V], zero outside it
        index = draft_index.long().cpu()
        q = draft_probs.float().cpu()
        draft_probs = torch.where(index >= 0, q[:, :, index.clamp(min=0)], torch.zeros(()))
    K = K1 - 1
    nd = _as_list(num_draft, B, K)
    temp, tk, tp, mp = (_as_list(temperature, B, 1.0), _as_list(top_k, B, 0), _as_list(top_p, B, 1.0),
                        _as_list(min_p, B, 0.0))
    streams, off = seeds_and_streams(seed, B), _as_list(offset, B, 0)
    tokens = torch.full((B, K1), -1, dtype=torch.int32)
    num_accepted = torch.zeros(B, dtype=torch.int32)
    for b in range(B):
        sd, stream = streams[b]
        if not all(0 <= int(x) < V for x in draft_tokens[b, :nd[b]]):  # every draft, before any sampling
            raise ValueError(f"draft_tokens row {b} holds a token id outside [0, {V}) within its num_draft")
        for j in range(nd[b] + 1):
            logits = target_logits[b, j].float().cpu()
            if bool(logits.isnan().any() | (logits == float("inf")).any()):
                raise ValueError(f"target_logits row {b} contains NaN or +inf")
            if bool((logits == float("-inf")).all()):
                raise ValueError(f"target_logits row {b} masks every id (-inf) at a position it verifies")
            is_draft = j < nd[b]
            x = int(draft_tokens[b, j]) if is_draft else -1
            if temp[b] == 0.0:  # greedy: accept while the draft is the argmax
                best = int(torch.argmax(logits))
                if is_draft and x == best:
                    tokens[b, j] = x
                    continue
                tokens[b, j] = best
                num_accepted[b] = j
                break
            p = filtered_masses(logits, float(temp[b]), int(tk[b]), float(tp[b]), float(mp[b]))
            z = int(p.sum())
            sample_bits = random_u64(random_words(sd, stream, off[b], j, PURPOSE_VERIFY_SAMPLE))
            if not is_draft:  # bonus token from p
                tokens[b, j] = _draw(p, sample_bits)
                num_accepted[b] = j
                break
            if draft_probs is None:
                q_x, q = 1.0, None
            else:
                q = draft_probs[b, j].float().cpu()
                q_x = float(q[x])
            u = uniform_open01(random_words(sd, stream, off[b], j, PURPOSE_VERIFY_ACCEPT)[0])
            if u * q_x * z < int(p[x]):  # accept with probability min(1, p(x) / q(x))
                tokens[b, j] = x
                continue
            if q is None:
                q_mass = torch.zeros_like(p)
                q_mass[x] = z
            else:
                q_mass = (q.double() * z).clamp(min=0).to(torch.int64)
            residual = (p - q_mass).clamp(min=0)  # normalize(max(0, p - q))
            tokens[b, j] = _draw(residual if int(residual.sum()) > 0 else p, sample_bits)
            num_accepted[b] = j
            break
    return tokens, num_accepted

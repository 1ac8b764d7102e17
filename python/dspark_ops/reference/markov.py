"""Executable specification of ``markov_sample`` (the kernels must agree bit for bit)."""
from __future__ import annotations

import torch

from .numerics import (PURPOSE_MARKOV_SAMPLE, exp_nonpositive, fma32, mass_of, random_u64, random_words, scaled_draw,
                       seeds_and_streams, sigmoid)
from .verify import _as_list

DOT_LANES = 16


def _confidence(h: torch.Tensor, w1_row: torch.Tensor, weight: torch.Tensor, bias: float, temperature: float) -> float:
    """sigmoid((w . [h ; w1_row] + bias) / temperature), summed in 16 interleaved fma lanes, lanes added in order."""
    x = torch.cat([h.float(), w1_row.float()])
    lanes = torch.zeros(DOT_LANES, dtype=torch.float32)
    for i in range(x.numel()):
        lanes[i % DOT_LANES] = fma32(weight[i:i + 1].float(), x[i:i + 1], lanes[i % DOT_LANES:i % DOT_LANES + 1])[0]
    s = torch.zeros((), dtype=torch.float32)
    for lane in lanes:
        s = s + lane
    logit = (s + torch.tensor(bias, dtype=torch.float32)) / torch.tensor(temperature, dtype=torch.float32)
    return float(sigmoid(logit.reshape(1))[0])


def markov_logits(base_logits_row: torch.Tensor, w1_row: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """z = U + w1[x_prev] @ w2 as the kernels compute it: one fma chain per token, i = 0..r-1, started from U."""
    z = base_logits_row.float().clone()
    for i in range(w1_row.numel()):
        z = fma32(w1_row[i].float().expand_as(z), w2[i].float(), z)
    return z


def markov_sample(base_logits, anchor, w1, w2, *, hidden=None, conf_weight=None, conf_bias=None,
                  conf_temperature=None, temperature=None, seed=None, offset=None, return_probs=True):
    """Same contract as :func:`dspark_ops.markov_sample`, one request and step at a time."""
    B, G, V = base_logits.shape
    temp, streams, off = _as_list(temperature, B, 1.0), seeds_and_streams(seed, B), _as_list(offset, B, 0)
    conf_t = _as_list(conf_temperature, G, 1.0)
    bias = _as_list(conf_bias, G, 0.0)
    tokens = torch.empty(B, G, dtype=torch.int32)
    probs = torch.zeros(B, G, V, dtype=torch.float32) if return_probs else None
    confidence = torch.empty(B, G, dtype=torch.float32) if conf_weight is not None else None
    w1c, w2c = w1.cpu(), w2.cpu()
    for b in range(B):
        x = int(anchor[b])
        for k in range(G):
            z = markov_logits(base_logits[b, k].cpu(), w1c[x], w2c)   # -inf: a masked id, probability 0
            if bool(z.isnan().any() | (z == float("inf")).any() | (z == float("-inf")).all()):
                raise ValueError(f"row {b} has NaN or +inf logits, or masks every id (-inf) at step {k}")
            if confidence is not None:
                h = hidden[b, k].cpu() if hidden is not None else torch.zeros(0)
                confidence[b, k] = _confidence(h, w1c[x], conf_weight.cpu(), float(bias[k]), float(conf_t[k]))
            if temp[b] == 0.0:  # greedy: first index of the maximum, one-hot q
                token = int(torch.argmax(z))
                q = torch.zeros(V, dtype=torch.float32)
                q[token] = 1.0
            else:
                inv_t = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(temp[b], dtype=torch.float32)
                mass = mass_of(exp_nonpositive((z - z.max()) * inv_t))
                total = int(mass.sum())
                u = scaled_draw(random_u64(random_words(*streams[b], off[b], k, PURPOSE_MARKOV_SAMPLE)), total)
                token = int(torch.searchsorted(torch.cumsum(mass, 0), u, right=True))  # first cum > u
                q = (mass.double() * (1.0 / total)).float()
            if probs is not None:
                probs[b, k] = q
            tokens[b, k] = token
            x = token
    return tokens, probs, confidence

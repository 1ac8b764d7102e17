"""``markov_sample``: the Markov head's sequential stage (DSpark drafting), fused."""
from __future__ import annotations

import math

import torch

from ._args import check_floating, is_finite_nonneg, per_request, seed_arg, token_ids_int32
from ._ops import ops


def _small_float(value, name: str, shape: tuple[int, ...], device: torch.device, default=None) -> torch.Tensor:
    """A float32 tensor of `shape` on `device` from None (default), a number or a tensor."""
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a number or a tensor of shape {list(shape)}")
    if not isinstance(value, torch.Tensor):
        return torch.full(shape, float(value), dtype=torch.float32, device=device)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but base_logits is on {device}")
    if value.numel() == 1 and math.prod(shape) != 1:
        value = value.reshape(1).expand(shape)
    if tuple(value.shape) != shape:
        if value.numel() == math.prod(shape):
            value = value.reshape(shape)
        else:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(value.shape)}")
    return value.to(torch.float32).contiguous()


def markov_sample(base_logits: torch.Tensor, anchor: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, *,
                  hidden: torch.Tensor | None = None, conf_weight: torch.Tensor | None = None, conf_bias=None,
                  conf_temperature=None, temperature=None, seed=None, offset=None, return_probs: bool = True,
                  check: bool = False):
    """Sample a draft block left to right with the Markov head's low-rank transition bias.

    For k = 1..G (x_0 = anchor): z_k = base_logits[:, k-1] + w1[x_{k-1}] @ w2,
    q_k = softmax(z_k / T) (T = 0: one-hot argmax, ties to the lowest id),
    x_k ~ q_k. Tokens are drawn from the fixed-point masses of q_k with Philox
    numbers keyed by (seed, stream, offset, k) (purpose distinct from
    `verify`'s), so the CPU and CUDA kernels draw the same tokens, and
    draft_probs is exactly the distribution each token was drawn from: pass it
    to `verify`. A logit of -inf (in base_logits, or reached through the
    Markov bias) masks its id: probability 0, never drawn; NaN, +inf, or every
    id of a step masked are errors.

    Args:
      base_logits: [B, G, V] float32/bfloat16/float16 (the parallel stage's U_k), read in place.
      anchor: [B] integer ids (last verified token), in [0, V_prev).
      w1: [V_prev, r], w2: [r, V] float tensors of one dtype (r = 0: no Markov head, i.e. DFlash).
        Row x of w1 is the bias after token x. Usually V_prev = V; with a draft vocabulary (the logits
        cover K < V target ids) the drawable ids come first in w1's rows and the anchor may be any
        of the V_prev ids (see dspark_ops.draft_vocab).
      hidden: optional [B, G, H] drafter hidden states for the confidence head.
      conf_weight: optional [H + r] confidence head weight; with it,
        confidence_k = sigmoid((conf_weight . [hidden_k ; w1[x_{k-1}]] + conf_bias_k) / conf_temperature_k).
      conf_bias: number, 1-element tensor, or [G] tensor (one bias per step: calibrated offsets folded in,
        see dspark_ops.calibrate.fold_offsets); default 0.
      conf_temperature: [G] or number, calibrated temperatures (dspark_ops.calibrate; default 1).
      temperature, offset: per request ([B] or number); defaults 1, 0.
      seed: one int (default 0) for the batch, every row drawing from its own
        Philox stream (keyed by the seed and the row index), or a [B] tensor,
        a seed per row: then a row's tokens depend only on its own seed and
        offset, whatever else is in the batch (see `verify`).
      return_probs: also return the [B, G, V] draft distributions.
      check: on CUDA, invalid rows (anchor out of range, bad temperature, NaN/+inf logits, a step with
        every id masked) get tokens -1 instead of raising (raising needs a host sync); check=True syncs
        and raises. Bad values raise ValueError (bad types TypeError) on either device.

    Returns:
      (tokens [B, G] int32, draft_probs [B, G, V] float32 or None, confidence [B, G] float32 or None)
    """
    check_floating(base_logits, "base_logits")
    if base_logits.dim() != 3:
        raise ValueError(f"base_logits must be [B, G, V], got {list(base_logits.shape)}")
    B, G, V = base_logits.shape
    dev = base_logits.device
    if not isinstance(anchor, torch.Tensor) or anchor.shape != (B,):
        raise ValueError(f"anchor must be a [B] = [{B}] tensor, got "
                         f"{list(anchor.shape) if isinstance(anchor, torch.Tensor) else type(anchor).__name__}")
    if anchor.device != dev:
        raise ValueError(f"anchor is on {anchor.device} but base_logits is on {dev}")
    anchor = token_ids_int32(anchor, "anchor")
    check_floating(w1, "w1")
    check_floating(w2, "w2")
    if w1.dim() != 2 or w1.shape[0] < V:
        raise ValueError(f"w1 must be [V_prev, r] with V_prev >= V = {V}, got {list(w1.shape)}")
    r = w1.shape[1]
    if w2.shape != (r, V):
        raise ValueError(f"w2 must be [r, V] = [{r}, {V}] to match w1, got {list(w2.shape)}")
    if w1.dtype != w2.dtype:
        raise TypeError(f"w1 and w2 must share a dtype, got {w1.dtype} and {w2.dtype}")
    for t, name in ((w1, "w1"), (w2, "w2")):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but base_logits is on {dev}")
    w1, w2 = w1.contiguous(), w2.contiguous()
    if base_logits.stride(-1) != 1:
        base_logits = base_logits.contiguous()
    bias = temps = None
    if conf_weight is not None:
        H = 0
        if hidden is not None:
            check_floating(hidden, "hidden")
            if hidden.dim() != 3 or hidden.shape[:2] != (B, G):
                raise ValueError(f"hidden must be [B, G, H] = [{B}, {G}, H], got {list(hidden.shape)}")
            if hidden.device != dev:
                raise ValueError(f"hidden is on {hidden.device} but base_logits is on {dev}")
            H = hidden.shape[2]
            if hidden.stride(-1) != 1:
                hidden = hidden.contiguous()
        conf_weight = _small_float(conf_weight, "conf_weight", (H + r,), dev)
        per_step = isinstance(conf_bias, torch.Tensor) and conf_bias.dim() == 1 and conf_bias.shape[0] == G
        bias = _small_float(conf_bias, "conf_bias", (G,) if per_step else (1,), dev, default=0.0)
        temps = _small_float(conf_temperature, "conf_temperature", (G,), dev, default=1.0)
        if not isinstance(conf_temperature, torch.Tensor) and conf_temperature is not None and \
                not (math.isfinite(conf_temperature) and conf_temperature > 0):
            raise ValueError(f"conf_temperature must be finite and > 0, got {conf_temperature}")
    elif hidden is not None:
        raise ValueError("hidden is only used by the confidence head: pass conf_weight too")
    temperature = per_request(temperature, "temperature", B, dev, torch.float32, 1.0, is_finite_nonneg,
                              "finite and >= 0")
    seed = seed_arg(seed, B, dev)
    offset = per_request(offset, "offset", B, dev, torch.int64, 0)
    tokens, probs, confidence = ops.markov_sample(base_logits, anchor, w1, w2, hidden, conf_weight, bias, temps,
                                                  temperature, seed, offset, bool(return_probs))
    if check and dev.type != "cpu" and B > 0 and bool((tokens[:, 0] < 0).any()):
        bad = int((tokens[:, 0] < 0).nonzero()[0, 0])
        raise ValueError(f"markov_sample: row {bad} is invalid (anchor outside [0, {w1.shape[0]}), bad temperature or "
                         "conf_temperature, NaN/+inf logits, or a step with every id masked)")
    return tokens, (probs if return_probs else None), (confidence if conf_weight is not None else None)

"""``verify``: batched chain verification with lossless acceptance sampling."""
from __future__ import annotations

import torch

from ._args import check_floating, is_finite_nonneg, per_request, seed_arg, token_ids_int32
from ._ops import ops


def verify(target_logits: torch.Tensor, draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None = None,
           *, draft_index: torch.Tensor | None = None, num_draft=None, temperature=None, top_k=None, top_p=None,
           min_p=None, seed=None, offset=None, check: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify K drafted tokens per request against the target and emit the next tokens.

    Args:
      target_logits: [B, K+1, V] float32/bfloat16/float16, read in place (row j
        scores position j; row K is the bonus position). -inf masks an id
        (probability 0, as a grammar or an allowed-token list masks it): a
        masked id is never emitted, a draft of one is always rejected, and the
        filters see only the other ids. NaN, +inf, or every id of a position
        the row verifies masked are errors.
      draft_tokens: [B, K] integer ids; every id within the row's num_draft
        must lie in [0, V), also past a rejection (checked before sampling).
      draft_probs: [B, K, V] the distribution each draft was sampled from, or
        None for one-hot drafts (accepted with probability p(x); on rejection
        the token is resampled from p with x removed).
      draft_index: [V] integer, or None. With it, draft_probs is [B, K, Vd]
        over a draft vocabulary (EAGLE-3's d2t, FR-Spec): draft_index[v] is
        the column holding target id v, -1 for an id no draft can propose
        (q = 0 there). Columns must map to distinct ids. Saves writing
        [B, K, V] probabilities that are zero outside Vd ids; the residual
        on rejection still covers every target id, so it stays lossless.
      num_draft: [B] or number, drafts to verify per request (0..K; default K).
      temperature: 0 = greedy (ties to the lowest id); default 1.
      top_k (0 = off), top_p (1 = off), min_p (0 = off): target filters,
        applied in this order after temperature, then renormalised.
      seed: one int (default 0; or a 0-d / 1-element tensor) for the whole
        batch, every row drawing from its own Philox stream (keyed by the seed
        and the row index, as FlashInfer does), so duplicated rows sample
        independently; or a [B] tensor, a seed per row, and then a row's
        result depends only on its own seed and offset, whatever else is in
        the batch (how the engine keeps requests reproducible).
      offset: int64 [B] or number (default 0). Random numbers are a pure
        function of (seed, stream, offset, position): advance `offset` (e.g.
        by 1 per step; in place under CUDA graphs) to get fresh numbers.
      check: on CUDA, invalid rows (NaN/+inf logits, a position with every id
        masked, ids out of range, zero draft probability, bad parameters) are
        marked num_accepted = -1 rather than raising, since raising needs a
        host sync; check=True syncs and raises. On CPU invalid input always
        raises. Bad values raise ValueError (bad types TypeError) on either
        device.

    Returns:
      tokens [B, K+1] int32: the accepted drafts followed by one sampled token
        (correction or bonus), -1 after; num_accepted [B] int32.
    """
    check_floating(target_logits, "target_logits")
    if target_logits.dim() != 3:
        raise ValueError(f"target_logits must be [B, K+1, V], got {list(target_logits.shape)}")
    B, K1, V = target_logits.shape
    K = K1 - 1
    if K < 0:
        raise ValueError("target_logits must have at least one position (K+1 >= 1)")
    dev = target_logits.device
    if not isinstance(draft_tokens, torch.Tensor) or draft_tokens.shape != (B, K):
        raise ValueError(f"draft_tokens must be [B, K] = [{B}, {K}], got "
                         f"{list(draft_tokens.shape) if isinstance(draft_tokens, torch.Tensor) else draft_tokens}")
    if draft_tokens.device != dev:
        raise ValueError(f"draft_tokens is on {draft_tokens.device} but target_logits is on {dev}")
    draft_tokens = token_ids_int32(draft_tokens, "draft_tokens")
    if draft_index is not None:
        if draft_probs is None:
            raise ValueError("draft_index maps draft_probs' columns, and no draft_probs was given")
        draft_index = token_ids_int32(draft_index, "draft_index", lowest_valid=-1)   # -1: no column
        if draft_index.shape != (V,):
            raise ValueError(f"draft_index must be [V] = [{V}], got {list(draft_index.shape)}")
        if draft_index.device != dev:
            raise ValueError(f"draft_index is on {draft_index.device} but target_logits is on {dev}")
    if draft_probs is not None:
        check_floating(draft_probs, "draft_probs")
        if draft_index is None and draft_probs.shape != (B, K, V):
            raise ValueError(f"draft_probs must be [B, K, V] = [{B}, {K}, {V}], got {list(draft_probs.shape)}")
        if draft_index is not None and (draft_probs.dim() != 3 or draft_probs.shape[:2] != (B, K)
                                        or draft_probs.shape[2] < 1):
            raise ValueError(f"draft_probs must be [B, K, Vd] = [{B}, {K}, Vd] with a draft_index, got "
                             f"{list(draft_probs.shape)}")
        if draft_probs.device != dev:
            raise ValueError(f"draft_probs is on {draft_probs.device} but target_logits is on {dev}")
        if draft_probs.stride(-1) != 1:
            draft_probs = draft_probs.contiguous()
    if target_logits.stride(-1) != 1:
        target_logits = target_logits.contiguous()
    args = (
        per_request(num_draft, "num_draft", B, dev, torch.int32, K, lambda v: 0 <= v <= K, f"0 <= num_draft <= {K}"),
        per_request(temperature, "temperature", B, dev, torch.float32, 1.0, is_finite_nonneg, "finite and >= 0"),
        per_request(top_k, "top_k", B, dev, torch.int32, 0, lambda v: v >= 0, ">= 0 (0 = off)"),
        per_request(top_p, "top_p", B, dev, torch.float32, 1.0, lambda v: 0 < v <= 1, "0 < top_p <= 1"),
        per_request(min_p, "min_p", B, dev, torch.float32, 0.0, lambda v: 0 <= v <= 1, "0 <= min_p <= 1"),
        seed_arg(seed, B, dev),
        per_request(offset, "offset", B, dev, torch.int64, 0),
    )
    tokens, num_accepted = ops.verify(target_logits, draft_tokens, draft_probs, *args, draft_index)
    if check and dev.type != "cpu" and bool((num_accepted < 0).any()):
        bad = int((num_accepted < 0).nonzero()[0, 0])
        raise ValueError(f"verify: row {bad} is invalid (NaN/+inf in target_logits or a position with every id "
                         f"masked, a draft_tokens id outside [0, {V}), a zero draft_probs entry for its token, or "
                         "bad sampling parameters)")
    return tokens, num_accepted

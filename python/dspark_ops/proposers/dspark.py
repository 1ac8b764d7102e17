"""DSpark (and DFlash, its rank-0 Markov head) drafting: one parallel drafter pass per block, then
``markov_sample`` draws the block left to right with its exact draft distributions and confidences.

The drafter's paged cache holds its projection of the target's hidden states of every verified position;
a block [anchor, mask, ...] at positions start.. attends to it (non-causally) and writes scratch K/V past the
context, overwritten before it is read.
"""
from __future__ import annotations

import torch

from .. import markov_sample
from ..calibrate import fold_offsets
from ..kv_cache import position_slots
from ..models.attention import PagedAttention
from ..models.drafter import DSparkDrafter
from .base import DrafterProposer


class DSparkProposer(DrafterProposer):
    def __init__(self, target, drafter: DSparkDrafter, *, block_size: int | None, draft_vocab: bool):
        cfg = drafter.config
        super().__init__(target, drafter, block_size=block_size or cfg.block_size, native_block_size=cfg.block_size,
                         draft_vocab=draft_vocab, carries_hidden=cfg.block_context)
        self.cache_rows = cfg.block_size   # the whole drafted block, scratch rows included
        self.confidence = self._calibrated_confidence()
        self.has_confidence = self.confidence is not None

    def markov_weights(self):
        return self.drafter.markov_weights()

    def _calibrated_confidence(self):
        """(w, b, temperatures) of the confidence head as ``markov_sample`` takes them (None: no head), the
        calibration of ``dspark calibrate`` applied: temperatures, offsets folded into the bias."""
        conf = self.drafter.confidence_weights()
        if conf is None:
            return None
        cfg, G, dev = self.drafter.config, self.block_size, self.device
        temps = None if cfg.confidence_temperatures is None else \
            torch.tensor(cfg.confidence_temperatures[:G], device=dev)
        bias = conf[1].detach()
        if cfg.confidence_offsets is not None:
            temps = torch.ones(G, device=dev) if temps is None else temps
            bias = fold_offsets(bias, temps, torch.tensor(cfg.confidence_offsets[:G], device=dev))
        return conf[0].detach(), bias, temps

    def propose(self, s):
        """One parallel drafter pass over [anchor, mask..] at start.. (scratch K/V past the context), then
        markov_sample draws the block and its confidences."""
        B, G, dev = s.anchor.shape[0], self.block_size, self.device
        bs, pages = self.drafter.config.block_size, s.draft["pages"]
        positions = s.start.unsqueeze(1) + torch.arange(bs, device=dev)
        backend = PagedAttention(self.cache.layer_caches(),
                                 slot_mapping=position_slots(pages, positions, self.cache.page_size).view(-1),
                                 page_table=pages, seq_lens=(s.start + bs).to(torch.int32),
                                 cu_q_lens=torch.arange(B + 1, dtype=torch.int32, device=dev) * bs, causal=False)
        block = self.drafter.draft_block(s.anchor, s.start, kv=backend, lm_head=self.draft_head,
                                         context=s.draft.get("hidden"))
        kwargs = {}
        if self.confidence is not None:
            w, b, temps = self.confidence
            kwargs = dict(hidden=block.hidden[:, :G], conf_weight=w, conf_bias=b, conf_temperature=temps)
        tokens, q, confidence = markov_sample(block.logits[:, :G], self.draft_ids(s.anchor), *self.markov,
                                              temperature=s.temperature, seed=s.seed, offset=s.offset, **kwargs)
        return self.target_tokens(tokens), q, confidence

    def read_prompts(self, prompts, out, first, slots, pages):
        backend = PagedAttention(self.cache.layer_caches(), slot_mapping=slots, causal=False)
        return self.drafter.extend_context(out.layer_hidden, prompts.positions, kv=backend)

    def read_verified(self, s, out, tokens, block):
        slots = block.rows(position_slots(s.draft["pages"], block.positions, self.cache.page_size))
        backend = PagedAttention(self.cache.layer_caches(), slot_mapping=slots, causal=False)
        return self.drafter.extend_context(out.layer_hidden, block.flat_positions, kv=backend)

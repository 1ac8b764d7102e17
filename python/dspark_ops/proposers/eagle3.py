"""EAGLE-3 drafting: one decoder layer drafts the block autoregressively.

The drafter's paged cache holds, per verified position t, its layer's K/V of (the target's hidden states at
t, the token emitted after t). The output that predicts the first draft comes with the step that extended
the context; each further draft feeds the previous output with the token just drawn, at the next position
(scratch K/V past the context). Every draw is ``markov_sample`` without a Markov head on its own Philox
offset, so the draft distribution is what the token was drawn from.
"""
from __future__ import annotations

import torch

from .. import markov_sample
from ..kv_cache import position_slots
from ..models.attention import PagedAttention
from ..models.drafter import Eagle3Drafter
from .base import DrafterProposer

DRAWS_PER_STEP = 16   # Philox offsets per engine step for the sequential draws (block <= 15)


class Eagle3Proposer(DrafterProposer):
    def __init__(self, target, drafter: Eagle3Drafter, *, block_size: int | None, draft_vocab: bool):
        ttt = drafter.config.ttt_length
        super().__init__(target, drafter, block_size=block_size or ttt, native_block_size=ttt,
                         draft_vocab=draft_vocab, carries_hidden=True)

    def propose(self, s):
        B, dev = s.anchor.shape[0], self.device
        pages = s.draft["pages"]
        cu = torch.arange(B + 1, dtype=torch.int32, device=dev)
        h, prev = s.draft["hidden"], s.anchor
        tokens, probs = [], []
        for j in range(self.block_size):
            if j:
                pos = s.start + (j - 1)
                slots = position_slots(pages, pos.unsqueeze(1), self.cache.page_size).view(-1)
                backend = PagedAttention(self.cache.layer_caches(), slot_mapping=slots, page_table=pages,
                                         seq_lens=(pos + 1).to(torch.int32), cu_q_lens=cu, causal=True)
                h = self.drafter(prev, h, pos, kv=backend, from_target=False)
            logits = self.drafter.compute_logits(h, self.draft_head).unsqueeze(1)
            tok, q, _ = markov_sample(logits, self.draft_ids(prev), *self.markov, temperature=s.temperature,
                                      seed=s.seed, offset=s.offset * DRAWS_PER_STEP + j)
            tok = self.target_tokens(tok)
            prev = tok[:, 0].to(torch.long)
            tokens.append(tok)
            probs.append(q)
        return torch.cat(tokens, 1), torch.cat(probs, 1), None

    def read_prompts(self, prompts, out, first, slots, pages):
        # row t pairs the target state at t with token t+1 (the first new token after the prompt)
        paired = torch.cat((prompts.ids[1:], prompts.ids[:1]))
        paired[prompts.last] = first
        backend = PagedAttention(self.cache.layer_caches(), slot_mapping=slots, page_table=pages,
                                 seq_lens=prompts.seq_lens, cu_q_lens=prompts.cu, causal=True,
                                 max_block_rows=prompts.longest)
        return self.drafter(paired, out.layer_hidden, prompts.positions, kv=backend)

    def read_verified(self, s, out, tokens, block):
        # row j pairs the target state at start + j with the token emitted after it
        slots = block.rows(position_slots(s.draft["pages"], block.positions, self.cache.page_size))
        backend = PagedAttention(self.cache.layer_caches(), slot_mapping=slots, page_table=s.draft["pages"],
                                 seq_lens=(s.start + block.cu.diff()).to(torch.int32), cu_q_lens=block.cu,
                                 causal=True)
        return self.drafter(block.rows(tokens.clamp(min=0).to(torch.long)), out.layer_hidden,
                            block.flat_positions, kv=backend)

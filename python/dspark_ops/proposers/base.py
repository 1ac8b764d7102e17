"""The drafting strategy interface: what the engine asks of a drafting method, and what it hands it.

The engine knows a strategy only through :class:`Proposer`: how many drafts a block holds, which target
layers it reads, its per-slot state, its KV pages per request, and four calls: ``prefill`` (a batch of
prompts joined), ``propose`` (draft a block for every slot), ``draft_index`` (how ``verify`` reads the draft
distributions) and ``extend`` (the verified tokens stayed: the strategy's context follows them). Everything
else (its caches, its drafter's heads, its draft vocabulary) is the strategy's own. A new method plugs in by
subclassing :class:`Proposer` and registering it for its drafter class (``dspark_ops.proposers``).
"""
from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING

import torch

from ..kv_cache import PagedKVCache
from ..linear_plan import pack_linear_layers, storage_dtype

if TYPE_CHECKING:
    from ..engine.slots import SlotState
    from ..models.llama import LlamaModel, LlamaOutput


@dataclasses.dataclass
class PromptBatch:
    """The prompts of one batched prefill, flattened: every prompt a causal block over its own, empty, cache."""

    request_ids: list[int]
    ids: torch.Tensor          # int64 [N]: the prompts' tokens, concatenated
    positions: torch.Tensor    # int64 [N]
    cu: torch.Tensor           # int32 [P + 1]: each prompt's first row
    seq_lens: torch.Tensor     # int32 [P]
    last: torch.Tensor         # int64 [P]: each prompt's last row
    longest: int               # tokens of the longest prompt


@dataclasses.dataclass
class VerifyBlock:
    """The verify block of every slot, [anchor, x_1..x_G] at positions start.., as the target forwards it:
    every row at fixed shapes (CUDA graphs), else only the rows up to each slot's scheduled length."""

    positions: torch.Tensor             # int64 [B, G1]
    counts: torch.Tensor                # [B]: rows forwarded per slot
    row_mask: torch.Tensor | None       # bool [B, G1]: the forwarded rows (None: all)
    cu: torch.Tensor                    # int32 [B + 1]
    seq_lens: torch.Tensor              # int32 [B]: context after the block
    row_of: torch.Tensor                # int64 [B, G1]: forwarded row of each block row (past a slot's block:
                                        # its last row again; verify never reads those)
    flat_positions: torch.Tensor        # int64 [N]: positions of the forwarded rows

    @classmethod
    def build(cls, start: torch.Tensor, lengths: torch.Tensor, G1: int, *, fixed_shapes: bool) -> "VerifyBlock":
        arange = torch.arange(G1, device=start.device)
        positions = start.unsqueeze(1) + arange
        counts = torch.full_like(lengths, G1) if fixed_shapes else lengths + 1
        row_mask = None if fixed_shapes else arange < counts.unsqueeze(1)
        cu = torch.cat((counts.new_zeros(1), counts.cumsum(0))).to(torch.int32)
        row_of = cu[:-1].to(torch.long).unsqueeze(1) + torch.minimum(arange, (counts - 1).to(torch.long).unsqueeze(1))
        flat_positions = positions.reshape(-1) if row_mask is None else positions[row_mask]
        return cls(positions, counts, row_mask, cu, (start + counts).to(torch.int32), row_of, flat_positions)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """[B, G1, ...] -> the forwarded rows [N, ...]."""
        return x.reshape(-1, *x.shape[2:]) if self.row_mask is None else x[self.row_mask]


class Proposer(abc.ABC):
    """A drafting method as the engine drives it.

    Attributes:
      block_size: drafts per block (0: the strategy never drafts).
      cache_rows: K/V rows past a request's context that a drafting step writes in the strategy's cache
        (the engine reserves max(block_size + 1, cache_rows) per request beyond its lifetime).
      hidden_layers: target layers whose hidden states the strategy reads (``out.layer_hidden``); None: none.
      has_confidence: whether ``propose`` returns confidences (what the confidence schedulers need).
    """

    block_size: int = 0
    cache_rows: int = 0
    hidden_layers: list[int] | None = None
    has_confidence: bool = False
    cache: PagedKVCache | None = None   # the drafter's KV cache, where the strategy has one

    def setup_cache(self, num_pages: int, page_size: int, pages_per_request: int) -> None:
        """Make the strategy's KV caches (the engine's page budget: the target cache's)."""

    def slot_state(self, max_batch: int) -> dict[str, torch.Tensor]:
        """The strategy's per-slot tensors (max_batch rows each), kept in ``SlotState.draft``."""
        return {}

    def reserve(self, request_id: int, tokens: int, prompt_len: int) -> torch.Tensor | None:
        """Pages of a request's lifetime (``tokens`` positions); returns the prompt's slots (handed back to
        ``prefill``). Raises OutOfPagesError with nothing reserved."""
        return None

    def free(self, request_id: int) -> None:
        """Return a finished request's pages."""

    def reserve_padding(self, request_id: int, rows: int) -> dict[str, torch.Tensor]:
        """Pages the padding slots write into: a page-table row per page table in ``slot_state``, by name."""
        return {}

    def pack_linear(self) -> dict | None:
        """Route the drafter's CPU projections through ``dspark_ops.linear``; returns the plan's summary."""
        return None

    def prefill(self, s: "SlotState", prompts: PromptBatch, out: "LlamaOutput", first: torch.Tensor,
                slots: list[torch.Tensor | None]) -> None:
        """The prompts joined in slots ``s`` (a span of the engine's state): take in their context.
        ``first``: each prompt's first new token; ``slots``: what ``reserve`` returned for each."""

    @abc.abstractmethod
    def propose(self, s: "SlotState") -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Draft a block for every slot of ``s``: (drafts [B, G] int32 target ids, their distributions [B, G, V]
        (or over a draft vocabulary, see ``draft_index``), confidences [B, G] or None)."""

    def draft_index(self, draft_probs: torch.Tensor | None) -> torch.Tensor | None:
        """verify's map from target ids to the columns of ``draft_probs`` (None: they are over every id)."""
        return None

    def extend(self, s: "SlotState", out: "LlamaOutput", tokens: torch.Tensor, block: VerifyBlock,
               last_row: torch.Tensor, advanced: torch.Tensor) -> None:
        """After verify: the slots' contexts gained the verified rows of ``block`` (``tokens`` [B, G1]: what
        verify emitted; ``last_row``: the forwarded row of each slot's new anchor position minus one;
        ``advanced``: slots that kept any row)."""


class DrafterProposer(Proposer):
    """What the drafter-based strategies share: the drafter's paged KV cache, its per-slot page table (and the
    hidden state it carries between steps, where it does), its draft vocabulary and its Markov weights."""

    def __init__(self, target: "LlamaModel", drafter, *, block_size: int, native_block_size: int,
                 draft_vocab: bool, carries_hidden: bool):
        drafter.config.validate_against(target.config)
        if drafter.target is not target:
            raise ValueError("the drafter is bound to a different target model")
        if not 1 <= block_size <= min(15, native_block_size):
            raise ValueError(f"block_size must be in [1, {min(15, native_block_size)}] for this drafter, "
                             f"got {block_size}")
        self.target, self.drafter, self.device = target, drafter, target.device
        self.block_size = block_size
        self.hidden_layers = list(drafter.config.target_layer_ids)
        self.carries_hidden = carries_hidden
        vocab = drafter.draft_vocab if draft_vocab else None
        self.vocab = None if vocab is None else vocab.to(self.device)
        # The drafter scores its draft vocabulary's rows of the LM head (None: the target's whole head).
        self.draft_head = None if vocab is None else vocab.lm_head(target.lm_head_weight.detach())
        V = target.config.vocab_size
        markov = self.markov_weights()
        if markov is None:
            markov = (torch.zeros(V, 0, dtype=target.dtype), torch.zeros(0, V, dtype=target.dtype))
        if vocab is not None:
            markov = vocab.markov(*markov)
        # markov_sample reads W2 once per block position: kept as narrow as is exact (bf16 checkpoints: bf16)
        self.markov = tuple(w.detach().to(self.device, storage_dtype(w)) for w in markov)

    def markov_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The drafter's Markov head (W1 [V, r], W2 [r, V]) over every id; None: rank 0."""
        return None

    def setup_cache(self, num_pages: int, page_size: int, pages_per_request: int) -> None:
        layers, heads, dim = self.drafter.kv_cache_shape()
        self.cache = PagedKVCache(layers, num_pages, page_size, heads, dim, self.drafter.dtype, self.device,
                                  max_pages_per_request=pages_per_request)

    def slot_state(self, max_batch: int) -> dict[str, torch.Tensor]:
        state = {"pages": torch.full((max_batch, self.cache.max_pages_per_request), -1, dtype=torch.int32,
                                     device=self.device)}
        if self.carries_hidden:   # [M, d]: what the drafter carries from one step to the next
            state["hidden"] = torch.zeros(max_batch, self.drafter.config.backbone.hidden_size,
                                          dtype=self.drafter.dtype, device=self.device)
        return state

    def reserve(self, request_id: int, tokens: int, prompt_len: int) -> torch.Tensor:
        return self.cache.reserve(request_id, tokens)[:prompt_len]

    def free(self, request_id: int) -> None:
        self.cache.free(request_id)

    def reserve_padding(self, request_id: int, rows: int) -> dict[str, torch.Tensor]:
        self.cache.reserve(request_id, rows)
        return {"draft.pages": self.cache.page_table([request_id], width=self.cache.max_pages_per_request)[0]}

    def pack_linear(self) -> dict:
        extra = () if self.draft_head is None else (self.draft_head,)
        return pack_linear_layers(self.drafter, extra=extra).summary()

    def prefill(self, s, prompts, out, first, slots) -> None:
        pages = self.cache.page_table(prompts.request_ids, width=self.cache.max_pages_per_request)
        carried = self.read_prompts(prompts, out, first, torch.cat(slots), pages)
        if self.carries_hidden:   # the row of each prompt's last position
            s.draft["hidden"].copy_(carried[prompts.last])
        s.draft["pages"].copy_(pages)

    def extend(self, s, out, tokens, block, last_row, advanced) -> None:
        carried = self.read_verified(s, out, tokens, block)
        if self.carries_hidden:   # the row of the position before the new anchor
            hidden = s.draft["hidden"]
            hidden.copy_(torch.where(advanced.unsqueeze(1), carried[last_row], hidden))

    @abc.abstractmethod
    def read_prompts(self, prompts: PromptBatch, out, first: torch.Tensor, slots: torch.Tensor,
                     pages: torch.Tensor) -> torch.Tensor:
        """Write the prompts' context into the drafter's cache; returns what it carries per row [N, d]."""

    @abc.abstractmethod
    def read_verified(self, s, out, tokens: torch.Tensor, block: VerifyBlock) -> torch.Tensor:
        """Write the verified rows' context into the drafter's cache (all forwarded rows are written; those
        past the accepted ones lie past the new context and are overwritten before they are read); returns
        what it carries per forwarded row."""

    def draft_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Target ids as ``markov_sample`` takes previous tokens (rows of its W1)."""
        return ids if self.vocab is None else self.vocab.position[ids.long()]

    def target_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """markov_sample's draws (draft-vocabulary indices) as target ids; -1 (an invalid row) stays."""
        if self.vocab is None:
            return tokens
        ids = self.vocab.ids[tokens.long().clamp(min=0)].to(torch.int32)
        return torch.where(tokens >= 0, ids, tokens)

    def draft_index(self, draft_probs: torch.Tensor | None) -> torch.Tensor | None:
        return None if draft_probs is None or self.vocab is None else self.vocab.index

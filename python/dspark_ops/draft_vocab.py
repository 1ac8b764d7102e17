"""Draft vocabularies: the drafter proposes only the K most frequent target tokens.

Scoring every draft position against the full vocabulary is most of a small
drafter's cost (SmolLM2's LM head is 49152 x 576: 113 MB of fp32 per pass,
read again by the Markov head's [r, V] W2). Restricting the proposals to the K
ids that cover most of the text (EAGLE-3's ``d2t``, FR-Spec) cuts both by V/K.
It stays lossless: the draft distribution q is zero outside the K ids and
``verify`` accepts with min(1, p/q) and resamples from (p - q)+ over the full
vocabulary, so every target token can still be emitted; only the chance that
a rare token is *drafted* is lost.

The ids are stored with the drafter (``draft_vocab.safetensors``, written by
``dspark train-draft`` from its training data's token counts); the engine maps
between draft and target ids around ``markov_sample``. By default training is
unchanged: the drafter learns every id, and the restriction renormalises its
distribution over the K ids at inference; ``dspark train-draft
--train-on-draft-vocab`` trains over the K ids themselves (exact
inference-time losses, V/K times less vocabulary-sized work per step).
"""
from __future__ import annotations

import collections
import copy
from pathlib import Path
from typing import Iterable, Sequence

import torch

FILE = "draft_vocab.safetensors"


def frequency_ranked(token_lists: Iterable[Sequence[int]], vocab_size: int, size: int) -> torch.Tensor:
    """The ``size`` most frequent ids of ``token_lists`` (ties and unseen ids by lower id: byte-pair ids are
    roughly in merge order, i.e. by frequency in the tokenizer's corpus), sorted ascending, int64."""
    if not 1 <= size <= vocab_size:
        raise ValueError(f"draft vocabulary size must be in [1, {vocab_size}], got {size}")
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for token, n in collections.Counter(t for tokens in token_lists for t in tokens).items():
        if not 0 <= token < vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary [0, {vocab_size})")
        counts[token] = n
    # Stable sort of -count keeps ascending ids within equal counts.
    order = torch.sort(-counts, stable=True).indices
    return torch.sort(order[:size]).values


class DraftVocab:
    """K drawable target ids and the maps ``markov_sample`` needs.

    Draft index i < K is target id ``ids[i]``. ``markov_sample`` looks a
    previous token up in W1, and the anchor can be any target id, so W1's rows
    are reordered as ``order`` = (the K ids, then every other id) and a target
    id x enters as ``position[x]`` (its row in that order). ``index`` ([V]
    int32: ``position[x]`` for drawable ids, -1 for the rest) is ``verify``'s
    ``draft_index``: it reads the [..., K] draft distributions directly.
    """

    def __init__(self, ids: torch.Tensor, vocab_size: int):
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1).cpu()
        K = ids.numel()
        if K == 0 or K > vocab_size:
            raise ValueError(f"a draft vocabulary needs 1..{vocab_size} ids, got {K}")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise ValueError(f"draft vocabulary ids must be in [0, {vocab_size})")
        if torch.unique(ids).numel() != K:
            raise ValueError("draft vocabulary ids must be distinct")
        rest = torch.ones(vocab_size, dtype=torch.bool)
        rest[ids] = False
        self.vocab_size = vocab_size
        self.ids = ids
        self.order = torch.cat([ids, rest.nonzero()[:, 0]])
        self.position = torch.empty_like(self.order)
        self.position[self.order] = torch.arange(vocab_size)
        self.index = torch.where(self.position < K, self.position, -1).to(torch.int32)

    def __len__(self) -> int:
        return self.ids.numel()

    def to(self, device) -> "DraftVocab":
        """A copy with its maps on ``device``."""
        moved = copy.copy(self)
        for name in ("ids", "order", "position", "index"):
            setattr(moved, name, getattr(self, name).to(device))
        return moved

    def lm_head(self, weight: torch.Tensor) -> torch.Tensor:
        """The K rows of a [V, d] LM head that score the drawable ids."""
        return weight.index_select(0, self.ids.to(weight.device)).contiguous()

    def markov(self, w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W1 [V, r] rows in ``order``, W2 [r, K] columns of the drawable ids)."""
        return (w1.index_select(0, self.order.to(w1.device)).contiguous(),
                w2.index_select(1, self.ids.to(w2.device)).contiguous())

    def shared_row_ids(self) -> torch.Tensor:
        """[V]: each drawable id itself, every other id ``order[K]`` (the first id outside the vocabulary).

        A Markov W1 looked up through this map is trained with one row shared by every id outside the
        vocabulary, so it can be stored as its K + 1 rows ``order[:K + 1]``."""
        if len(self) == self.vocab_size:
            raise ValueError("the draft vocabulary holds every id: no id is left to share a row")
        return torch.where(self.position < len(self), torch.arange(self.vocab_size, device=self.position.device),
                           self.order[len(self)])

    def save(self, folder) -> None:
        from safetensors.torch import save_file
        save_file({"ids": self.ids.contiguous()}, str(Path(folder) / FILE))

    @classmethod
    def load(cls, folder, vocab_size: int) -> "DraftVocab | None":
        """The folder's draft vocabulary, or None when it has none (the drafter proposes any id)."""
        path = Path(folder) / FILE
        if not path.exists():
            return None
        from safetensors.torch import load_file
        try:
            return cls(load_file(str(path))["ids"], vocab_size)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: not a draft vocabulary for a {vocab_size}-id target ({e})") from None

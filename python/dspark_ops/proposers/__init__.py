"""Drafting strategies: how each kind of drafter proposes blocks, one module per method.

``make_proposer(target, drafter, ...)`` picks the strategy registered for the drafter's class (None: no
drafting). A new method registers its :class:`Proposer` subclass with :func:`register_proposer`; the engine
needs no change.
"""
from __future__ import annotations

from .base import DrafterProposer, PromptBatch, Proposer, VerifyBlock
from .dspark import DSparkProposer
from .eagle3 import Eagle3Proposer
from .none import NoProposer
from ..models.drafter import DSparkDrafter, Eagle3Drafter

# drafter class -> the strategy that drives it (a subclass of a registered class uses its parent's strategy)
_REGISTRY: dict[type, type[Proposer]] = {DSparkDrafter: DSparkProposer, Eagle3Drafter: Eagle3Proposer}


def register_proposer(drafter_class: type, proposer_class: type[Proposer]) -> None:
    """Drive drafters of ``drafter_class`` with ``proposer_class(target, drafter, block_size=, draft_vocab=)``
    (``block_size``: None for the drafter's own; ``draft_vocab``: whether to use its draft vocabulary)."""
    if not (isinstance(proposer_class, type) and issubclass(proposer_class, Proposer)):
        raise TypeError(f"proposer_class must be a Proposer subclass, got {proposer_class!r}")
    _REGISTRY[drafter_class] = proposer_class


def make_proposer(target, drafter, *, block_size: int | None = None, draft_vocab: bool = True) -> Proposer:
    """The drafting strategy for ``drafter`` (bound to ``target``; None: no drafting)."""
    if drafter is None:
        return NoProposer()
    proposer_class = next((p for cls, p in _REGISTRY.items() if isinstance(drafter, cls)), None)
    if proposer_class is None:
        names = ", ".join(cls.__name__ for cls in _REGISTRY)
        raise TypeError(f"drafter must be one of {names} or None, got {type(drafter).__name__}")
    return proposer_class(target, drafter, block_size=block_size, draft_vocab=draft_vocab)


__all__ = ["DSparkProposer", "DrafterProposer", "Eagle3Proposer", "NoProposer", "PromptBatch", "Proposer",
           "VerifyBlock", "make_proposer", "register_proposer"]

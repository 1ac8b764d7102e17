"""Decode state per batch slot, on the device, and the small host-to-device helpers the engine's parts share."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class SlotState:
    """Decode state per batch slot, on the device: slot b holds ``engine.running[b]``.

    Every tensor has max_batch rows. The decode step reads and updates these in place, so a CUDA graph
    captured over the first B rows stays valid while requests come and go. Rows past the running batch are
    frozen padding (remaining = 0). ``draft`` is the drafting strategy's own per-slot state (its page table,
    what its drafter carries from one step to the next), named by the strategy; the engine moves, freezes and
    restores it with the rest without reading it.
    """

    anchor: torch.Tensor             # int64: the last emitted token, first row of the next block
    start: torch.Tensor              # int64: tokens whose K/V are cached = the anchor's position
    offset: torch.Tensor             # int64: Philox step counter
    remaining: torch.Tensor          # int32: tokens the request may still emit (0: frozen)
    temperature: torch.Tensor        # float32
    top_k: torch.Tensor              # int32
    top_p: torch.Tensor              # float32
    min_p: torch.Tensor              # float32
    seed: torch.Tensor               # int64
    target_pages: torch.Tensor       # int32 [M, W]: the request's target KV pages (-1 past them)
    conf_prev: torch.Tensor | None = None        # float32 [M, G]: confidences of the last step (async scheduler)
    conf_old: torch.Tensor | None = None         # ... of the step before (what async capacity is planned from)
    draft: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @classmethod
    def allocate(cls, M: int, width: int, *, async_conf: int, draft: dict[str, torch.Tensor],
                 device) -> "SlotState":
        def z(*shape, dt=torch.int64):
            return torch.zeros(shape, dtype=dt, device=device)

        return cls(anchor=z(M), start=z(M), offset=z(M), remaining=z(M, dt=torch.int32),
                   temperature=z(M, dt=torch.float32), top_k=z(M, dt=torch.int32), top_p=z(M, dt=torch.float32) + 1,
                   min_p=z(M, dt=torch.float32), seed=z(M), target_pages=z(M, width, dt=torch.int32) - 1,
                   conf_prev=z(M, async_conf, dt=torch.float32) + 1 if async_conf else None,
                   conf_old=z(M, async_conf, dt=torch.float32) + 1 if async_conf else None, draft=draft)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by name (the strategy's as ``draft.<name>``)."""
        own = {f.name: t for f in dataclasses.fields(self)
               if f.name != "draft" and (t := getattr(self, f.name)) is not None}
        return own | {f"draft.{name}": t for name, t in self.draft.items()}

    def span(self, lo: int, hi: int) -> "SlotState":
        """Views of slots lo..hi-1 (same storage: in-place updates reach the engine's state)."""
        own = {f.name: t[lo:hi] for f in dataclasses.fields(self)
               if f.name != "draft" and (t := getattr(self, f.name)) is not None}
        return SlotState(**own, draft={name: t[lo:hi] for name, t in self.draft.items()})

    def rows(self, B: int) -> "SlotState":
        """Views of the first B slots."""
        return self.span(0, B)

    def keep(self, slots: list[int]) -> None:
        """Move the rows of ``slots`` (in order) to the front, on the device."""
        index = to_device(slots, torch.long, self.anchor.device)
        for t in self.tensors().values():
            t[:len(slots)] = t[index]

    def freeze(self, first: int, pad_pages: dict[str, torch.Tensor]) -> None:
        """Make slots first.. padding: no budget, position 0, writing into the pad pages (``pad_pages``: a page
        table row per page-table tensor, by its name in :meth:`tensors`; none: the pages stay)."""
        self.remaining[first:] = 0
        self.start[first:] = 0
        self.anchor[first:] = 0
        tensors = self.tensors()
        for name, row in pad_pages.items():
            tensors[name][first:] = row

    def join(self, first: torch.Tensor, context: torch.Tensor, remaining: torch.Tensor,
             sampling: dict[str, torch.Tensor], target_pages: torch.Tensor) -> None:
        """Requests that just joined (these slots): their first token is the anchor, ``context`` tokens are
        cached, their sampling parameters and pages; nothing is known yet of their confidences."""
        self.anchor.copy_(first)
        self.start.copy_(context)
        self.offset.fill_(1)
        self.remaining.copy_(remaining)
        for name, value in sampling.items():
            getattr(self, name).copy_(value)
        self.target_pages.copy_(target_pages)
        if self.conf_prev is not None:
            self.conf_prev.fill_(1.0)
            self.conf_old.fill_(1.0)

    def push_confidence(self, confidence: torch.Tensor | None) -> None:
        """A step's confidences become the last step's, and those the step before's (async scheduler);
        None (a plain step): nothing known, as for a request that just joined."""
        if self.conf_prev is None:
            return
        self.conf_old.copy_(self.conf_prev)
        if confidence is None:
            self.conf_prev.fill_(1.0)
        else:
            self.conf_prev.copy_(confidence)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in self.tensors().items()}

    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        for name, t in self.tensors().items():
            t.copy_(saved[name])


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on the device without blocking the host on CUDA (pinned staging copy)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)

"""The decode step captured as a CUDA graph, once per (batch bucket, drafting or plain)."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .slots import SlotState


class StepGraphs:
    """Replays ``decode(B, drafting)`` from a CUDA graph captured at its first call for that (B, drafting).

    The step reads and writes only the slot state and the caches, so a graph stays valid while requests come
    and go; its packed output buffer is overwritten by the next replay."""

    def __init__(self, decode: Callable[[int, bool], torch.Tensor], slots: SlotState, device: torch.device):
        self.decode, self.slots, self.device = decode, slots, device
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None   # the memory pool the graphs share, made at the first capture

    def run(self, B: int, drafting: bool) -> torch.Tensor:
        if (B, drafting) not in self.graphs:
            self.graphs[B, drafting] = self.capture(B, drafting)
        graph, packed = self.graphs[B, drafting]
        graph.replay()
        return packed

    def capture(self, B: int, drafting: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """A CUDA graph of the decode step over the first B slots."""
        self.warm_up(B, drafting)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            packed = self.decode(B, drafting)
        return graph, packed

    def warm_up(self, B: int, drafting: bool) -> None:
        """Run the step once before capturing it (lazy initialisation; on a side stream on CUDA, as capture
        wants), then undo it: the slot state is restored, and its K/V writes lie past every context."""
        saved = self.slots.snapshot()
        side = torch.cuda.Stream() if self.device.type == "cuda" else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            self.decode(B, drafting)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        self.slots.restore(saved)

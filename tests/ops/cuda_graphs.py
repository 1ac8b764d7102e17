"""CUDA-graph capture for the op tests (imported only by tests that run on a GPU)."""
from __future__ import annotations

import torch


def capture(fn):
    """Run ``fn`` once on a side stream (the warm-up capture needs), then capture it: (graph, fn's outputs).

    Replaying the graph re-runs ``fn`` on the same input and output buffers; tests change the inputs in
    place between replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out

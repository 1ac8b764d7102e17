"""Loads the compiled kernels (``torch.ops.dspark``) once.

``DSPARK_OPS_LIBRARY=/path/to/_C.so`` loads another build of the same library
instead (the sanitizer build in CI, or a development build).
"""
from __future__ import annotations

import functools
import json
import os

import torch


def _load() -> None:
    path = os.environ.get("DSPARK_OPS_LIBRARY")
    if path:
        torch.ops.load_library(path)
    else:
        from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)


_load()
ops = torch.ops.dspark


@functools.lru_cache(maxsize=None)
def _compiled_info() -> dict:
    return json.loads(ops.build_info())


def build_info() -> dict:
    """Version, compiled CUDA archs, CPU instruction set in use, sanitizer and OpenMP flags, and
    ``cpu_threads``: how many threads a parallel region of the CPU kernels runs on right now
    (measured inside the library; follows torch.set_num_threads)."""
    return {**_compiled_info(), "cpu_threads": int(ops.parallel_threads())}

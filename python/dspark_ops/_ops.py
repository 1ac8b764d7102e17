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
def build_info() -> dict:
    """Version, compiled CUDA archs, CPU instruction set in use, sanitizer flag."""
    return json.loads(ops.build_info())

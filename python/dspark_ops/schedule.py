"""Confidence-scheduled verification: per-request verify lengths from survival
estimates and a profiled cost curve (DSpark Algorithm 1 and its asynchronous
capacity rule), plus the profiling of that curve."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from ._ops import ops


def _confidence(confidence) -> torch.Tensor:
    if not isinstance(confidence, torch.Tensor) or not confidence.is_floating_point():
        raise TypeError("confidence must be a floating-point tensor [R, G]")
    if confidence.dim() != 2:
        raise ValueError(f"confidence must be [R, G], got {list(confidence.shape)}")
    return confidence.to(torch.float32).contiguous()


def _sps(sps_table, device: torch.device) -> torch.Tensor:
    if not isinstance(sps_table, torch.Tensor):
        sps_table = torch.tensor(list(sps_table), dtype=torch.float64)
    if sps_table.dim() != 1 or sps_table.numel() == 0:
        raise ValueError(f"sps_table must be a non-empty 1-d table (index = batch tokens), got "
                         f"{list(sps_table.shape)}")
    if not sps_table.is_floating_point():
        raise TypeError(f"sps_table must be floating point, got {sps_table.dtype}")
    if sps_table.device != device:
        if sps_table.device.type != "cpu":
            raise ValueError(f"sps_table is on {sps_table.device} but confidence is on {device}")
        sps_table = sps_table.to(device)
    return sps_table.to(torch.float64).contiguous()


def _max_len(max_len, R: int, G: int, device: torch.device):
    if max_len is None:
        return None
    if isinstance(max_len, bool) or not isinstance(max_len, (int, torch.Tensor)):
        raise TypeError("max_len must be an int or an integer tensor [R]")
    if isinstance(max_len, int):
        if not 0 <= max_len <= G:
            raise ValueError(f"max_len must lie in [0, G = {G}], got {max_len}")
        return torch.full((R,), max_len, dtype=torch.int32, device=device)
    if max_len.is_floating_point() or max_len.shape not in ((R,), ()):
        raise ValueError(f"max_len must be an integer tensor of shape [{R}], got {max_len.dtype} {list(max_len.shape)}")
    if max_len.device != device:
        raise ValueError(f"max_len is on {max_len.device} but confidence is on {device}")
    return max_len.expand(R).to(torch.int32).contiguous()


def schedule_verify_lengths(confidence: torch.Tensor, sps_table, *, mode: str = "sync", capacity=None,
                            max_len=None, check: bool = False) -> torch.Tensor:
    """How many drafted tokens each request verifies this step.

    Args:
      confidence: [R, G] calibrated per-position confidences c_{r,j} in [0, 1]
        (P(token j survives | tokens < j survived)); a_{r,j} = prod_{i<=j} c_{r,i}.
      sps_table: [N] steps per second of a verify batch of B tokens at index B
        (see profile_sps); B >= N counts as 0.
      mode: "sync": DSpark Algorithm 1: admit candidates in descending a
        (ties: lower request, then lower position) while Theta = tau * SPS(B)
        strictly improves, stopping at the first non-improvement (the break
        keeps verification lossless). "async": admit the capacity - R highest
        fresh a (capacity from plan_capacity on confidences of an earlier step).
      capacity: [1] integer tensor or int, total verify tokens (async only); >= R.
      max_len: int or [R] integer tensor, drafted tokens available per request (default G).
      check: on CUDA invalid inputs give lengths -1 instead of raising (raising needs a
        host sync); check=True syncs and raises. On CPU invalid input always raises.

    Returns:
      lengths [R] int32 on confidence's device (0..G); every request also
      verifies its bonus position, so the batch has R + sum(lengths) tokens.
    """
    conf = _confidence(confidence)
    R, G = conf.shape
    dev = conf.device
    sps = _sps(sps_table, dev)
    if mode not in ("sync", "async"):
        raise ValueError(f"mode must be 'sync' or 'async', got {mode!r}")
    cap = None
    if mode == "async":
        if capacity is None:
            raise ValueError("capacity is required in async mode (see plan_capacity)")
        if isinstance(capacity, bool) or not isinstance(capacity, (int, torch.Tensor)):
            raise TypeError("capacity must be an int or an integer tensor [1]")
        if isinstance(capacity, int):
            if capacity < R:
                raise ValueError(f"capacity = {capacity} is below the number of requests R = {R}")
            cap = torch.tensor([capacity], dtype=torch.int32, device=dev)
        else:
            if capacity.is_floating_point() or capacity.numel() != 1:
                raise ValueError(f"capacity must be a 1-element integer tensor, got {capacity.dtype} "
                                 f"{list(capacity.shape)}")
            if capacity.device != dev:
                raise ValueError(f"capacity is on {capacity.device} but confidence is on {dev}")
            cap = capacity.reshape(1).to(torch.int32)
    elif capacity is not None:
        raise ValueError("capacity is only used in async mode")
    lengths = ops.schedule_verify_lengths(conf, sps, cap, _max_len(max_len, R, G, dev))
    if check and dev.type != "cpu" and R > 0 and bool((lengths < 0).any()):
        raise ValueError("schedule_verify_lengths: invalid input (confidence outside [0, 1] or NaN, negative or "
                         "non-finite sps_table entries, max_len outside [0, G], or capacity < R)")
    return lengths


def plan_capacity(stale_confidence: torch.Tensor, sps_table, *, max_len=None, check: bool = False) -> torch.Tensor:
    """Verify capacity K (total batch tokens) for the asynchronous scheduler.

    Global argmax of Theta = tau * SPS(B) over the greedy admission path of
    `stale_confidence` (confidences from an earlier step, so no break is needed:
    they cannot leak the current tokens), ties to the smaller K. Returns [1] int32
    on the input's device; pass it as `capacity` to schedule_verify_lengths(mode="async").
    """
    conf = _confidence(stale_confidence)
    R, G = conf.shape
    dev = conf.device
    cap = ops.plan_capacity(conf, _sps(sps_table, dev), _max_len(max_len, R, G, dev))
    if check and dev.type != "cpu" and bool((cap < 0).any()):
        raise ValueError("plan_capacity: invalid input (confidence outside [0, 1] or NaN, negative or non-finite "
                         "sps_table entries, or max_len outside [0, G])")
    return cap


def profile_sps(step_fn: Callable[[int], object], max_tokens: int, *, device=None, warmup: int = 3,
                iters: int = 10) -> torch.Tensor:
    """Profile SPS(B) (verify steps per second) for B = 1..max_tokens batch tokens.

    step_fn(B) runs one verify step of B tokens. Each B gets `warmup` untimed
    calls, then the median of `iters` timed calls (CUDA events on a CUDA
    device, time.perf_counter otherwise); nothing is smoothed. Returns a
    float64 [max_tokens + 1] table on the CPU, index = B (entry 0 is 0).
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    if warmup < 0 or iters < 1:
        raise ValueError(f"need warmup >= 0 and iters >= 1, got warmup={warmup}, iters={iters}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    table = torch.zeros(max_tokens + 1, dtype=torch.float64)
    for tokens in range(1, max_tokens + 1):
        for _ in range(warmup):
            step_fn(tokens)
        seconds = []
        for _ in range(iters):
            if dev.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step_fn(tokens)
                end.record()
                end.synchronize()
                seconds.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                step_fn(tokens)
                seconds.append(time.perf_counter() - t0)
        median = statistics.median(seconds)
        table[tokens] = 1.0 / median if median > 0 else float("inf")
    if not bool(torch.isfinite(table).all()):
        raise RuntimeError("profile_sps: a step took no measurable time; make step_fn do the real work")
    return table


_FORMAT = "dspark_sps_table"


def save_sps_table(path, sps_table, **meta) -> None:
    """Write the table as JSON ({"format", "version", "sps": [...], **meta}); meta: e.g. model, device, dtype."""
    values = [float(v) for v in torch.as_tensor(sps_table, dtype=torch.float64).reshape(-1)]
    Path(path).write_text(json.dumps({"format": _FORMAT, "version": 1, "sps": values, **meta}, indent=1))


def load_sps_table(path, device=None) -> torch.Tensor:
    """Read a table written by save_sps_table as float64 [N] (on `device`, default CPU)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("sps"), list):
        raise ValueError(f"{path} is not an SPS table written by save_sps_table")
    table = torch.tensor([float(v) for v in data["sps"]], dtype=torch.float64, device=device)
    if table.numel() == 0 or not bool(torch.isfinite(table).all()) or bool((table < 0).any()):
        raise ValueError(f"{path}: the table must be non-empty, finite and >= 0")
    return table

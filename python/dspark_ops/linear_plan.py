"""Which kernel computes each of a model's projections on CPU, chosen by timing both on this machine.

The candidates are this library's small-block kernel on weights packed once (``dspark_ops.linear``: a
weight is read once for a whole block of rows, so verifying k + 1 tokens costs about one decode step) and
torch's ``F.linear`` (MKL / oneDNN). Neither wins everywhere: for one row on a CPU whose last-level cache
holds most of the weights, MKL's GEMV can be the faster one. So :func:`pack_linear_layers` times both on
the model's own weights, once per machine, for blocks of 1, 2, 4, ... 64 rows, and routes every call by
its row count (a call uses the smallest timed block height >= its rows).

Plans are cached in ``$DSPARK_HOME/linear_plan.json`` (default ``~/.cache/dspark``), keyed by the CPU,
the thread count and the torch and library versions: later runs start at once and pick the same kernels
(hence the same rounding and the same outputs). A plan measured while the machine is busy (load average
above its core count) is used but not cached. ``DSPARK_LINEAR_IMPL=packed`` or ``torch`` forces one
kernel everywhere; ``auto`` (the default) measures.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .linear import MAX_ROWS, PackedLinear, linear, linear_silu_mul, pack_linear_weight

IMPLS = ("packed", "torch")
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# torch must beat the packed kernel by this factor to be chosen: timing noise is one-sided, and a plan that
# flips between near-equal kernels from one machine to the next would only change the rounding.
TORCH_MARGIN = 0.95
_ROUNDS = 2


def requested_impl() -> str:
    """DSPARK_LINEAR_IMPL: "auto" (default), "packed" or "torch"."""
    value = (os.environ.get("DSPARK_LINEAR_IMPL") or "auto").strip().lower()
    if value not in ("auto", *IMPLS):
        raise ValueError(f"DSPARK_LINEAR_IMPL must be auto, packed or torch, got {value!r}")
    return value


def storage_dtype(w: torch.Tensor) -> torch.dtype:
    """bfloat16 when every value of fp32 ``w`` is a bfloat16 number (a model loaded from a bf16 checkpoint),
    else w's dtype: the kernels widen bf16 to fp32 exactly, so the results are bit-identical for half the bytes."""
    if w.dtype == torch.float32 and torch.equal(w.detach().to(torch.bfloat16).float(), w.detach()):
        return torch.bfloat16
    return w.dtype


def shape_key(p: PackedLinear) -> str:
    """What a plan is keyed by: in -> out, gate/up fusion, storage dtype."""
    return f"{p.in_features}->{p.out_features}{' gate_up' if p.gate_up else ''} {str(p.dtype)[6:]}"


@dataclasses.dataclass(frozen=True)
class LinearPlan:
    """The kernel for each weight shape (:func:`shape_key`) and block height (ROW_BUCKETS)."""

    choices: dict[str, tuple[str, ...]]
    source: str    # "measured", "cached" or "DSPARK_LINEAR_IMPL=<impl>"

    def packed_by_rows(self, key: str) -> list[bool]:
        """[rows] -> True where a call of that many rows (0..MAX_ROWS) takes the packed kernel."""
        per_bucket = self.choices[key]
        out = []
        for rows in range(MAX_ROWS + 1):
            bucket = next(i for i, b in enumerate(ROW_BUCKETS) if b >= max(rows, 1))
            out.append(per_bucket[bucket] == "packed")
        return out

    def summary(self) -> dict:
        """{shape: {rows: kernel}} and where the plan came from (for engine stats and `dspark info`)."""
        return {"source": self.source,
                "choices": {k: dict(zip(ROW_BUCKETS, v)) for k, v in sorted(self.choices.items())}}


def machine_key() -> str:
    from . import __version__, build_info
    from .machine import describe

    d = describe(measure=False)
    return (f"{d['cpu']} ({d['cpu_family_model']}), {d['cores']} cores, {torch.get_num_threads()} threads, "
            f"{build_info()['cpu_isa']}, torch {torch.__version__}, dspark_ops {__version__}")


def plan_path() -> Path:
    return Path(os.environ.get("DSPARK_HOME") or Path.home() / ".cache" / "dspark") / "linear_plan.json"


def cached_choices() -> dict[str, list[str]]:
    """This machine's cached plan: {shape: kernel per ROW_BUCKETS entry} (empty if never measured here)."""
    return _load_cached()


def _load_cached() -> dict:
    try:
        return json.loads(plan_path().read_text()).get(machine_key(), {})
    except (OSError, ValueError, AttributeError):
        return {}


def _save_cached(choices: dict[str, tuple[str, ...]]) -> None:
    path = plan_path()
    try:
        everything = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(everything, dict):
            everything = {}
    except (OSError, ValueError):
        everything = {}
    entry = everything.setdefault(machine_key(), {})
    entry.update({k: list(v) for k, v in choices.items()})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(everything, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only costs measuring again next time


def time_impls(calls: dict[str, Callable[[], object]], rounds: int = _ROUNDS) -> dict[str, float]:
    """Best time of each callable over ``rounds`` turns (after one warm-up call each), taking turns so that
    both see the same machine load."""
    for fn in calls.values():
        fn()
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def measure(weights: dict[str, list[tuple[torch.Tensor, PackedLinear]]]) -> dict[str, tuple[str, ...]]:
    """The faster kernel per shape and block height, timed over every weight of that shape (a forward
    streams each layer's weights once, so this is what the model's calls see)."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    with torch.inference_mode():
        for key, items in weights.items():
            in_features, gate_up = items[0][1].in_features, items[0][1].gate_up
            row = []
            for rows in ROW_BUCKETS:
                x = torch.randn(rows, in_features, generator=gen)

                def packed(x=x):
                    for _, p in items:
                        linear_silu_mul(x, p) if gate_up else linear(x, p)

                def reference(x=x):
                    for w, _ in items:
                        y = F.linear(x, w)
                        if gate_up:
                            gate, up = y.chunk(2, dim=-1)
                            F.silu(gate) * up

                t = time_impls({"packed": packed, "torch": reference})
                row.append("torch" if t["torch"] < TORCH_MARGIN * t["packed"] else "packed")
            out[key] = tuple(row)
    return out


def _machine_quiet() -> bool:
    """Load average at most the core count: timings mean something."""
    try:
        return os.getloadavg()[0] <= len(os.sched_getaffinity(0)) + 0.5
    except (OSError, AttributeError):
        return True


_PROCESS_PLANS: dict[str, tuple[str, ...]] = {}   # measured or read in this process: one choice per shape


def plan_for(weights: dict[str, list[tuple[torch.Tensor, PackedLinear]]]) -> LinearPlan:
    """The plan for these packed weights: forced, cached (this process, then $DSPARK_HOME), or measured."""
    impl = requested_impl()
    if impl != "auto":
        return LinearPlan({k: (impl,) * len(ROW_BUCKETS) for k in weights}, f"DSPARK_LINEAR_IMPL={impl}")
    missing = [k for k in weights if k not in _PROCESS_PLANS]
    source = "cached"
    if missing:
        cached = _load_cached()
        for k in missing:
            v = cached.get(k)
            if isinstance(v, list) and len(v) == len(ROW_BUCKETS) and set(v) <= set(IMPLS):
                _PROCESS_PLANS[k] = tuple(v)
        to_measure = {k: weights[k] for k in missing if k not in _PROCESS_PLANS}
        if to_measure:
            quiet = _machine_quiet()
            measured = measure(to_measure)
            _PROCESS_PLANS.update(measured)
            if quiet and _machine_quiet():
                _save_cached(measured)
            source = "measured" if quiet else "measured on a busy machine (not cached)"
    return LinearPlan({k: _PROCESS_PLANS[k] for k in weights}, source)


def pack_linear_layers(model: torch.nn.Module, extra: Sequence[torch.Tensor] = ()) -> LinearPlan:
    """Route ``model``'s projections (and the ``extra`` weights passed to its hook) through the kernel the
    plan picks for their shape and row count, on weights packed once (CPU, fp32 activations).

    The MLP's gate/up product uses the fused silu(gate) * up epilogue when packed. Calls with more than
    linear.MAX_ROWS rows (long prompts) go to torch's matmul on the original weight, what MKL is good at.
    Returns the plan (the engine reports it in its stats).
    """
    def pack(w, gate_up=False):
        return pack_linear_weight(w.detach(), storage_dtype(w), gate_up=gate_up)

    gate_up = {id(p): (p, pack(p, gate_up=True)) for name, p in model.named_parameters()
               if name.endswith("gate_up_proj.weight")}
    packed = {id(p): (p, pack(p)) for name, p in model.named_parameters()
              if p.dim() == 2 and name.endswith(".weight") and "embed_tokens" not in name and id(p) not in gate_up}
    heads = (model.lm_head_weight,) if hasattr(model, "lm_head_weight") else ()
    for w in (*heads, *extra):
        if id(w) not in packed:
            packed[id(w)] = (w, pack(w))
    by_shape: dict[str, list[tuple[torch.Tensor, PackedLinear]]] = {}
    for w, p in (*packed.values(), *gate_up.values()):
        by_shape.setdefault(shape_key(p), []).append((w.detach(), p))
    plan = plan_for(by_shape)
    # Per weight: [rows] -> packed kernel or not, looked up once here (the hook runs ~10^3 times per step).
    route = {key: plan.packed_by_rows(key) for key in by_shape}
    linear_route = {i: (p, route[shape_key(p)]) for i, (_, p) in packed.items()}
    gate_up_route = {i: (p, route[shape_key(p)]) for i, (_, p) in gate_up.items()}

    def fn(x, weight, bias):
        entry = linear_route.get(id(weight))
        if entry is not None and x.dtype == torch.float32:
            rows = x.numel() // x.shape[-1]
            if rows <= MAX_ROWS and entry[1][rows]:
                return linear(x, entry[0], bias)
        return F.linear(x, weight, bias)

    def silu_mul_fn(x, weight, bias):
        entry = gate_up_route.get(id(weight))
        if entry is not None and bias is None and x.dtype == torch.float32:
            rows = x.numel() // x.shape[-1]
            if rows <= MAX_ROWS and entry[1][rows]:
                return linear_silu_mul(x, entry[0])
        gate, up = F.linear(x, weight, bias).chunk(2, dim=-1)
        return F.silu(gate) * up

    model.linear_impl.fn = fn
    model.linear_impl.silu_mul_fn = silu_mul_fn
    return plan

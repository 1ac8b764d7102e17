"""What machine a result was measured on: CPU model, instruction sets, cores, caches, and the memory
bandwidth one thread and all threads actually get (measured, not taken from a data sheet).

Every benchmark prints :func:`machine_header` first: a figure from one CPU says little about another
(a 2-core AMD Zen 4 saturates memory with one core; an Intel Xeon with a 480 MiB L3 keeps most of a
small model's weights in cache). ``dspark info --machine`` prints the same header.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import time
from pathlib import Path

import torch

# Instruction sets that decide which kernels and dtypes pay on a CPU (as /proc/cpuinfo spells them).
_ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "bf16")


def _cpuinfo() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block describes them all
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _caches() -> list[tuple[int, str, int, int]]:
    """(level, type, bytes per instance, instances) for cpu0's caches, from sysfs."""
    out = []
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for index in sorted(root.glob("index*")):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
            shared = (index / "shared_cpu_list").read_text().strip()
        except (OSError, ValueError):
            continue
        nbytes = int(size.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
        sharing = sum((int(b) - int(a) + 1) if "-" in part else 1
                      for part in shared.split(",") for a, _, b in [part.partition("-")])
        out.append((level, kind, nbytes, max(1, -(-cpus // max(1, sharing)))))
    return out


def last_level_cache_bytes() -> int:
    caches = _caches()
    return max((c[2] for c in caches), default=32 << 20)


@contextlib.contextmanager
def at_threads(n: int):
    """torch's intra-op threads (and so this library's CPU kernels) set to ``n`` inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def thread_counts(spec: str = "1,all") -> list[int]:
    """Thread counts to measure at: "1,all" -> [1, N] (N = torch's threads; one entry when N = 1)."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        n = torch.get_num_threads() if part == "all" else int(part)
        if n < 1:
            raise ValueError(f"thread counts must be >= 1 or 'all', got {part!r}")
        if n not in out:
            out.append(n)
    return out


@functools.lru_cache(maxsize=None)
def stream_bandwidth(threads: int) -> float:
    """Bytes/s of a streaming read (torch.sum over fp32 data four times the last-level cache, at least
    256 MiB), best of five passes on ``threads`` threads: the floor a weight-streaming kernel meets."""
    n = max(4 * last_level_cache_bytes(), 256 << 20) // 4
    data = torch.ones(n, dtype=torch.float32)
    best = float("inf")
    with at_threads(threads):
        data.sum()
        for _ in range(5):
            t0 = time.perf_counter()
            data.sum()
            best = min(best, time.perf_counter() - t0)
    return n * 4 / best


def describe(measure: bool = True) -> dict:
    """The machine as a dict (``measure=False`` skips the bandwidth passes, about a second)."""
    info = _cpuinfo()
    flags = set(info.get("flags", info.get("Features", "")).split())
    threads = torch.get_num_threads()
    d = {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_family_model": f"family {info.get('cpu family', '?')} model {info.get('model', '?')}",
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa": [f for f in _ISA_FLAGS if f in flags],
        "caches": [{"level": lvl, "type": kind, "bytes": size, "instances": inst}
                   for lvl, kind, size, inst in _caches()],
        "torch": torch.__version__,
        "torch_threads": threads,
    }
    if measure:
        d["stream_read_GBps"] = {n: round(stream_bandwidth(n) / 1e9, 1) for n in thread_counts("1,all")}
    return d


def _cache_text(caches: list[dict]) -> str:
    def size(n):
        return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"
    parts = []
    for c in caches:
        if c["type"] == "Instruction":
            continue
        name = f"L{c['level']}" + ("d" if c["type"] == "Data" else "")
        parts.append(f"{name} {size(c['bytes'])}" + (f" x{c['instances']}" if c["instances"] > 1 else ""))
    return ", ".join(parts) or "unknown"


def machine_header(measure: bool = True) -> str:
    """Markdown lines naming the machine, for the top of a result table."""
    d = describe(measure)
    from . import build_info

    lines = [f"# machine: {d['cpu']} ({d['cpu_family_model']}), {d['cores']} cores; "
             f"ISA {' '.join(d['isa']) or 'baseline'}; caches {_cache_text(d['caches'])}"]
    if measure:
        bw = ", ".join(f"{n} thread{'s' if n > 1 else ''} {gbps} GB/s" for n, gbps in d["stream_read_GBps"].items())
        lines.append(f"# streaming read bandwidth (torch.sum, 4x LLC): {bw}")
    info = build_info()
    lines.append(f"# torch {d['torch']}, {d['torch_threads']} intra-op threads; dspark_ops kernels "
                 f"{info['cpu_isa']}, on {info['cpu_threads']} threads")
    return "\n".join(lines)

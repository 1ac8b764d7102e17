"""The JSON file a GPU benchmark writes with ``--json PATH``: the device (name, SMs, memory, the clocks
nvidia-smi reads at the start, a device-to-device copy bandwidth measured in the same run as the ceiling for
the achieved bandwidths), the software, and every row the benchmark prints, as numbers. The file is
rewritten after each row, so a run cut short keeps what it measured."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

import dspark_ops

SMI_FIELDS = ["name", "driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem", "power.draw",
              "temperature.gpu"]


def nvidia_smi() -> dict:
    """The GPU's clocks (MHz), power and temperature now, as nvidia-smi reports them ({} without it)."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader,nounits",
                              "--id=0"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(zip(SMI_FIELDS, (v.strip() for v in out.strip().split(","))))


def event_time(fn, repeat: int, warmup: int = 2) -> float:
    """Median seconds of fn() on the current stream, timed with CUDA events (no host time inside)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 1 << 30, repeat: int = 10) -> float:
    """Device-to-device copy of `nbytes`, bytes read plus written per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / event_time(lambda: dst.copy_(src), repeat) / 1e9


def device_record() -> dict:
    p = torch.cuda.get_device_properties(0)
    try:
        import flashinfer
        fi = getattr(flashinfer, "__version__", "importable")
    except ImportError:
        fi = None
    return {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1), "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
            "nvidia_smi": nvidia_smi(), "copy_GBps": round(copy_bandwidth_gbs(), 1), "torch": torch.__version__,
            "cuda": torch.version.cuda, "dspark_ops": dspark_ops.build_info(), "flashinfer": fi}


class Recorder:
    """Rows of one benchmark run; writes the file at `path` (None: nothing) after every row."""

    def __init__(self, path: str | None, bench: str):
        self.path = None if path is None else Path(path)
        self.record = {"bench": bench, "argv": sys.argv[1:], "device": None, "rows": []}
        if self.path is not None and torch.cuda.is_available():
            self.record["device"] = device_record()

    def add(self, table: str, **row) -> None:
        self.record["rows"].append({"table": table, **row})
        if self.path is not None:
            self.path.write_text(json.dumps(self.record, indent=1) + "\n")


def add_json_argument(parser) -> None:
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the GPU rows, the device and its clocks to this JSON file")

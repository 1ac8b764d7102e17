"""Benchmark of the one-op layer kernels `rms_norm` (with and without the residual add) and `rotary` against
the eager PyTorch forms they replace in a decoder layer, at decode and short-block sizes, 1 thread and all
threads, beside the time of moving their bytes (reads + writes) at the measured DRAM streaming bandwidth. The
inputs are cache-resident, so larger rows can run under that figure; at decode sizes both sides are far above
it: what is measured there is dispatch, allocation and Python.

    dspark bench layer_ops            # SmolLM2-135M and Qwen3-8B shapes
    dspark bench layer_ops --quick    # SmolLM2-135M shapes only
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import dspark_ops
from dspark_ops.machine import at_threads, machine_header, stream_bandwidth, thread_counts

# name, hidden size, q heads + k heads rotated together, head dim
MODELS = [("smollm2-135m", 576, 12, 64), ("qwen3-8b", 4096, 40, 128)]
ROWS = [1, 8, 64]


def timeit(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def eager_norm(x, w, eps):
    """The Hugging Face Llama / Qwen RMSNorm."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def eager_add_norm(x, residual, w, eps):
    total = x + residual
    return eager_norm(total, w, eps), total


def eager_rotary(x, cos, signed_sin):
    return x * cos.unsqueeze(-2) + x.roll(x.shape[-1] // 2, -1) * signed_sin.unsqueeze(-2)


def cases(model, rows):
    from dspark_ops.models.layers import rope_cos_sin, rope_inv_freq
    name, d, heads, hd = model
    gen = torch.Generator().manual_seed(0)
    x, r = torch.randn(rows, d, generator=gen), torch.randn(rows, d, generator=gen)
    w = 1 + 0.1 * torch.randn(d, generator=gen)
    qk = torch.randn(rows, (heads + heads // 4) * hd, generator=gen)[:, :heads * hd].unflatten(-1, (heads, hd))
    cos, sin = rope_cos_sin(torch.arange(rows) + 100, rope_inv_freq(hd, 1e6, None), torch.float32)
    yield "rms_norm", (lambda: dspark_ops.rms_norm(x, w, 1e-6)), \
        (lambda: eager_norm(x, w, 1e-6)), 8 * rows * d
    yield "rms_norm + residual", (lambda: dspark_ops.rms_norm(x, w, 1e-6, r)), \
        (lambda: eager_add_norm(x, r, w, 1e-6)), 16 * rows * d
    yield "rotary (q and k)", (lambda: dspark_ops.rotary(qk, cos, sin)), \
        (lambda: eager_rotary(qk, cos, sin)), 8 * rows * heads * hd + 8 * rows * hd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="SmolLM2-135M shapes only, fewer repetitions")
    ap.add_argument("--threads", default="1,all", help="thread counts, e.g. 1,all (default)")
    args = ap.parse_args()
    print(machine_header())
    repeat = 200 if args.quick else 1000
    models = MODELS[:1] if args.quick else MODELS
    print("float32; eager = the Hugging Face forms (RMSNorm after `x + residual`; rotate-half as roll)")
    print("| model | op | rows | threads | one op us | eager us | speed-up | bytes / DRAM bandwidth us |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in thread_counts(args.threads):
        bandwidth = stream_bandwidth(threads)
        with at_threads(threads), torch.no_grad():
            for model in models:
                for rows in ROWS:
                    for op, fused, eager, nbytes in cases(model, rows):
                        t_op, t_eager = timeit(fused, repeat), timeit(eager, repeat)
                        print(f"| {model[0]} | {op} | {rows} | {threads} | {t_op * 1e6:.1f} | {t_eager * 1e6:.1f} | "
                              f"{t_eager / t_op:.1f}x | {nbytes / bandwidth * 1e6:.2f} |")


if __name__ == "__main__":
    main()

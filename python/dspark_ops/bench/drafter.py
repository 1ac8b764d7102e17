"""Drafter ops: markov_sample vs a plain PyTorch loop, and the confidence scheduler.

    dspark bench drafter [--quick] [--device cpu|cuda] [--dtype float32|bfloat16]

markov_sample: B in {1, 32}, G = 7, V in {49152, 151936}, r = 256. The
baseline is the loop anyone would write (per block step: gather w1 rows,
matmul with w2, add, softmax, torch.multinomial). Printed beside it: G x the
time of torch's own [B, r] @ [r, V] matmul (the product no implementation can
skip, at the BLAS library's speed) and the compute floor 2 B r V G FLOPs at
the --peak-gflops rate (default: 2 cores x 2 FMA pipes x 16 lanes x 2 FLOPs x
3 GHz = 384). schedule_verify_lengths / plan_capacity at R = 256,
G = 7 (goal on CPU: under 200 us per call, Python wrapper included). On CPU the kernel, the loop
and the matmul are timed at 1 thread and at all of torch's threads (--threads).
--json PATH (on a GPU) writes the rows, the device and its clocks (dspark_ops/bench/_record.py).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import dspark_ops
from dspark_ops.machine import at_threads, machine_header, thread_counts
from ._record import Recorder, add_json_argument


def timed(fn, device, iters: int, warmup: int = 1) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def torch_loop(U, anchor, w1, w2, temperature):
    """markov_sample written as plain PyTorch: one step at a time, batched over requests."""
    x = anchor.long()
    tokens, probs = [], []
    for k in range(U.shape[1]):
        z = U[:, k].float() + (w1[x] @ w2).float()
        q = torch.softmax(z / temperature, dim=-1)
        x = torch.multinomial(q, 1).squeeze(1)
        tokens.append(x)
        probs.append(q)
    return torch.stack(tokens, 1), torch.stack(probs, 1)


def bench_markov(device, dtype, quick: bool, peak_gflops: float, threads: list[int], rec=None):
    print(f"## markov_sample ({device.type}, {dtype}), G = 7, r = 256, T = 1, draft_probs returned")
    print(f"{'B':>3} {'V':>7} {'thr':>3} | {'kernel ms':>10} {'torch loop ms':>14} {'speed-up':>9} | "
          f"{'torch matmul ms':>15} {'kernel/matmul':>13} | {'FLOP floor ms':>13}")
    G, r = 7, 256
    iters = 1 if quick else 5
    gen = torch.Generator().manual_seed(0)
    for V in (49152, 151936):
        w1 = (torch.randn(V, r, generator=gen) * 0.05).to(device, dtype)
        w2 = (torch.randn(r, V, generator=gen) * 0.05).to(device, dtype)
        for B in (1, 32):
            U = torch.randn(B, G, V, generator=gen).to(device, dtype)
            anchor = torch.randint(0, V, (B,), generator=gen).to(device)
            seed = torch.arange(B, device=device)
            rows = w1[anchor.long()]
            flop_floor = 2 * B * r * V * G / (peak_gflops * 1e9)
            for n in threads:
                with at_threads(n):
                    kernel = timed(lambda: dspark_ops.markov_sample(U, anchor, w1, w2, seed=seed), device, iters)
                    loop = timed(lambda: torch_loop(U, anchor, w1, w2, 1.0), device, iters)
                    matmul = G * timed(lambda: rows @ w2, device, max(iters, 3))
                print(f"{B:>3} {V:>7} {n:>3} | {kernel * 1e3:>10.2f} {loop * 1e3:>14.2f} {loop / kernel:>8.1f}x | "
                      f"{matmul * 1e3:>15.2f} {kernel / matmul:>12.2f}x | {flop_floor * 1e3:>13.2f}")
                if rec is not None:
                    rec.add("markov_sample", B=B, G=G, V=V, r=r, dtype=str(dtype).removeprefix("torch."),
                            kernel_ms=kernel * 1e3, torch_loop_ms=loop * 1e3, torch_matmul_ms=matmul * 1e3,
                            w2_GBps=w2.numel() * w2.element_size() * G / kernel / 1e9)


def bench_schedule(device, quick: bool, threads: list[int], rec=None):
    print(f"## scheduler ({device.type}), R = 256, G = 7, Python wrapper included")
    gen = torch.Generator().manual_seed(1)
    R, G = 256, 7
    conf = torch.rand(R, G, generator=gen).to(device)
    stale = torch.rand(R, G, generator=gen).to(device)
    sps = (1000.0 / (1.0 + torch.arange(R * (G + 1) + 1, dtype=torch.float64) / 512)).to(device)
    cap = dspark_ops.plan_capacity(stale, sps)
    iters = 200 if quick else 2000
    cases = [("schedule_verify_lengths sync", lambda: dspark_ops.schedule_verify_lengths(conf, sps)),
             ("plan_capacity", lambda: dspark_ops.plan_capacity(stale, sps)),
             ("schedule_verify_lengths async", lambda: dspark_ops.schedule_verify_lengths(conf, sps, mode="async",
                                                                                         capacity=cap))]
    for name, fn in cases:
        times = []
        for n in threads:
            with at_threads(n):
                t = timed(fn, device, iters, warmup=20)
                times.append(f"{t * 1e6:8.1f} us ({n} thr)")
                if rec is not None:
                    rec.add("scheduler", op=name, R=R, G=G, us=t * 1e6)
        goal = "  (goal < 200 us)" if device.type == "cpu" and "sync" in name else ""
        print(f"{name:<32} {', '.join(times)}{goal}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one timed call per markov shape, fewer scheduler calls")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--peak-gflops", type=float, default=384.0, help="fp32 FMA peak of the device, for the floor")
    parser.add_argument("--threads", default="1,all", help="CPU thread counts to time at (default: 1 and all)")
    add_json_argument(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no GPU visible")
        return
    rec = Recorder(args.json, "bench_drafter") if device.type == "cuda" else None
    threads = thread_counts(args.threads) if device.type == "cpu" else [torch.get_num_threads()]
    print(machine_header())
    bench_markov(device, getattr(torch, args.dtype), args.quick, args.peak_gflops, threads, rec)
    bench_schedule(device, args.quick, threads, rec)


if __name__ == "__main__":
    main()

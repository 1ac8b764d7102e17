"""Small-block linear on CPU: dspark_ops.linear vs torch's matmul, and achieved weight bandwidth vs a
measured streaming pass.

For each layer shape (SmolLM2-135M and a Qwen3-8B layer) and block height M in {1, 2, 4, 8, 16}, both
weight dtypes of the packed op (fp32, bf16) against torch.nn.functional.linear with fp32 weights (what
the model computes today). Several copies of each weight rotate so that the last-level cache never
holds the one being read (a decoder reads every layer's weights from DRAM). Ours and torch's calls are
interleaved so that both see the same machine load; a time is the 20th percentile over calls (the
development machine is shared: the median mostly measures other people's jobs; --stat median), and
--threads 1 --clock cpu times the calling thread's CPU time, which preemption does not inflate.

Then a whole SmolLM2-135M forward (random weights, 32 tokens already in a dense KV cache) over blocks of
T new tokens with every projection (q/k/v, o, gate/up, down, tied LM head) routed through the model's
LinearImpl hook: torch's F.linear vs dspark_ops.linear on weights packed once (issue 7's third goal:
T = 8 at most 1.4x T = 1). The fused epilogues are not used there (the hook is a plain linear).

Floors: a call must read its weights once, so time >= weight bytes / streaming bandwidth, measured here
by torch.sum over the same packed fp32 weights, interleaved with the calls (the bandwidth this shared
machine gives varies by 2x from minute to minute). Goals (issue 7): at M = 1 at least 80% of that
bandwidth; M = 8 at most 1.3x the time of M = 1.

Every time is taken at 1 thread and at all of torch's threads (--threads), interleaved.

  dspark bench linear            # full table (a few minutes; ~2.5 GB of memory)
  dspark bench linear --quick    # SmolLM2 shapes, M in {1, 8, 16}
  dspark bench linear --threads 1 --clock cpu
  dspark bench linear --forward-only
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

import dspark_ops
from dspark_ops.machine import at_threads, last_level_cache_bytes, machine_header, thread_counts

SMOLLM2 = [("smollm2 qkv (issue: 3x576)", 576, 1728), ("smollm2 qkv (GQA 9/3 heads)", 576, 960),
           ("smollm2 o", 576, 576), ("smollm2 gate+up", 576, 3072), ("smollm2 down", 1536, 576),
           ("smollm2 lm head", 576, 49152)]
QWEN3_8B = [("qwen3-8b qkv", 4096, 6144), ("qwen3-8b gate+up", 4096, 24576), ("qwen3-8b down", 12288, 4096)]


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


CLOCK = time.perf_counter


def timed(fn, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = CLOCK()
        fn()
        out.append(CLOCK() - t0)
    return out


def bench_shape(k, n, ms, llc, budget_s, q, threads):
    """{(key, M, threads): seconds} for one shape, key = torch.float32 / torch.bfloat16 (ours), "torch" or
    "stream" (torch.sum over the packed fp32 weights: the streaming pass)."""
    sets = max(1, math.ceil(3 * llc / (k * n * 2)))  # bf16 copies exceed 3x LLC; fp32 ones 6x
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, k, generator=gen) * k ** -0.5 for _ in range(sets)]
    packed = {dt: [dspark_ops.pack_linear_weight(w, dt) for w in ws] for dt in (torch.float32, torch.bfloat16)}
    times = {}
    for M in ms:
        x = torch.randn(M, k, generator=gen)
        calls = {"torch": 0, torch.float32: 0, torch.bfloat16: 0, "stream": 0}
        samples = {(key, t): [] for key in calls for t in threads}

        def run(key):
            i = calls[key] % sets
            calls[key] += 1
            if key == "torch":
                return F.linear(x, ws[i])
            if key == "stream":
                return packed[torch.float32][i].data.sum()
            return dspark_ops.linear(x, packed[key][i])

        for key in calls:  # warm-up (first-touch, thread pool)
            for _ in range(min(sets, 3)):
                run(key)
        t_end = time.perf_counter() + budget_s * len(threads)
        while time.perf_counter() < t_end or len(samples[("torch", threads[0])]) < 10 * sets:
            for t in threads:
                with at_threads(t):
                    for key in calls:
                        samples[(key, t)] += timed(lambda: run(key), sets)
        for (key, t), v in samples.items():
            times[(key, M, t)] = statistics.median(v) if q is None else percentile(v, q)
    return times


def bench_forward(reps: int, q, threads) -> None:
    from dspark_ops.models import DenseKVCache, LlamaConfig, LlamaModel
    from dspark_ops.models.layers import Linear

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                      rope_theta=100000.0, max_position_embeddings=2048, tie_word_embeddings=True)
    model = LlamaModel(cfg, seed=0).eval()
    weights = [m.weight for m in model.modules() if isinstance(m, Linear)] + [model.lm_head_weight]
    impls = {"torch F.linear": F.linear}
    for dt in (torch.float32, torch.bfloat16):
        table = {id(w): dspark_ops.pack_linear_weight(w, dt) for w in weights}
        impls[f"dspark linear {str(dt)[6:]}"] = lambda x, w, b, table=table: dspark_ops.linear(x, table[id(w)], b)
    prefix = 32
    kv = DenseKVCache.for_model(model, 1, prefix + 16)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, prefix + 16), generator=gen)
    blocks = [1, 2, 4, 8, 16]
    samples = {(name, n, t): [] for name in impls for n in threads for t in blocks}
    with torch.inference_mode():
        model(ids[:, :prefix], kv=kv)
        for _ in range(reps):
            for n in threads:
                with at_threads(n):
                    for name, fn in impls.items():
                        model.set_linear_impl(fn)
                        for t in blocks:
                            t0 = CLOCK()
                            model(ids[:, prefix:prefix + t], kv=kv)
                            samples[(name, n, t)].append(CLOCK() - t0)
                            kv.truncate([prefix])
    model.set_linear_impl(F.linear)
    print(f"\n# SmolLM2-135M forward (fp32 activations, {reps} reps)")
    print("| linear | threads | " + " | ".join(f"T={t} ms" for t in blocks) + " | T=8 / T=1 |")
    print("|---|---|" + "---|" * (len(blocks) + 1))
    for name in impls:
        for n in threads:
            v = {b: samples[(name, n, b)] for b in blocks}
            t = {b: (statistics.median(v[b]) if q is None else percentile(v[b], q)) for b in blocks}
            print(f"| {name} | {n} | " + " | ".join(f"{t[b] * 1e3:.1f}" for b in blocks) + f" | {t[8] / t[1]:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes, M in {1, 8, 16}, short timing")
    ap.add_argument("--threads", default="1,all", help="thread counts to time at (default: 1 and all of torch's)")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per (shape, M)")
    ap.add_argument("--ms", default="", help="comma-separated block heights (default 1,2,4,8,16)")
    ap.add_argument("--only", default="", help="layers whose name contains this text")
    ap.add_argument("--forward-only", action="store_true", help="only the SmolLM2-135M forward")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: the calling thread's CPU time (with --threads 1: immune to other jobs "
                         "preempting the run on a shared machine; memory stalls still count)")
    ap.add_argument("--stat", default="p20", choices=["p20", "median"], help="statistic over calls")
    args = ap.parse_args()
    global CLOCK
    threads = thread_counts(args.threads)
    if args.clock == "cpu":
        if threads != [1]:
            ap.error("--clock cpu needs --threads 1 (it measures the calling thread only)")
        CLOCK = time.thread_time
    ms = [int(m) for m in args.ms.split(",")] if args.ms else ([1, 8, 16] if args.quick else [1, 2, 4, 8, 16])
    ms = sorted(set(ms) | {1, 8})  # the goals need M = 1 and 8
    shapes = [s for s in (SMOLLM2 if args.quick else SMOLLM2 + QWEN3_8B) if args.only in s[0]]
    budget = args.budget if args.budget is not None else (0.15 if args.quick else 0.4)
    q = 0.2 if args.stat == "p20" else None
    llc = last_level_cache_bytes()
    load = open("/proc/loadavg").read().split()[0]
    print(machine_header())
    print(f"# load average {load}, {args.clock} clock, statistic {args.stat}")
    if args.forward_only:
        bench_forward(5 if args.quick else 15, q, threads)
        return
    results = {(name, k, n): bench_shape(k, n, ms, llc, budget, q, threads) for name, k, n in shapes}
    print("| layer | in->out | M | weights | threads | ours ms | torch fp32 ms | speedup | GB/s | stream GB/s "
          "| % stream | t / t(M=1) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    goals = {dt: ([], []) for dt in (torch.float32, torch.bfloat16)}
    top = threads[-1]
    for (name, k, n), t in results.items():
        for M in ms:
            for dt in (torch.float32, torch.bfloat16):
                for th in threads:
                    stream = k * n * 4 / t[("stream", M, th)]
                    ours, theirs = t[(dt, M, th)], t[("torch", M, th)]
                    bw = k * n * dt.itemsize / ours
                    print(f"| {name} | {k}->{n} | {M} | {str(dt)[6:]} | {th} | {ours * 1e3:.3f} | "
                          f"{theirs * 1e3:.3f} | {theirs / ours:.2f}x | {bw / 1e9:.1f} | {stream / 1e9:.1f} | "
                          f"{100 * bw / stream:.0f}% | {ours / t[(dt, 1, th)]:.2f} |")
                # Goals at all threads, over layers whose weights exceed 2 MiB (smaller ones mostly measure
                # call overhead).
                if k * n * dt.itemsize >= 2 << 20:
                    bw = k * n * dt.itemsize / t[(dt, M, top)]
                    if M == 1:
                        goals[dt][0].append(bw / (k * n * 4 / t[("stream", M, top)]))
                    if M == 8:
                        goals[dt][1].append(t[(dt, 8, top)] / t[(dt, 1, top)])
    print(f"\n# goals at {top} threads (layers with weights > 2 MiB)")
    for dt, (bw1, r8) in goals.items():
        print(f"{str(dt)[6:]}: M=1 bandwidth {100 * min(bw1):.0f}%..{100 * max(bw1):.0f}% of streaming "
              f"(goal >= 80%): {'PASS' if min(bw1) >= 0.8 else 'FAIL'}; M=8 / M=1 time "
              f"{min(r8):.2f}..{max(r8):.2f} (goal <= 1.3): {'PASS' if max(r8) <= 1.3 else 'FAIL'}")
    bench_forward(5 if args.quick else 15, q, threads)


if __name__ == "__main__":
    main()

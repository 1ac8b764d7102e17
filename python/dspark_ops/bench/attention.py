"""Benchmark of `draft_block_attention` (paged KV, ragged query blocks).

CPU: the op against the baseline a user would otherwise write, gather the
pages into contiguous K/V then torch's scaled_dot_product_attention with the
causal block mask (GQA via enable_gqa), and against a memory floor (one copy
of the K/V bytes the op must read), all in the same run. Shapes: SmolLM2-135M
(Hq 9, Hkv 3, D 64) and Qwen3-8B-like (Hq 32, Hkv 8, D 128), B in {1, 8, 32},
context {512, 4096}, block 8, bf16, page size 16, shuffled pages.
GPU (when CUDA is available): both CUDA paths (SIMT and tensor-core, forced
through DSPARK_ATTENTION_IMPL), their time and achieved bandwidth (K/V bytes
read / time) against the device's copy bandwidth, and FlashInfer's
BatchPrefillWithPagedKVCacheWrapper on the same shapes if importable. --json PATH
writes the GPU rows, the device and its clocks (dspark_ops/bench/_record.py).

CPU times are taken at 1 thread and at all of torch's threads (--threads), interleaved.

    dspark bench attention            # full CPU table (about a minute)
    dspark bench attention --quick    # B = 8, context 4096 only
    dspark bench attention --gpu      # GPU table only
    dspark bench attention --threads 1 --cpu-time   # steadiest on a shared machine
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

import dspark_ops
from dspark_ops.machine import at_threads, machine_header, thread_counts
from ._record import Recorder, add_json_argument

SHAPES = {"smollm2-135m": (9, 3, 64), "qwen3-8b": (32, 8, 128)}
PAGE_SIZE = 16


def timeit(fn, *, repeat: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)  # best of N: other tenants of a shared machine only ever add time


CLOCK = time.perf_counter  # --cpu-time: time.process_time (CPU time of all threads: immune to waiting)


def interleaved(fns, repeat: int, threads: list[int]) -> dict[tuple[int, int], float]:
    """{(function index, threads): best time}, the functions and thread counts taking turns (after one
    warm-up call each)."""
    for fn in fns:
        fn()
    best = {(i, n): float("inf") for i in range(len(fns)) for n in threads}
    for _ in range(repeat):
        for n in threads:
            with at_threads(n):
                for i, fn in enumerate(fns):
                    t0 = CLOCK()
                    fn()
                    best[(i, n)] = min(best[(i, n)], CLOCK() - t0)
    return best


def make(Hq, Hkv, D, B, ctx, block, dtype=torch.bfloat16, device="cpu"):
    """B requests of `ctx` positions (their last `block` are the query block), pages shuffled in one pool."""
    torch.manual_seed(0)
    pages_per = (ctx + PAGE_SIZE - 1) // PAGE_SIZE
    num_pages = B * pages_per + 8
    k_cache = torch.randn(num_pages, PAGE_SIZE, Hkv, D, dtype=dtype, device=device)
    v_cache = torch.randn(num_pages, PAGE_SIZE, Hkv, D, dtype=dtype, device=device)
    page_table = torch.randperm(num_pages)[:B * pages_per].view(B, pages_per).int().to(device)
    q = torch.randn(B * block, Hq, D, dtype=dtype, device=device)
    seq_lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
    cu_q_lens = torch.arange(0, B * block + 1, block, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, page_table, seq_lens, cu_q_lens


def gather_sdpa(q, k_cache, v_cache, page_table, ctx, block):
    """Baseline: gather every request's pages, then SDPA with the causal block mask."""
    B, Hq, D = page_table.shape[0], q.shape[1], q.shape[2]
    Hkv = k_cache.shape[2]
    idx = page_table.long()
    k = k_cache[idx].reshape(B, -1, Hkv, D)[:, :ctx].transpose(1, 2)
    v = v_cache[idx].reshape(B, -1, Hkv, D)[:, :ctx].transpose(1, 2)
    mask = torch.ones(block, ctx, dtype=torch.bool, device=q.device).tril(ctx - block)
    qq = q.view(B, block, Hq, D).transpose(1, 2)
    return F.scaled_dot_product_attention(qq, k, v, attn_mask=mask, enable_gqa=True)


def kv_bytes(k_cache, B, ctx) -> int:
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    return 2 * B * ctx * Hkv * D * k_cache.element_size()


def cpu_table(cases, repeat, block, threads):
    print(f"bf16, page size {PAGE_SIZE}, block {block}, clock: {CLOCK.__name__}")
    print("| model | B | ctx | threads | op ms | gather+SDPA ms | speed-up | KV copy floor ms | op/floor | op GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, B, ctx in cases:
        Hq, Hkv, D = SHAPES[name]
        q, kc, vc, pt, sl, cu = make(Hq, Hkv, D, B, ctx, block)
        out = dspark_ops.draft_block_attention(q, kc, vc, pt, sl, cu)
        base_out = gather_sdpa(q, kc, vc, pt, ctx, block)
        err = (out.float() - base_out.transpose(1, 2).reshape_as(out).float()).abs().max().item()
        assert err < 5e-2, f"op and baseline disagree ({err})"
        flat = torch.empty(kv_bytes(kc, B, ctx), dtype=torch.uint8)
        dst = torch.empty_like(flat)
        # Interleaved, best of `repeat` each: load from other tenants of the machine hits all three alike.
        t = interleaved([lambda: dspark_ops.draft_block_attention(q, kc, vc, pt, sl, cu),
                         lambda: gather_sdpa(q, kc, vc, pt, ctx, block),
                         lambda: dst.copy_(flat)], repeat, threads)
        flops = 4 * B * block * Hq * ctx * D  # QK^T and PV, 2 flops per multiply-add
        for n in threads:
            op, base, floor = t[(0, n)], t[(1, n)], t[(2, n)]
            print(f"| {name} | {B} | {ctx} | {n} | {op * 1e3:.2f} | {base * 1e3:.2f} | {base / op:.2f}x | "
                  f"{floor * 1e3:.2f} | {op / floor:.1f} | {flops / op / 1e9:.0f} |", flush=True)


def flashinfer_runner(q, kc, vc, pt, sl, cu, block):
    """A callable running FlashInfer's paged prefill on the same problem, or a string saying why not."""
    try:
        import flashinfer
    except ImportError:
        return "not importable"
    try:
        B, pages = pt.shape
        dev = q.device
        kv_indptr = torch.arange(0, (B + 1) * pages, pages, dtype=torch.int32, device=dev)[:B + 1]
        last = (sl - 1) % kc.shape[1] + 1
        ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
        w.plan(cu, kv_indptr, pt.reshape(-1).contiguous(), last.int(), q.shape[1], kc.shape[2], q.shape[2],
               kc.shape[1], causal=True, q_data_type=q.dtype, kv_data_type=kc.dtype)
        return lambda: w.run(q, (kc, vc))
    except Exception as e:  # API differs across versions
        return f"n/a ({type(e).__name__}: {str(e)[:60]})"


def with_impl(impl, fn):
    """Time-able callable running `fn` with the CUDA path forced (the op reads the variable at each call)."""
    def run():
        os.environ["DSPARK_ATTENTION_IMPL"] = impl
        return fn()
    return run


def gpu_table(cases, repeat, block, rec=None):
    sync = torch.cuda.synchronize
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(big)
    t = timeit(lambda: dst.copy_(big), repeat=repeat, sync=sync)
    copy_bw = 2 * big.numel() / t / 1e9  # read + write
    del big, dst
    tc_built = dspark_ops.build_info().get("attention_tc", False)
    print(f"GPU: {torch.cuda.get_device_name(0)}; device copy bandwidth {copy_bw:.0f} GB/s (read + write); bf16, "
          f"page size {PAGE_SIZE}, block {block}; tensor-core path {'built' if tc_built else 'NOT built'}")
    print("| model | B | ctx | simt us | tc us | simt/tc | tc KV GB/s | tc % of copy bw | simt % of copy bw | "
          "flashinfer us | flashinfer/tc |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    saved = os.environ.get("DSPARK_ATTENTION_IMPL")
    try:
        for name, B, ctx in cases:
            Hq, Hkv, D = SHAPES[name]
            args = make(Hq, Hkv, D, B, ctx, block, device="cuda")
            nbytes = kv_bytes(args[1], B, ctx)
            op = lambda: dspark_ops.draft_block_attention(*args)
            simt = timeit(with_impl("simt", op), repeat=repeat, sync=sync)
            if tc_built:
                tc = timeit(with_impl("tc", op), repeat=repeat, sync=sync)
                diff = (with_impl("tc", op)().float() - with_impl("simt", op)().float()).abs().max().item()
                assert diff < 5e-2, f"tensor-core and SIMT paths disagree ({diff})"
                tc_cols = f"{tc * 1e6:.1f} | {simt / tc:.2f} | {nbytes / tc / 1e9:.0f} | {100 * nbytes / tc / 1e9 / copy_bw:.0f}%"
            else:
                tc, tc_cols = simt, "n/a | - | - | -"
            fi = flashinfer_runner(*args, block)
            if callable(fi):
                ft = timeit(fi, repeat=repeat, sync=sync)
                fi_cols = f"{ft * 1e6:.1f} | {ft / tc:.2f}"
            else:
                fi_cols = f"{fi} | -"
            print(f"| {name} | {B} | {ctx} | {simt * 1e6:.1f} | {tc_cols} | {100 * nbytes / simt / 1e9 / copy_bw:.0f}% | "
                  f"{fi_cols} |", flush=True)
            if rec is not None:
                rec.add("gpu", model=name, B=B, ctx=ctx, block=block, kv_bytes=nbytes, copy_GBps=copy_bw,
                        simt_us=simt * 1e6, simt_kv_GBps=nbytes / simt / 1e9,
                        tc_us=tc * 1e6 if tc_built else None, tc_kv_GBps=nbytes / tc / 1e9 if tc_built else None,
                        flashinfer_us=ft * 1e6 if callable(fi) else fi)
    finally:
        if saved is None:
            os.environ.pop("DSPARK_ATTENTION_IMPL", None)
        else:
            os.environ["DSPARK_ATTENTION_IMPL"] = saved


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="B = 8, context 4096 only, few repeats")
    ap.add_argument("--gpu", action="store_true", help="GPU table only")
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--threads", default="1,all", help="CPU thread counts to time at (default: 1 and all)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="CPU time instead of wall time (with --threads 1: robust on a shared machine)")
    add_json_argument(ap)
    args = ap.parse_args()
    threads = thread_counts(args.threads)
    print(machine_header())
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    if args.quick:
        cases, repeat = [(name, 8, 4096) for name in SHAPES], 3
    else:
        cases, repeat = [(name, B, ctx) for name in SHAPES for B in (1, 8, 32) for ctx in (512, 4096)], 7
    if args.gpu or torch.cuda.is_available():
        if torch.cuda.is_available():
            # --quick adds one large bandwidth-bound case (2 GB of K/V) to the two B = 8, ctx 4096 ones.
            gpu_cases = (cases + [("qwen3-8b", 32, 16384)] if args.quick
                         else cases + [(name, B, 16384) for name in SHAPES for B in (8, 64)])
            gpu_table(gpu_cases, 20, args.block, Recorder(args.json, "bench_attention"))
        else:
            print("no GPU visible")
        if args.gpu:
            return
    cpu_table(cases, repeat, args.block, threads)


if __name__ == "__main__":
    main()

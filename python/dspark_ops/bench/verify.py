"""Benchmark of `verify`.

CPU: the op against the pure-PyTorch reference and against the one-pass floors
the issue names (torch.logsumexp over the logits for sampling, amax for greedy),
all measured in the same run. Two draft scenarios bracket the real cost:
  random  - drafts unrelated to the target: the chain usually ends at position 0
  target  - drafts sampled from the target with q = p: every draft is accepted,
            so every position (and the bonus) is processed: the worst case.
GPU (when CUDA is available): time and achieved bandwidth (logit bytes read /
time) and FlashInfer's chain_speculative_sampling on the same shapes if importable;
then each CUDA launch shape of the op (DSPARK_VERIFY_LAUNCH) at small and large
batch, CUDA-event timed, against FlashInfer. --json PATH writes the GPU rows, the
device and its clocks (dspark_ops/bench/_record.py).
Draft vocabulary (--draft-vocab): drafts over Vd of the V ids, verified through
``draft_index`` against the baseline of writing them out as [B, K, V] first
(zero outside Vd, the input FlashInfer's and our dense path take).

CPU times are taken at 1 thread and at all of torch's threads (--threads).

    dspark bench verify                # full CPU table (a few minutes)
    dspark bench verify --quick        # one shape
    dspark bench verify --draft-vocab  # draft_index vs writing q out over V
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import dspark_ops
from dspark_ops import reference
from dspark_ops.draft_vocab import DraftVocab
from dspark_ops.machine import at_threads, machine_header, thread_counts
from ._record import Recorder, add_json_argument, event_time


def timeit(fn, *, repeat: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make(B, K, V, scenario, device="cpu", dtype=torch.float32, greedy=False):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(B, K + 1, V, generator=gen).to(dtype)
    if scenario == "random":
        drafts = torch.randint(0, V, (B, K), generator=gen)
        q = torch.softmax(torch.randn(B, K, V, generator=gen), -1)
    else:  # drafts from the target itself (q = p, or the argmax when greedy): all accepted
        q = torch.softmax(logits[:, :K].float(), -1)
        drafts = (logits[:, :K].float().argmax(-1) if greedy
                  else torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, K))
    return logits.to(device), drafts.to(device), q.to(device)


def cpu_table(shapes, repeat, with_reference, threads):
    top = threads[-1]
    print("| B | K | V | mode | drafts | " + " | ".join(f"op ms {n} thr" for n in threads)
          + f" | floor | floor ms {top} thr | op/floor | reference ms | ref/op |")
    print("|---|---|---|---|---|" + "---|" * len(threads) + "---|---|---|---|---|")
    for B, K, V in shapes:
        for mode, kw, floor_name in [("T=1, top_p=0.9", dict(temperature=1.0, top_p=0.9), "logsumexp"),
                                     ("greedy", dict(temperature=0.0), "amax")]:
            for scenario in ["random", "target"]:
                logits, drafts, q = make(B, K, V, scenario, greedy=floor_name == "amax")
                seeds = torch.arange(B)
                ops = {}
                for n in threads:
                    with at_threads(n):
                        ops[n] = timeit(lambda: dspark_ops.verify(logits, drafts, q, seed=seeds, **kw),
                                        repeat=repeat)
                op = ops[top]
                floor_fn = (lambda: torch.logsumexp(logits, -1)) if floor_name == "logsumexp" else (
                    lambda: logits.amax(-1))
                with at_threads(top):
                    floor = timeit(floor_fn, repeat=repeat)
                ref = ""
                if with_reference:
                    r = timeit(lambda: reference.verify(logits, drafts, q, seed=seeds, **kw), repeat=1)
                    ref = f"{r * 1e3:.0f} | {r / op:.0f}x"
                else:
                    ref = "- | -"
                print(f"| {B} | {K} | {V} | {mode} | {scenario} | "
                      + " | ".join(f"{ops[n] * 1e3:.2f}" for n in threads)
                      + f" | {floor_name} | {floor * 1e3:.2f} | {op / floor:.2f} | {ref} |", flush=True)


def gpu_table(shapes, repeat, rec=None):
    sync = torch.cuda.synchronize
    try:
        import flashinfer  # noqa: F401
        have_fi = True
    except ImportError:
        have_fi = False
    print(f"GPU: {torch.cuda.get_device_name(0)}; flashinfer: {'yes' if have_fi else 'not importable'}")
    print("| B | K | V | dtype | mode | drafts | op us | GB/s (logits read once) | flashinfer us |")
    print("|---|---|---|---|---|---|---|---|---|")
    for B, K, V in shapes:
        for dtype in [torch.float32, torch.bfloat16]:
            for mode, kw in [("T=1, top_p=0.9", dict(top_p=0.9)), ("T=1", {}), ("greedy", dict(temperature=0.0))]:
                for scenario in ["random", "target"]:
                    logits, drafts, q = make(B, K, V, scenario, "cuda", dtype, greedy=mode == "greedy")
                    seeds = torch.arange(B, device="cuda")
                    temperature = torch.full((B,), kw.get("temperature", 1.0), device="cuda")
                    top_p = torch.full((B,), kw.get("top_p", 1.0), device="cuda")
                    t = timeit(lambda: dspark_ops.verify(logits, drafts, q, seed=seeds, temperature=temperature,
                                                         top_p=top_p), repeat=repeat, sync=sync)
                    gbs = logits.numel() * logits.element_size() / t / 1e9
                    fi = "-"
                    if have_fi and mode == "T=1" and dtype == torch.float32:
                        import flashinfer.sampling as fs
                        tp = torch.softmax(logits.float(), -1)
                        try:
                            ft = timeit(lambda: fs.chain_speculative_sampling(q, drafts.int(), tp),
                                        repeat=repeat, sync=sync)
                            fi = f"{ft * 1e6:.1f}"
                        except Exception as e:  # API differs across versions
                            fi = f"n/a ({type(e).__name__})"
                    print(f"| {B} | {K} | {V} | {str(dtype)[6:]} | {mode} | {scenario} | {t * 1e6:.1f} | "
                          f"{gbs:.0f} | {fi} |", flush=True)
                    if rec is not None:
                        rec.add("gpu", B=B, K=K, V=V, dtype=str(dtype)[6:], mode=mode, drafts=scenario,
                                op_us=t * 1e6, logits_GBps=gbs, flashinfer_us=fi)


LAUNCHES = ["chain", "positions", "clusters"]


def with_launch(launch, fn):
    """fn with the op's CUDA launch shape forced (the op reads DSPARK_VERIFY_LAUNCH at each call)."""
    def run():
        os.environ["DSPARK_VERIFY_LAUNCH"] = launch
        return fn()
    return run


def flashinfer_chain(q, drafts, logits):
    """(FlashInfer's chain_speculative_sampling on target probabilities, the same with the softmax that
    makes them) as callables, or a string saying why not."""
    try:
        import flashinfer.sampling as fs
    except ImportError:
        return "not importable"
    probs = torch.softmax(logits.float(), -1)
    ids = drafts.int()
    try:
        fs.chain_speculative_sampling(q, ids, probs)
    except Exception as e:  # API differs across versions
        return f"n/a ({type(e).__name__})"
    return (lambda: fs.chain_speculative_sampling(q, ids, probs),
            lambda: fs.chain_speculative_sampling(q, ids, torch.softmax(logits.float(), -1)))


def launch_table(shapes, repeat, rec=None):
    """Each CUDA launch shape of verify and the automatic choice, every draft accepted (all K + 1 positions
    processed), CUDA-event medians; FlashInfer on the same fp32 problem (its input is probabilities: shown
    alone and with the softmax that makes them)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"verify launch shapes on {torch.cuda.get_device_name(0)} ({sms} SMs), drafts from the target (every "
          f"position processed), CUDA-event medians of {repeat}")
    print("| B | K | V | dtype | mode | chain us | positions us | clusters us | auto us | auto GB/s | "
          "flashinfer us | flashinfer + softmax us |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    saved = os.environ.get("DSPARK_VERIFY_LAUNCH")
    try:
        for B, K, V in shapes:
            for dtype in [torch.float32, torch.bfloat16]:
                for mode, kw in [("T=1", {}), ("greedy", dict(temperature=0.0))]:
                    logits, drafts, q = make(B, K, V, "target", "cuda", dtype, greedy=mode == "greedy")
                    seeds = torch.arange(B, device="cuda")
                    temperature = torch.full((B,), kw.get("temperature", 1.0), device="cuda")
                    op = lambda: dspark_ops.verify(logits, drafts, q, seed=seeds, temperature=temperature)  # noqa: E731
                    times, outs = {}, {}
                    for launch in LAUNCHES + ["auto"]:
                        try:
                            outs[launch] = with_launch(launch, op)()
                        except RuntimeError as e:  # clusters: an sm_90 GPU and build only
                            times[launch] = f"n/a ({str(e)[:40]})"
                            continue
                        times[launch] = event_time(with_launch(launch, op), repeat) * 1e6
                    first = next(iter(outs.values()))
                    assert all(torch.equal(o[0], first[0]) and torch.equal(o[1], first[1]) for o in outs.values()), \
                        "launch shapes disagree"
                    gbs = logits.numel() * logits.element_size() / (times["auto"] / 1e6) / 1e9
                    fi = ("-", "-")
                    if mode == "T=1" and dtype == torch.float32:
                        runners = flashinfer_chain(q, drafts, logits)
                        fi = (tuple(f"{event_time(r, repeat) * 1e6:.1f}" for r in runners) if isinstance(runners, tuple)
                              else (runners, "-"))
                    cols = " | ".join(f"{times[x]:.1f}" if isinstance(times[x], float) else times[x]
                                      for x in LAUNCHES + ["auto"])
                    print(f"| {B} | {K} | {V} | {str(dtype)[6:]} | {mode} | {cols} | {gbs:.0f} | {fi[0]} | {fi[1]} |",
                          flush=True)
                    if rec is not None:
                        rec.add("launches", B=B, K=K, V=V, dtype=str(dtype)[6:], mode=mode,
                                **{f"{x}_us": times[x] for x in LAUNCHES + ["auto"]}, auto_logits_GBps=gbs,
                                flashinfer_us=fi[0], flashinfer_with_softmax_us=fi[1])
    finally:
        if saved is None:
            os.environ.pop("DSPARK_VERIFY_LAUNCH", None)
        else:
            os.environ["DSPARK_VERIFY_LAUNCH"] = saved


def draft_vocab_table(device, repeat, shapes):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    print(f"draft vocabulary on {device}, threads: {torch.get_num_threads()}; T=1, drafts from q over Vd ids "
          f"close to the target")
    print("| B | K | V | Vd | write q over V, then verify ms | of which writing ms | verify with draft_index ms | "
          "speedup | q bytes (dense / Vd) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for B, K, V, Vd in shapes:
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(B, K + 1, V, generator=gen) * 2
        ids = torch.sort(torch.randperm(V, generator=gen)[:Vd]).values
        index = DraftVocab(ids, V).index
        q = torch.softmax(logits[:, :K, ids] + 0.5 * torch.randn(B, K, Vd, generator=gen), -1)
        drafts = ids[torch.multinomial(q.reshape(-1, Vd), 1, generator=gen).reshape(B, K)]
        logits, q, drafts, index, ids = (t.to(device) for t in (logits, q, drafts, index, ids))
        seeds = torch.arange(B, device=device)

        def dense():
            return q.new_zeros(B, K, V).index_copy_(-1, ids, q)

        full = dense()
        write = timeit(dense, repeat=repeat, sync=sync)
        base = timeit(lambda: dspark_ops.verify(logits, drafts, dense(), seed=seeds), repeat=repeat, sync=sync)
        op = timeit(lambda: dspark_ops.verify(logits, drafts, q, draft_index=index, seed=seeds), repeat=repeat,
                    sync=sync)
        assert torch.equal(dspark_ops.verify(logits, drafts, q, draft_index=index, seed=seeds)[0],
                           dspark_ops.verify(logits, drafts, full, seed=seeds)[0])
        print(f"| {B} | {K} | {V} | {Vd} | {base * 1e3:.3f} | {write * 1e3:.3f} | {op * 1e3:.3f} | {base / op:.2f}x | "
              f"{full.numel() * 4 / 1e6:.1f} MB / {q.numel() * 4 / 1e6:.2f} MB |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one shape, few repeats")
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) reference column")
    ap.add_argument("--gpu", action="store_true", help="GPU table only")
    ap.add_argument("--draft-vocab", action="store_true", help="draft_index against writing q out over V")
    ap.add_argument("--threads", default="1,all", help="CPU thread counts to time at (default: 1 and all)")
    add_json_argument(ap)
    args = ap.parse_args()
    threads = thread_counts(args.threads)
    rec = Recorder(args.json, "bench_verify")
    print(machine_header())
    if args.draft_vocab:   # SmolLM2's shapes (its shipped 4096-id draft vocabulary), then a 128K-id target
        shapes = [(B, 6, 49152, 4096) for B in (1, 8, 32)] + [(B, 6, 128256, 32768) for B in (8, 32)]
        if not args.gpu:
            draft_vocab_table("cpu", 20, shapes)
        if torch.cuda.is_available():
            draft_vocab_table("cuda", 50, shapes + [(B, 6, 128256, 32768) for B in (128, 256)])
        return
    if args.quick:
        shapes, repeat = [(32, 7, 151936)], 3
    else:
        shapes, repeat = [(B, K, V) for B in (1, 8, 32) for K in (5, 7) for V in (32000, 151936)], 5
    if args.gpu or torch.cuda.is_available():
        if torch.cuda.is_available():
            gpu_table(shapes, 20, rec)
            launch_shapes = ([(B, 5, 151936) for B in (1, 8, 64)] if args.quick else
                             [(B, K, V) for B in (1, 4, 8, 32, 64, 256) for K in (5,) for V in (32000, 151936)])
            launch_table(launch_shapes, 20 if args.quick else 50, rec)
        else:
            print("no GPU visible")
        if args.gpu:
            return
    cpu_table(shapes, repeat, with_reference=not args.no_reference and not args.quick, threads=threads)


if __name__ == "__main__":
    main()

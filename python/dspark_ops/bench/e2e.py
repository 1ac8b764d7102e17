"""End-to-end generation benchmark on SmolLM2-135M-Instruct (CPU by default).

All in one run, on the same prompts (real texts, chat-formatted), 128 new
tokens, temperature 0, fp32:
  - transformers `generate` (plain, and prompt-lookup assisted generation, the
    assisted mode that needs no second model), when transformers is installed;
  - our engine, plain decoding (drafter=None);
  - our engine with each drafter available: the shipped trained DSpark drafter
    (if present), a drafter copied from the target's first layers, and an
    EAGLE-3-style drafter when a checkpoint is given (--eagle); a drafter that
    has a draft vocabulary runs a second time proposing every id ("every id").
Reports tokens/s, tau (tokens per target step) and whether the greedy output
equals plain decoding, on CPU at 1 thread and at all of torch's threads
(--threads), and with --plot writes a bar chart (PNG).

On a GPU (--device cuda, bf16 by default) the same engines run with CUDA
graphs off and on, and each row adds the fraction of the decode time the
device sits idle (torch.profiler: 1 - union of kernel/copy intervals / their
span, in a second, profiled run). Without the model files (a machine with no
network) --random-weights builds SmolLM2-135M's shape with random weights and
random prompts: speeds and idle fractions hold, tau does not. --json PATH (on a
GPU) writes the rows, the device and its clocks (dspark_ops/bench/_record.py).

    dspark bench e2e --quick          # batch 1, 2 prompts, 48 tokens
    dspark bench e2e                  # batch 1 and 8, 128 tokens
    dspark bench e2e --eagle /path/to/eagle3/drafter
    dspark bench e2e --batches 8 --repeat 5 --draft-max-batch 4   # plain steps past batch 4
    dspark bench e2e --repeat 3 --draft-max-batch auto   # draft where the step costs say it pays
    dspark bench e2e --device cuda --quick --random-weights
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.autograd import DeviceType

from ._record import Recorder, add_json_argument
from dspark_ops.engine import SpeculativeEngine
from dspark_ops.generate import load_target as load_target_model, parse_draft_max_batch, shipped_drafter
from dspark_ops.machine import at_threads, machine_header, thread_counts
from dspark_ops.models import (LlamaConfig, LlamaModel, TextTokenizer, build_drafter_from_target, load_drafter,
                               resolve_model)

PROMPTS = [
    "Explain why the sky is blue in simple terms.",
    "Write a Python function that checks whether a string is a palindrome.",
    "What are the main differences between a list and a tuple in Python?",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "If a train travels 60 miles per hour for 2.5 hours, how far does it go? Explain.",
    "Give three tips for writing clear documentation.",
    "Describe how photosynthesis works.",
    "Write a haiku about autumn leaves.",
]


def make_engine(target, drafter, batch, **kw):
    confident = drafter is not None and drafter.confidence_weights() is not None
    return SpeculativeEngine(target, drafter, max_batch=batch, max_tokens=4096,
                             scheduler="sync" if confident else "fixed", **kw)


def run_engine(target, drafter, prompts, n, batch, stop, temperature=0.0, **kw):
    """Tokens/s and tau of one engine over the prompts, after a warm-up on the same engine
    (lazy initialisation, CUDA-graph capture of the batch buckets); ``kw`` goes to the engine."""
    engine = make_engine(target, drafter, batch, **kw)
    engine.generate(prompts[:batch], max_new_tokens=4)
    engine.finished.clear()
    engine.stats = type(engine.stats)()
    sync()
    t0 = time.perf_counter()
    outs = engine.generate(prompts, max_new_tokens=n, stop_token_ids=stop, temperature=temperature)
    sync()
    dt = time.perf_counter() - t0
    rounds = sum(r.stats.rounds for r in engine.finished.values())
    tau = sum(r.stats.emitted for r in engine.finished.values()) / max(rounds, 1)
    return outs, sum(map(len, outs)) / dt, tau, engine


def best_run(repeat, *args, **kw):
    """run_engine's result with the highest tokens/s of ``repeat`` runs (a shared machine's noise is one-sided)."""
    return max((run_engine(*args, **kw) for _ in range(repeat)), key=lambda r: r[1])


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_idle(engine, prompts, n, stop) -> float | None:
    """Fraction of a generate call's device time span with no kernel or copy running (profiled run)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.generate(prompts, max_new_tokens=n, stop_token_ids=stop)
        sync()
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    if not spans:
        return None
    busy, (lo, hi) = 0.0, spans[0]
    for a, b in spans[1:]:
        if a > hi:
            busy, lo = busy + hi - lo, a
        hi = max(hi, b)
    busy += hi - lo
    return 1 - busy / (spans[-1][1] - spans[0][0]) if spans[-1][1] > spans[0][0] else None


def run_transformers(path, prompts, n, stop, assisted):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    kw = dict(max_new_tokens=n, do_sample=False, eos_token_id=stop, pad_token_id=stop[0])
    if assisted:
        kw["prompt_lookup_num_tokens"] = 10
    total, t0 = 0, time.perf_counter()
    outs = []
    with torch.no_grad():
        for p in prompts:  # batch 1 (transformers' batched generate pads; we compare batch 1 only)
            ids = torch.tensor([p])
            out = model.generate(ids, **kw)[0, len(p):].tolist()
            outs.append(out)
            total += len(out)
    return outs, total / (time.perf_counter() - t0)


def forward_cost(target, context=200, repeat=5):
    """Median time of one target forward over a block of n tokens at `context`, paged path as the engine runs it."""
    from dspark_ops.models import PagedAttention

    engine = SpeculativeEngine(target, None, max_batch=1, max_tokens=4096)  # packs the linear weights
    cache = engine.target_cache
    cache.reserve(0, context)

    def fwd(n):
        slots = cache.reserve(0, n)
        backend = PagedAttention(cache.layer_caches(), slot_mapping=slots, page_table=cache.page_table([0]),
                                 seq_lens=cache.seq_lens([0]), cu_q_lens=torch.tensor([0, n], dtype=torch.int32))
        with torch.no_grad():
            target(torch.zeros(n, dtype=torch.long), torch.arange(context, context + n), kv=backend)
        cache.rollback([0], [0])

    times = {}
    for n in (1, 2, 4, 8, 16):
        fwd(n)
        samples = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fwd(n)
            samples.append(time.perf_counter() - t0)
        times[n] = sorted(samples)[repeat // 2] * 1e3
    print("| tokens in the block | " + " | ".join(map(str, times)) + " |")
    print("|---|" + "---|" * len(times))
    print("| forward ms | " + " | ".join(f"{t:.1f}" for t in times.values()) + " |")
    print(f"8-token / 1-token forward: {times[8] / times[1]:.2f}x")


# SmolLM2-135M's architecture, for --random-weights on machines without the model files.
SMOLLM2_CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                      rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True)


def load_target(args, dtype):
    """(target, prompts, stop tokens, model folder or None)."""
    count = (4 if args.device.startswith("cuda") else 2) if args.quick else 8
    if args.random_weights:
        target = LlamaModel(LlamaConfig(**SMOLLM2_CONFIG), device=args.device, dtype=dtype, seed=0).eval()
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 49152, (int(n),), generator=gen).tolist()
                   for n in torch.randint(20, 60, (count,), generator=gen)]
        return target, prompts, [], None
    path = resolve_model("smollm2-135m")
    tok = TextTokenizer(path)
    target = load_target_model(path, dtype, args.device)
    prompts = [tok.encode_chat(p) for p in PROMPTS[:count]]
    return target, prompts, tok.stop_ids, path


def load_drafters(args, target):
    """name -> (drafter, engine options); a drafter with a draft vocabulary also runs without it."""
    drafters = {}
    shipped = shipped_drafter("smollm2-135m")
    if shipped is not None and not args.random_weights:
        drafters["DSpark (shipped)"] = load_drafter(shipped, target, dtype=target.dtype)
    drafters["self-copy (4 layers)"] = build_drafter_from_target(target, num_layers=4, block_size=7)
    if args.eagle:
        drafters["EAGLE-3"] = load_drafter(args.eagle, target, dtype=target.dtype)
    out = {}
    for name, d in drafters.items():
        out[name] = (d, {})
        if d.draft_vocab is not None:
            out[f"{name}, every id"] = (d, {"draft_vocab": False})
        limit = args.draft_max_batch
        if limit:
            label = "drafting where it pays (auto)" if limit == "auto" else f"drafting at batch <= {limit}"
            out[f"{name}, {label}"] = (d, {"draft_max_batch": limit})
    return out


def engines_at(drafters, batch):
    """(name, drafter, engine options) worth running at ``batch``: a draft_max_batch=N variant only past N."""
    return [(name, d, kw) for name, (d, kw) in drafters.items()
            if not isinstance(limit := kw.get("draft_max_batch"), int) or limit < batch]


def gpu_main(args, target, prompts, stop, n, batches, rec=None):
    """Plain and speculative engines with CUDA graphs off and on; tokens/s, tau, device idle fraction."""
    drafters = load_drafters(args, target)
    print(f"{torch.cuda.get_device_name()}, {n} new tokens, T=0, {str(target.dtype).removeprefix('torch.')}, "
          f"{len(prompts)} prompts{', random weights' if args.random_weights else ''}")
    print("| system | batch | CUDA graphs | tok/s | vs plain, graphs off | tau | device idle | greedy == plain |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in batches:
        plain = base = None
        for name, drafter, kw in [("plain", None, {}), *engines_at(drafters, batch)]:
            for graphs in (False, True):
                outs, tps, tau, engine = run_engine(target, drafter, prompts, n, batch, stop, cuda_graphs=graphs, **kw)
                plain, base = (outs, tps) if plain is None else (plain, base)
                idle = device_idle(engine, prompts, n, stop)
                idle = "n/a" if idle is None else f"{100 * idle:.1f}%"
                print(f"| dspark engine, {name} | {batch} | {'on' if graphs else 'off'} | {tps:.1f} | "
                      f"{tps / base:.2f}x | {tau:.2f} | {idle} | {outs == plain} |", flush=True)
                if rec is not None:
                    rec.add("engine", system=name, batch=batch, cuda_graphs=graphs, new_tokens=n,
                            dtype=str(target.dtype).removeprefix("torch."), random_weights=args.random_weights,
                            tokens_per_s=tps, vs_plain_graphs_off=tps / base, tau=tau, device_idle=idle,
                            greedy_equals_plain=outs == plain)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--forward-cost", action="store_true", help="only the target forward time by block size")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA (bfloat16 on CPU: "
                    "bf16 weights computed in fp32)")
    ap.add_argument("--eagle", default=None, help="an EAGLE-3-style drafter folder to include")
    ap.add_argument("--random-weights", action="store_true",
                    help="SmolLM2-135M's shape with random weights and random prompts (no model files needed)")
    ap.add_argument("--draft-max-batch", type=parse_draft_max_batch, default=None, metavar="N|auto",
                    help="also run each drafter drafting only while at most N requests run (at larger batches), "
                         "or where the profiled step costs say drafting pays (auto, at every batch)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="CPU batch sizes (default: 1 and 8)")
    ap.add_argument("--repeat", type=int, default=1, help="CPU: best tokens/s of this many runs per engine")
    ap.add_argument("--threads", default="1,all", help="CPU thread counts to run at (default: 1 and all)")
    ap.add_argument("--plot", default=None, help="write a bar chart of the all-thread CPU rows to this PNG")
    add_json_argument(ap)
    args = ap.parse_args()
    threads = thread_counts(args.threads)
    n = 48 if args.quick else 128
    batches = args.batches or ([1] if args.quick else [1, 8])
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("no GPU visible")
        return
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    target, prompts, stop, path = load_target(args, dtype)
    if args.forward_cost:
        return forward_cost(target)
    if cuda:
        return gpu_main(args, target, prompts, stop, n, [1, 4] if args.quick else [1, 8],
                        Recorder(args.json, "bench_e2e"))
    drafters = load_drafters(args, target)
    print(machine_header())
    print(f"{n} new tokens, T=0, {str(dtype).removeprefix('torch.')}, {len(prompts)} prompts; ratios against the "
          f"plain engine at the same batch and thread count")
    print("| system | batch | threads | tok/s | vs plain engine | tau | greedy == plain |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for batch in batches:
        for th in threads:
            with at_threads(th):
                rows += cpu_rows(args, target, drafters, prompts, stop, n, batch, th, path, plot=th == threads[-1])
    if args.plot:
        plot(rows, args.plot, n, threads[-1])


def cpu_rows(args, target, drafters, prompts, stop, n, batch, th, path, plot):
    """Prints one batch size's rows at the current thread count; returns (label, tok/s) for the plot."""
    rows = []
    plain, plain_tps, _, _ = best_run(args.repeat, target, None, prompts, n, batch, stop)
    if batch == 1 and path is not None:
        try:
            hf, hf_tps = run_transformers(path, prompts, n, stop, assisted=False)
            print(f"| transformers generate | 1 | {th} | {hf_tps:.1f} | {hf_tps / plain_tps:.2f}x | 1.00 | "
                  f"{hf == plain} |", flush=True)
            rows.append(("transformers", hf_tps))
            hfa, hfa_tps = run_transformers(path, prompts, n, stop, assisted=True)
            print(f"| transformers prompt-lookup | 1 | {th} | {hfa_tps:.1f} | {hfa_tps / plain_tps:.2f}x | - | "
                  f"{hfa == plain} |", flush=True)
            rows.append(("transformers\nprompt-lookup", hfa_tps))
        except ImportError:
            print("| transformers | - | - | not installed | | | |")
    print(f"| dspark engine, plain | {batch} | {th} | {plain_tps:.1f} | 1.00x | 1.00 | True |", flush=True)
    rows.append((f"engine plain\nb={batch}", plain_tps))
    for name, drafter, kw in engines_at(drafters, batch):
        outs, tps, tau, engine = best_run(args.repeat, target, drafter, prompts, n, batch, stop, **kw)
        if "draft_max_batch" in kw:
            name += f" ({engine.stats.drafting_steps} of {engine.stats.steps} steps drafted)"
        print(f"| dspark engine, {name} | {batch} | {th} | {tps:.1f} | {tps / plain_tps:.2f}x | {tau:.2f} | "
              f"{outs == plain} |", flush=True)
        rows.append((f"{name}\nb={batch}", tps))
    return rows if plot else []


def plot(rows, path, n, threads):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
        ax.bar(range(len(rows)), [r[1] for r in rows])
        ax.set_xticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
        ax.set_ylabel("tokens / s")
        ax.set_title(f"SmolLM2-135M, CPU ({threads} threads), T=0, {n} new tokens")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        print(f"plot: {path}")
    except ImportError:
        pass


if __name__ == "__main__":
    main()

"""End-to-end generation benchmark on SmolLM2-135M-Instruct (CPU by default).

All in one run, on the same prompts (real texts, chat-formatted), 128 new
tokens, temperature 0, fp32:
  - transformers `generate` (plain, and prompt-lookup assisted generation, the
    assisted mode that needs no second model), when transformers is installed;
  - our engine, plain decoding (drafter=None);
  - our engine with each drafter available: the shipped trained DSpark drafter
    (if present) and a drafter copied from the target's first layers.
Reports tokens/s, tau (tokens per target step) and whether the greedy output
equals plain decoding, and writes a bar chart (PNG) next to RESULTS.md.

    python bench/bench_e2e.py --quick          # batch 1, 2 prompts, 48 tokens
    python bench/bench_e2e.py                  # batch 1 and 8, 128 tokens
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dspark_ops.engine import SpeculativeEngine
from dspark_ops.generate import shipped_drafter
from dspark_ops.models import LlamaModel, TextTokenizer, build_drafter_from_target, load_drafter, resolve_model

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


def run_engine(target, drafter, prompts, n, batch, stop):
    engine = SpeculativeEngine(target, drafter, max_batch=batch, max_tokens=4096,
                               scheduler="sync" if drafter is not None and drafter.confidence_weights() is not None
                               else "fixed")
    engine.generate([prompts[0]], max_new_tokens=4)  # warm-up (lazy init, first-call costs)
    engine = SpeculativeEngine(target, drafter, max_batch=batch, max_tokens=4096, scheduler=engine.scheduler,
                               sps_table=engine.sps_table)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, max_new_tokens=n, stop_token_ids=stop)
    dt = time.perf_counter() - t0
    rounds = sum(r.stats.rounds for r in engine.finished.values())
    tau = sum(r.stats.emitted for r in engine.finished.values()) / max(rounds, 1)
    return outs, sum(map(len, outs)) / dt, tau


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--forward-cost", action="store_true", help="only the target forward time by block size")
    ap.add_argument("--plot", default=str(Path(__file__).with_name("e2e_smollm2.png")))
    args = ap.parse_args()
    n = 48 if args.quick else 128
    batches = [1] if args.quick else [1, 8]
    path = resolve_model("smollm2-135m")
    tok = TextTokenizer(path)
    target = LlamaModel.from_pretrained(path, dtype=torch.float32)
    if args.forward_cost:
        return forward_cost(target)
    prompts = [tok.encode_chat(p) for p in PROMPTS[: 2 if args.quick else 8]]
    stop = [tok.eos_token_id, tok.tokenizer.token_to_id("<|im_end|>")]
    drafters = {"self-copy (4 layers)": build_drafter_from_target(target, num_layers=4, block_size=7)}
    shipped = shipped_drafter("smollm2-135m")
    if shipped is not None:
        drafters = {"DSpark (shipped)": load_drafter(shipped, target, dtype=target.dtype), **drafters}
    print(f"threads {torch.get_num_threads()}, {n} new tokens, T=0, fp32, {len(prompts)} prompts")
    print("| system | batch | tok/s | vs plain engine | tau | greedy == plain |")
    print("|---|---|---|---|---|---|")
    rows = []
    for batch in batches:
        plain, plain_tps, _ = run_engine(target, None, prompts, n, batch, stop)
        if batch == 1:
            try:
                hf, hf_tps = run_transformers(path, prompts, n, stop, assisted=False)
                print(f"| transformers generate | 1 | {hf_tps:.1f} | {hf_tps / plain_tps:.2f}x | 1.00 | "
                      f"{hf == plain} |", flush=True)
                rows.append(("transformers", hf_tps))
                hfa, hfa_tps = run_transformers(path, prompts, n, stop, assisted=True)
                print(f"| transformers prompt-lookup | 1 | {hfa_tps:.1f} | {hfa_tps / plain_tps:.2f}x | - | "
                      f"{hfa == plain} |", flush=True)
                rows.append(("transformers\nprompt-lookup", hfa_tps))
            except ImportError:
                print("| transformers | - | not installed | | | |")
        print(f"| dspark engine, plain | {batch} | {plain_tps:.1f} | 1.00x | 1.00 | True |", flush=True)
        rows.append((f"engine plain\nb={batch}", plain_tps))
        for name, drafter in drafters.items():
            outs, tps, tau = run_engine(target, drafter, prompts, n, batch, stop)
            print(f"| dspark engine, {name} | {batch} | {tps:.1f} | {tps / plain_tps:.2f}x | {tau:.2f} | "
                  f"{outs == plain} |", flush=True)
            rows.append((f"{name}\nb={batch}", tps))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
        ax.bar(range(len(rows)), [r[1] for r in rows])
        ax.set_xticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
        ax.set_ylabel("tokens / s")
        ax.set_title(f"SmolLM2-135M, CPU ({torch.get_num_threads()} threads), T=0, {n} new tokens")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")
    except ImportError:
        pass


if __name__ == "__main__":
    main()

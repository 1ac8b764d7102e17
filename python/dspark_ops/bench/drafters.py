"""Drafters on held-out prompts: DSpark vs DFlash vs EAGLE-3-style, and speculative vs plain decoding speed.

For each drafter, domain (code / prose / math, from the dataset's held-out
split) and temperature (0 and 1), block 7, "fixed" scheduler (every draft is
verified):

- tau: mean tokens emitted per decode round, bonus token included;
- per-position conditional acceptance P(draft k accepted | drafts < k accepted),
  pooled over domains (PNG: the DSpark paper's Figure 2 curve);
- decode tokens/s of the engine with each drafter vs the engine's own plain
  decoding (``--speed``), batch 1, temperature 0, with the outputs checked
  token for token (greedy speculative decoding is lossless).
- ``--draft-vocab K ...``: each drafter again ("name/K") with a draft vocabulary
  of the K ids most frequent in the dataset's training responses (tau and speed
  in the engine), the trade of ``dspark_ops.draft_vocab``. Without "/K" a
  drafter proposes every id (a draft vocabulary stored with it is not used), so
  tau compares the drafters themselves; ``--draft-vocab-only`` keeps only the
  "/K" rows (for drafters trained over their draft vocabulary, which learned
  nothing else).

For tau, DSpark and DFlash drafters run in :class:`~dspark_ops.engine.SpeculativeEngine`
and the EAGLE-3-style drafter in the chain-drafting loop below over dense
caches (the engine drives it too and drafts the same tokens; ``--speed`` times
it there), all verified by the same ``dspark_ops.verify`` op, so tau means the
same thing for all three.

    dspark bench drafters --data-dir DATA --dspark DIR [--dflash DIR] [--eagle3 DIR] [--speed]
    dspark bench drafters ... --quick      # 3 prompts per domain, 48 tokens
    # one process per drafter (in parallel), then one table and plot:
    dspark bench drafters --data-dir DATA --eagle3 DIR --json e.json   (etc.)
    dspark bench drafters --combine d.json f.json e.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import dspark_ops
from dspark_ops._cli_types import missing_extra
from dspark_ops.engine import SpeculativeEngine
from dspark_ops.models import DenseKVCache, Eagle3Drafter, LlamaModel, load_drafter, resolve_model
from dspark_ops.train import load_samples, response_draft_vocab

DOMAINS = ("code", "prose", "math")


def held_out_prompts(data_dir, per_domain: int) -> dict[str, list[list[int]]]:
    samples = load_samples(Path(data_dir) / "heldout.jsonl")
    if not samples:
        raise SystemExit(f"{data_dir}/heldout.jsonl has no samples")
    out = {d: [s.prompt for s in samples if s.domain == d][:per_domain] for d in DOMAINS}
    return {d: p for d, p in out.items() if p}


class Counts:
    def __init__(self):
        self.rounds = self.emitted = 0
        self.attempts: list[int] = []
        self.accepts: list[int] = []
        self.per_prompt: list[tuple[int, int]] = []   # (rounds, emitted) of each prompt, in prompt order

    def add(self, verified: int, accepted: int) -> None:
        self.rounds += 1
        self.emitted += accepted + 1
        while len(self.attempts) < verified:
            self.attempts.append(0)
            self.accepts.append(0)
        for j in range(min(accepted + 1, verified)):
            self.attempts[j] += 1
            self.accepts[j] += j < accepted

    def merge(self, other: "Counts") -> None:
        self.rounds += other.rounds
        self.emitted += other.emitted
        self.per_prompt += other.per_prompt
        for j in range(len(other.attempts)):
            if j >= len(self.attempts):
                self.attempts.append(0)
                self.accepts.append(0)
            self.attempts[j] += other.attempts[j]
            self.accepts[j] += other.accepts[j]

    @property
    def tau(self) -> float:
        return self.emitted / max(self.rounds, 1)

    def conditional(self) -> list[float]:
        return [a / t if t else float("nan") for a, t in zip(self.accepts, self.attempts)]


def engine_counts(target, drafter, prompts, max_new_tokens, temperature, seed, eos) -> Counts:
    engine = SpeculativeEngine(target, drafter, max_batch=len(prompts),
                               max_tokens=len(prompts) * (max(map(len, prompts)) + max_new_tokens + 32))
    ids = engine._submit(prompts, max_new_tokens, temperature, 0, 1.0, 0.0, seed, eos)
    while engine.has_work:
        engine.step()
    c = Counts()
    for i in ids:
        st = engine.finished[i].stats
        c.rounds += st.rounds
        c.emitted += st.emitted
        other = Counts()
        other.attempts, other.accepts = list(st.attempts), list(st.accepts)
        c.merge(other)
        c.per_prompt.append((st.rounds, st.emitted))
    return c


def bootstrap_gain(a: dict, b: dict, domains, resamples: int = 2000) -> tuple[float, float] | None:
    """95% interval of macro tau(a) / macro tau(b) - 1, resampling the held-out prompts of each domain with
    replacement (paired: both drafters ran on the same prompts); None without per-prompt counts."""
    if not all("per_prompt" in a[d] and "per_prompt" in b[d] for d in domains):
        return None
    gen = torch.Generator().manual_seed(0)
    macro = [torch.zeros(resamples, dtype=torch.float64) for _ in range(2)]
    for d in domains:
        pa, pb = (torch.tensor(x[d]["per_prompt"], dtype=torch.float64) for x in (a, b))
        idx = torch.randint(0, len(pa), (resamples, len(pa)), generator=gen)
        for m, p in zip(macro, (pa, pb)):
            m += p[idx, 1].sum(1) / p[idx, 0].sum(1) / len(domains)   # tau = emitted / rounds, pooled per domain
    gains = macro[0] / macro[1] - 1
    return float(gains.quantile(0.025)), float(gains.quantile(0.975))


@torch.no_grad()
def eagle3_generate(target: LlamaModel, drafter: Eagle3Drafter, prompt: list[int], max_new_tokens: int,
                    temperature: float, seed: int, eos, counts: Counts, block: int = 7) -> list[int]:
    """Chain drafting with an EAGLE-3-style drafter (batch 1), verified losslessly by ``dspark_ops.verify``."""
    layers = drafter.config.target_layer_ids
    cap = len(prompt) + max_new_tokens + block + 2
    tcache, dcache = DenseKVCache.for_model(target, 1, cap), DenseKVCache.for_model(drafter, 1, cap)
    gen = torch.Generator().manual_seed(seed)
    seeds = torch.tensor([seed])
    offset = 0
    out = target(torch.tensor([prompt]), kv=tcache, hidden_layers=layers)
    tokens, _ = dspark_ops.verify(out.logits[:, -1:], torch.empty(1, 0, dtype=torch.int32), None,
                                  temperature=temperature, seed=seeds, offset=torch.tensor([offset]))
    output = [int(tokens[0, 0])]
    new_ids, feats = torch.tensor([prompt[1:] + output]), out.layer_hidden
    while len(output) < max_new_tokens and output[-1] not in eos:
        n = int(dcache.lengths[0])
        h = drafter(new_ids, feats, kv=dcache)[:, -1:]
        g = min(block, max_new_tokens - len(output) - 1)
        drafts, probs = [], []
        for j in range(g):
            logits = drafter.compute_logits(h)[0, 0].float()
            if temperature == 0:
                tok = int(logits.argmax())
            else:
                q = torch.softmax(logits / temperature, -1)
                tok = int(torch.multinomial(q, 1, generator=gen))
                probs.append(q)
            drafts.append(tok)
            if j + 1 < g:
                h = drafter(torch.tensor([[tok]]), h, kv=dcache, from_target=False)
        dcache.truncate([n + new_ids.shape[1]])   # drop the drafted rows: the verified tokens replace them
        block_ids = torch.tensor([[output[-1]] + drafts])
        vout = target(block_ids, kv=tcache, hidden_layers=layers)
        offset += 1
        draft_t = torch.tensor([drafts], dtype=torch.int32).view(1, g)
        draft_p = torch.stack(probs).unsqueeze(0) if probs else None
        tokens, acc = dspark_ops.verify(vout.logits, draft_t, draft_p, temperature=temperature, seed=seeds,
                                        offset=torch.tensor([offset]))
        a = int(acc[0])
        counts.add(g, a)
        tcache.truncate([int(tcache.lengths[0]) - g + a])
        new = tokens[0, :a + 1].tolist()
        output.extend(new)
        new_ids, feats = torch.tensor([new]), vout.layer_hidden[:, :a + 1]
    for i, t in enumerate(output):
        if t in eos:
            return output[:i + 1]
    return output[:max_new_tokens]


def speed(target, drafters: dict, prompts, max_new_tokens, eos) -> dict:
    """Decode tokens/s at batch 1, temperature 0: the plain engine, then the engine with each drafter
    (DSpark / DFlash in parallel blocks, EAGLE-3 autoregressively); each output compared with plain's."""
    res = {}
    for name, d in (("plain", None), *drafters.items()):
        engine = SpeculativeEngine(target, d, max_batch=1, max_tokens=max(map(len, prompts)) + max_new_tokens + 32)
        engine.generate(prompts[:1], 8, stop_token_ids=eos)           # warm-up
        engine.stats = type(engine.stats)()
        t0 = time.perf_counter()
        outs = engine.generate(prompts, max_new_tokens, temperature=0.0, stop_token_ids=eos)
        wall = time.perf_counter() - t0
        s = engine.stats.summary()
        res[name] = {"outputs": outs, "decode_tok_s": s["decode_tokens_per_s"],
                     "e2e_tok_s": sum(map(len, outs)) / wall, "steps": engine.stats.steps}
    for name in drafters:
        res[name]["identical"] = res[name]["outputs"] == res["plain"]["outputs"]
    for r in res.values():
        r.pop("outputs")
    return res


def report(results: dict, temperatures, domains, png) -> None:
    """The tau table, the gains of DSpark over the baselines, and the conditional-acceptance PNG."""
    print("\n| drafter | T | " + " | ".join(domains) + " | macro tau |")
    print("|---|---|" + "---|" * (len(domains) + 1))
    for name in results:
        for T in temperatures:
            r = results[name][str(T)]
            print(f"| {name} | {T:g} | " + " | ".join(f"{r[d]['tau']:.2f}" for d in domains)
                  + f" | {r['macro_tau']:.2f} |")
    for name in [n for n in results if n.split("/")[0] == "DSpark"]:
        suffix = name[len("DSpark"):]                 # "" or "/K": compare like with like
        for other in (f"DFlash{suffix}", f"EAGLE-3{suffix}"):
            if other in results:
                parts = []
                for T in temperatures:
                    ours, theirs = results[name][str(T)], results[other][str(T)]
                    ci = bootstrap_gain(ours, theirs, domains)
                    parts.append(f"T={T:g} {ours['macro_tau'] / theirs['macro_tau'] - 1:+.1%}"
                                 + ("" if ci is None else f" (95% CI {ci[0]:+.1%} .. {ci[1]:+.1%})"))
                print(f"{name} macro tau vs {other}: " + ", ".join(parts))
    print("\nconditional acceptance by position (pooled over domains):")
    for name in results:
        for T in temperatures:
            cond = results[name][str(T)]["pooled"]["conditional"]
            print(f"  {name:8s} T={T:g}: " + " ".join(f"{c:.3f}" for c in cond))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(temperatures), figsize=(5.5 * len(temperatures), 4), squeeze=False)
    for ax, T in zip(axes[0], temperatures):
        for name in results:
            cond = results[name][str(T)]["pooled"]["conditional"]
            ax.plot(range(1, len(cond) + 1), cond, marker="o", label=name)
        ax.set_title(f"conditional acceptance per position, T={T:g}")
        ax.set_xlabel("draft position k")
        ax.set_ylabel("P(accept k | accepted < k)")
        ax.set_ylim(0, 1)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"plot: {png}")


def draft_vocab_variants(target, drafters: dict, args) -> dict:
    """name -> the loaded drafter proposing every id; with --draft-vocab also "name/K" -> the drafter
    proposing only the K most frequent training-response ids."""
    out = {}
    train = load_samples(Path(args.data_dir) / "train.jsonl") if args.draft_vocab else []
    V = target.config.vocab_size
    for name, path in drafters.items():
        if not args.draft_vocab_only:
            out[name] = load_drafter(path, target, dtype="float32")
            out[name].draft_vocab = None
        for K in args.draft_vocab or ():
            d = load_drafter(path, target, dtype="float32")
            d.draft_vocab = response_draft_vocab(train, V, K)
            out[f"{name}/{K}"] = d
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--data-dir")
    ap.add_argument("--dspark")
    ap.add_argument("--dflash")
    ap.add_argument("--eagle3")
    ap.add_argument("--prompts-per-domain", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--speed", action="store_true", help="also time the engine with each drafter against plain decoding")
    ap.add_argument("--speed-prompts", type=int, default=3)
    ap.add_argument("--temperatures", type=float, nargs="*", default=[0.0, 1.0])
    ap.add_argument("--png", default="drafters_acceptance.png",
                    help="acceptance figure (bench/drafters_acceptance.png in the repository)")
    ap.add_argument("--json", default=None, help="write the raw numbers here")
    ap.add_argument("--combine", nargs="*", default=None,
                    help="only print the table and plot of earlier --json files (runs nothing)")
    ap.add_argument("--draft-vocab", type=int, nargs="*", default=None, metavar="K",
                    help="also evaluate each drafter with a draft vocabulary of the K most frequent training-response "
                         "ids, in the engine")
    ap.add_argument("--draft-vocab-only", action="store_true",
                    help="evaluate the --draft-vocab variants only (drafters trained over their draft vocabulary, "
                         "dspark train-draft --train-on-draft-vocab, only learned those ids)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if problem := missing_extra("matplotlib", "plots", "the acceptance figure (--png)"):
        ap.error(problem)
    if args.combine:
        results, temps = {}, None
        for f in args.combine:
            d = json.loads(Path(f).read_text())
            results.update(d["tau"])
            temps = d["temperatures"]
            domains = d["domains"]
        report(results, temps, domains, args.png)
        return
    if not args.data_dir:
        ap.error("--data-dir is required (unless --combine)")
    if args.draft_vocab_only and not args.draft_vocab:
        ap.error("--draft-vocab-only needs --draft-vocab K")
    if args.quick:
        args.prompts_per_domain, args.max_new_tokens, args.speed_prompts = 3, 48, 2

    folder = resolve_model(args.target)
    target = LlamaModel.from_pretrained(folder, dtype="float32")
    eos = [t for t in (target.config.eos_token_id,) if isinstance(t, int)]
    prompts = held_out_prompts(args.data_dir, args.prompts_per_domain)
    drafters = {k: v for k, v in (("DSpark", args.dspark), ("DFlash", args.dflash), ("EAGLE-3", args.eagle3)) if v}
    print(f"target {args.target}, threads {torch.get_num_threads()}, block 7, prompts/domain "
          f"{ {d: len(p) for d, p in prompts.items()} }, max_new_tokens {args.max_new_tokens}")
    variants = draft_vocab_variants(target, drafters, args)
    results: dict = {}
    for name, drafter in variants.items():
        for T in args.temperatures:
            pooled = Counts()
            for domain, ps in prompts.items():
                t0 = time.perf_counter()
                if isinstance(drafter, Eagle3Drafter) and "/" not in name:
                    c = Counts()
                    for i, p in enumerate(ps):
                        before = c.rounds, c.emitted
                        eagle3_generate(target, drafter, p, args.max_new_tokens, T, i, eos, c)
                        c.per_prompt.append((c.rounds - before[0], c.emitted - before[1]))
                else:
                    c = engine_counts(target, drafter, ps, args.max_new_tokens, T, 0, eos)
                pooled.merge(c)
                results.setdefault(name, {}).setdefault(str(T), {})[domain] = {
                    "tau": c.tau, "conditional": c.conditional(), "per_prompt": c.per_prompt}
                print(f"{name:8s} T={T:g} {domain:6s} tau {c.tau:.3f}  ({c.rounds} rounds, "
                      f"{time.perf_counter() - t0:.0f}s)", flush=True)
            results[name][str(T)]["pooled"] = {"tau": pooled.tau, "conditional": pooled.conditional()}
            taus = [results[name][str(T)][d]["tau"] for d in prompts]
            results[name][str(T)]["macro_tau"] = sum(taus) / len(taus)
    if results:
        report(results, args.temperatures, list(prompts), args.png)
    out = {"tau": results, "temperatures": args.temperatures, "domains": list(prompts)}
    if args.speed:
        if not drafters:
            ap.error("--speed needs a drafter (--dspark, --dflash or --eagle3)")
        sp_prompts = [ps[i] for i in range(args.speed_prompts) for ps in prompts.values() if i < len(ps)]
        sp_prompts = sp_prompts[:args.speed_prompts]
        sp = speed(target, variants, sp_prompts, args.max_new_tokens, eos)
        plain = sp["plain"]
        print(f"\nbatch 1, T=0, {len(sp_prompts)} prompts x {args.max_new_tokens} tokens: plain "
              f"{plain['decode_tok_s']:.1f} tok/s decode ({plain['e2e_tok_s']:.1f} end to end incl. prefill)")
        for name in variants:
            r = sp[name]
            print(f"  {name:8s} {r['decode_tok_s']:.1f} tok/s -> {r['decode_tok_s'] / plain['decode_tok_s']:.2f}x "
                  f"decode ({r['e2e_tok_s']:.1f} end to end); identical greedy output: {r['identical']}")
        out["speed"] = sp
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""Speculation at long contexts (SmolLM2-135M-Instruct with the shipped drafter, CPU).

Each request summarises a Python source file (standard-library modules, truncated to --context
tokens with the chat template), greedy, --new-tokens tokens. Three engines on the same prompts,
in one run: plain decoding, always drafting, and draft_max_batch="auto". Prints the measured
decode time per step of each next to the step costs auto profiled (on frozen slots, which attend
to no context), so the gap between the two is visible.

    dspark bench context --batch 8 --context 1000
    dspark bench context --batch 1 --context 1500
"""
from __future__ import annotations

import argparse
import importlib
import inspect

import torch

from dspark_ops.engine import SpeculativeEngine
from dspark_ops.generate import shipped_drafter
from dspark_ops.models import LlamaModel, TextTokenizer, load_drafter, resolve_model

MODULES = ["json.decoder", "json.encoder", "collections", "textwrap", "argparse", "inspect", "difflib", "shlex"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8, help="requests, at most 8")
    ap.add_argument("--context", type=int, default=1000, help="prompt tokens per request")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    if not 1 <= args.batch <= len(MODULES):
        ap.error(f"--batch must be in [1, {len(MODULES)}]")
    path = resolve_model("smollm2-135m", dtype=torch.float32)
    target = LlamaModel.from_pretrained(path, dtype=torch.float32, device="cpu")
    tok = TextTokenizer(path)
    drafter = load_drafter(shipped_drafter("smollm2-135m"), target, dtype=target.dtype, device=target.device)
    prompts = [tok.encode_chat("Summarise this code:\n" + inspect.getsource(importlib.import_module(m)))[:args.context]
               for m in MODULES[:args.batch]]
    B = args.batch
    print(f"threads: {torch.get_num_threads()}, batch {B}, {args.context} prompt tokens, {args.new_tokens} new tokens")
    print("| engine | decode ms per step | profiled plain / drafting ms | tokens per step per request | "
          "tok/s | vs plain | drafting steps |")
    print("|---|---|---|---|---|---|---|")
    plain_tok_s = None
    for name, d, dmb in (("plain", None, None), ("always drafting", drafter, None), ("auto", drafter, "auto")):
        engine = SpeculativeEngine(target, d, max_batch=B, max_tokens=B * (args.context + args.new_tokens + 64),
                                   draft_max_batch=dmb)
        engine.generate([p[:32] for p in prompts], 4)   # warm-up (auto profiles its step costs here)
        engine.stats = type(engine.stats)()
        engine.generate(prompts, args.new_tokens)
        s = engine.stats
        tok_s = s.emitted / s.decode_s
        plain_tok_s = plain_tok_s or tok_s
        profiled = ("-" if engine.step_cost_table is None else
                    " / ".join(f"{x * 1e3:.1f}" for x in engine.step_cost_table[B].tolist()))
        print(f"| {name} | {s.decode_s / s.steps * 1e3:.1f} | {profiled} | {s.emitted / s.steps / B:.2f} | "
              f"{tok_s:.1f} | {tok_s / plain_tok_s:.2f}x | {s.drafting_steps} of {s.steps} |", flush=True)


if __name__ == "__main__":
    main()

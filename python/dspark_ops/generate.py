"""``dspark generate``: text generation on a real model, with and without speculative decoding."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ._cli_types import existing_dir, model_name_or_dir, non_empty, positive_int

# Trained drafters shipped with the package (or found in a source checkout), by target name.
SHIPPED_DRAFTERS = {"smollm2-135m": "smollm2-135m-dspark"}


def shipped_drafter(model: str) -> Path | None:
    name = SHIPPED_DRAFTERS.get(model)
    if name is None:
        return None
    here = Path(__file__).resolve().parent
    for folder in (here / "drafters" / name, here.parents[1] / "drafters" / name):
        if (folder / "config.json").is_file():
            return folder
    return None


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate text with a target model, speculative by default")
    g.add_argument("--model", default="smollm2-135m", type=model_name_or_dir,
                   help="known model name or a Hugging Face folder")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--drafter", default=None, type=existing_dir,
                     help="drafter folder (default: the shipped one for --model)")
    src.add_argument("--self-drafter", type=positive_int, metavar="LAYERS", default=None,
                     help="draft with a copy of the target's first LAYERS layers (no training needed)")
    src.add_argument("--no-spec", action="store_true", help="plain autoregressive decoding only")
    g.add_argument("--prompt", action="append", type=non_empty, help="prompt text (repeat for a batch)")
    g.add_argument("--raw", action="store_true", help="use the prompt as plain text, not a chat message")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--block-size", type=positive_int, default=None,
                   help="drafted tokens per step (default: the drafter's)")
    g.add_argument("--scheduler", default=None, choices=["fixed", "sync", "async"],
                   help="verify-length scheduler (default: sync when the drafter has a confidence head)")
    g.add_argument("--compare", action="store_true", help="also run plain decoding and print the speedup")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="model weights (on CPU bfloat16 weights are computed in fp32: about 1.5x faster than "
                        "float32 at batch 1, a different model: its weights rounded)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the models run (auto: cuda when a GPU is visible)")
    g.add_argument("--eager", action="store_true", help="on CUDA: no CUDA graphs (the step runs eagerly)")
    g.add_argument("--draft-vocab", action=argparse.BooleanOptionalAction, default=True,
                   help="let the drafter propose only its draft vocabulary's ids when it has one (lossless either way)")
    g.add_argument("--draft-max-batch", type=parse_draft_max_batch, default=None, metavar="N|auto",
                   help="draft only while at most N prompts run, larger batches decode plainly; auto: draft when "
                        "the profiled step costs and recent acceptance say it pays (default: always draft)")
    g.set_defaults(func=run, check=check)


def check(args) -> str | None:
    """What is wrong with the arguments as a whole, before any model loads (None: nothing)."""
    from .engine import SamplingParams

    try:
        SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.min_p, args.seed).check()
    except ValueError as e:   # "top_p must be ..." -> "--top-p must be ..."
        name, _, rule = str(e).partition(" ")
        return f"--{name.replace('_', '-')} {rule}"
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: no CUDA GPU is visible to torch"
    return None


def load_target(path, dtype: torch.dtype, device):
    """The target model as the engine runs it.

    On CPU, bfloat16 means bf16 weights computed in fp32: the model is the bf16 one (its weights rounded to
    bf16), held in fp32 so that the packed linear kernel streams the weights as bf16 (half the bytes; widened
    exactly) and everything else runs in fp32. Measured on SmolLM2-135M (AMD Zen 4, 2 threads, batch 1):
    1.47x the fp32 model, while bf16 arithmetic through torch/oneDNN ran at 0.62x the fp32 model.
    """
    from .models import LlamaModel

    model = LlamaModel.from_pretrained(path, dtype=dtype, device=device)
    if torch.device(device).type == "cpu" and dtype == torch.bfloat16:
        model = model.float()
    return model


def parse_draft_max_batch(text: str) -> int | str:
    """An argparse type for --draft-max-batch: an integer or 'auto'."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or 'auto', got {value}")
    return value


def _engine_for(target, drafter, args):
    from .engine import SpeculativeEngine

    if drafter is None:   # plain decoding (--no-spec, or the --compare baseline) verifies no drafts
        scheduler = "fixed"
    else:
        scheduler = args.scheduler or ("sync" if drafter.confidence_weights() is not None else "fixed")
    return SpeculativeEngine(target, drafter, block_size=args.block_size, scheduler=scheduler,
                             max_batch=max(1, len(args.prompt)), max_tokens=4096,
                             cuda_graphs=False if args.eager else None, draft_vocab=args.draft_vocab,
                             draft_max_batch=None if drafter is None else args.draft_max_batch)


def _run_engine(engine, prompts, args, tokenizer, stop, *, show: bool):
    t0 = time.perf_counter()
    outputs = [[] for _ in prompts]
    for i, toks in engine.stream(prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop_token_ids=stop):
        outputs[i].extend(toks)
        if show and len(prompts) == 1:
            print(tokenizer.decode(toks), end="", flush=True)
    elapsed = time.perf_counter() - t0
    if show and len(prompts) == 1:
        print()
    elif show:
        for i, o in enumerate(outputs):
            print(f"--- [{i}]\n{tokenizer.decode(o)}")
    return outputs, elapsed


def _report(label, engine, outputs, elapsed):
    n = sum(len(o) for o in outputs)
    s = engine.stats.summary()
    line = (f"{label}: {n} tokens in {elapsed:.2f} s = {n / elapsed:.1f} tok/s "
            f"(decode {s['decode_tokens_per_s']:.1f} tok/s")
    finished = list(engine.finished.values())
    rounds = sum(r.stats.rounds for r in finished)
    if engine.drafter is not None and rounds:
        tau = sum(r.stats.emitted for r in finished) / rounds
        acc = ", ".join("-" if a is None else f"{a:.2f}" for a in s["acceptance_by_position"])
        line += f", tau {tau:.2f} tokens/step, verify tokens/step {s['verify_tokens_per_step']:.1f}, "
        line += f"acceptance by position [{acc}]"
        if engine.draft_max_batch is not None:
            line += f", drafted in {s['drafting_steps']} of {engine.stats.steps} steps"
    t = s["time_s"]
    line += f"; time: prefill {t['prefill']:.2f} s, draft {t['draft']:.2f} s, schedule {t['schedule']:.3f} s, " \
            f"verify {t['verify']:.2f} s)"
    print(line, file=sys.stderr)


def run(args) -> int:
    from .models import TextTokenizer, build_drafter_from_target, load_drafter, resolve_model

    try:
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        path = resolve_model(args.model, dtype=getattr(torch, args.dtype))
        target = load_target(path, getattr(torch, args.dtype), device)
        tokenizer = TextTokenizer(path)
        drafter = None
        if args.self_drafter is not None:
            drafter = build_drafter_from_target(target, num_layers=args.self_drafter, block_size=args.block_size or 7)
        elif not args.no_spec:
            folder = args.drafter or shipped_drafter(args.model)
            if folder is None:
                print(f"dspark generate: no trained drafter for {args.model!r}; pass --drafter, --self-drafter N "
                      f"or --no-spec", file=sys.stderr)
                return 2
            drafter = load_drafter(folder, target, dtype=target.dtype, device=target.device)  # CPU kernels run fp32
        prompts_text = args.prompt or ["Explain in three sentences why the sky is blue."]
        prompts = [tokenizer.encode(p) if args.raw else tokenizer.encode_chat(p) for p in prompts_text]
        args.prompt = prompts_text
        stop = tokenizer.stop_ids
        engine = _engine_for(target, drafter, args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"dspark generate: {e}", file=sys.stderr)
        return 2
    try:   # the engine checks every request (e.g. prompt + --max-new-tokens past its KV cache) before decoding
        outputs, elapsed = _run_engine(engine, prompts, args, tokenizer, stop, show=True)
    except ValueError as e:
        print(f"dspark generate: {e}", file=sys.stderr)
        return 2
    label = "plain" if drafter is None else "speculative"
    _report(label, engine, outputs, elapsed)
    if args.compare and drafter is not None:
        plain = _engine_for(target, None, args)
        plain_out, plain_elapsed = _run_engine(plain, prompts, args, tokenizer, stop, show=False)
        _report("plain", plain, plain_out, plain_elapsed)
        n, pn = sum(map(len, outputs)), sum(map(len, plain_out))
        same = "identical output" if plain_out == outputs else "outputs differ (expected only at T > 0)"
        print(f"speedup: {(n / elapsed) / (pn / plain_elapsed):.2f}x ({same})", file=sys.stderr)
    return 0

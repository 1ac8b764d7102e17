"""This library's engine and llama.cpp's own DSpark (`--spec-type draft-dspark`) side by side, on the same
target, the same drafter and the same prompts, in one run on this CPU.

SmolLM2-135M-Instruct fp32 and a DSpark drafter (default: the shipped one) in the standard format, converted to
GGUF by llama.cpp's convert_hf_to_gguf.py (the drafter with --target-model-dir). llama.cpp is the vendored source
of the llama-cpp-python 0.3.36 sdist, its llama-server built with CMake for this CPU (dspark_ops.bench._llamacpp).
Batch 1, the chat and code prompts of `dspark bench e2e`, 128 new tokens, every system on the same threads:

  - llama.cpp target alone, and target + drafter (draft-dspark, --spec-draft-n-max = the drafter's block size);
  - the dspark engine plain, and with the drafter (its default schedule: the confidence scheduler when the drafter
    is calibrated).

At T=0 and T=1 (no top-k/top-p/min-p; llama.cpp's penalties neutral): tokens/s (new tokens over the wall time of
the requests, prompt processing included), tau (tokens emitted per target forward: ours counted by the engine;
llama.cpp's from its accepted-draft count, new / (new - accepted)), and at T=0 whether each system's greedy output
equals the dspark plain engine's token for token.

    dspark bench llamacpp_dspark                      # first run builds llama-server (~10 min on 2 cores)
    dspark bench llamacpp_dspark --temperatures 0 --max-new-tokens 64
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from ..machine import at_threads, machine_header


def llama_tau(new_tokens: int, accepted: int) -> float:
    """Tokens per target forward from llama-server's counts: every verification round emits its accepted drafts
    plus one token of the target's own, so rounds = new - accepted."""
    return new_tokens / max(new_tokens - accepted, 1)


def strip_stop(tokens: list[int], stop: set[int]) -> list[int]:
    """Output without a final stop token (llama-server leaves the end-of-generation token out; the engine keeps it)."""
    return tokens[:-1] if tokens and tokens[-1] in stop else tokens


class LlamaServer:
    """llama-server on a free local port for the lifetime of a ``with`` block."""

    def __init__(self, server: Path, target: Path, threads: int, drafter: Path | None, block_size: int, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [str(server), "-m", str(target), "--host", "127.0.0.1", "--port", str(self.port), "-c", "4096",
               "-np", "1", "-t", str(threads), "-tb", str(threads), "-fa", "on", "--no-warmup"]
        if drafter is not None:
            cmd += ["-md", str(drafter), "--spec-type", "draft-dspark", "--spec-draft-n-max", str(block_size),
                    "-td", str(threads), "-tbd", str(threads)]
        self.cmd, self.log, self.drafts = cmd, log, drafter is not None

    def __enter__(self) -> "LlamaServer":
        self.proc = subprocess.Popen(self.cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}: "
                                   + " / ".join(self.log.read_text().strip().splitlines()[-3:]))
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.proc.kill()
        raise RuntimeError("llama-server did not become ready within 300 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)

    def complete(self, prompt: list[int], n: int, temperature: float, seed: int) -> dict:
        body = dict(prompt=prompt, n_predict=n, temperature=temperature, top_k=0, top_p=1.0, min_p=0.0,
                    typical_p=1.0, repeat_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                    dry_multiplier=0.0, xtc_probability=0.0, seed=seed, return_tokens=True, cache_prompt=False)
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=3600) as r:
            return json.loads(r.read())


def run_llamacpp(server: LlamaServer, prompts, n, temperature):
    """(outputs, tokens/s, tau or None) over the prompts, after one warm-up request."""
    server.complete(prompts[0], 4, temperature, seed=0)
    outs, new, accepted = [], 0, 0
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        r = server.complete(prompt, n, temperature, seed=i)
        outs.append(r["tokens"])
        new += r["timings"]["predicted_n"]
        accepted += r["timings"].get("draft_n_accepted", 0)
    seconds = time.perf_counter() - t0
    return outs, new / seconds, (llama_tau(new, accepted) if server.drafts else None)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", default=None, help="drafter folder in the standard format (default: the shipped one)")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=8, help="how many of the benchmark prompts")
    ap.add_argument("--threads", type=int, default=0, help="threads for every system (default: torch's)")
    ap.add_argument("--json", default=None, help="write every row (outputs included) to this file")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1 or args.prompts < 1 or args.threads < 0 or any(t < 0 for t in args.temperatures):
        ap.error("--max-new-tokens and --prompts must be >= 1, --threads and --temperatures >= 0")
    threads = args.threads or torch.get_num_threads()
    with at_threads(threads):
        rows = run(args, threads)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def run(args, threads: int) -> list[dict]:
    from ..generate import load_target, shipped_drafter
    from ..models import TextTokenizer, load_drafter, resolve_model
    from . import _llamacpp
    from .e2e import PROMPTS, run_engine

    print(machine_header())
    path = resolve_model("smollm2-135m")
    drafter_dir = Path(args.drafter) if args.drafter else shipped_drafter("smollm2-135m")
    if drafter_dir is None:
        sys.exit("no drafter: pass --drafter (this install ships none)")
    tok = TextTokenizer(path)
    prompts = [tok.encode_chat(p) for p in PROMPTS[:args.prompts]]
    stop = tok.stop_ids
    n = args.max_new_tokens
    target = load_target(path, torch.float32, "cpu")
    drafter = load_drafter(drafter_dir, target, dtype=torch.float32)
    block = drafter.config.block_size
    print(f"SmolLM2-135M-Instruct fp32, drafter {drafter_dir.name} (block {block}), {len(prompts)} chat and code "
          f"prompts, {n} new tokens, batch 1, {threads} threads, llama.cpp {_llamacpp.VERSION} sdist's llama-server")

    rows = []

    def add(system, temperature, outs=None, tok_s=None, tau=None, note=""):
        rows.append(dict(system=system, temperature=temperature, tok_s=tok_s, tau=tau, outputs=outs, note=note))
        print(f"  T={temperature:g} {system}: " + (f"{tok_s:.1f} tok/s" + (f", tau {tau:.2f}" if tau else "")
                                                  if tok_s is not None else f"missing: {note}"),
              file=sys.stderr, flush=True)

    for t in args.temperatures:
        for name, d in (("dspark engine, plain", None), ("dspark engine + drafter", drafter)):
            outs, tps, tau, _ = run_engine(target, d, prompts, n, 1, stop, temperature=t)
            add(name, t, outs, tps, tau if d is not None else None)
    try:
        server = _llamacpp.tool("llama-server")
        target_gguf = _llamacpp.convert_hf_to_gguf(path, outtype="f32")
        drafter_gguf = _llamacpp.convert_hf_to_gguf(drafter_dir, outtype="f32", target_dir=path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        for t in args.temperatures:
            for name in ("llama.cpp, target alone", "llama.cpp + drafter (draft-dspark)"):
                add(name, t, note=str(e))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for name, d in (("llama.cpp, target alone", None), ("llama.cpp + drafter (draft-dspark)", drafter_gguf)):
                try:
                    with LlamaServer(server, target_gguf, threads, d, block, Path(tmp) / "server.log") as s:
                        for t in args.temperatures:
                            add(name, t, *run_llamacpp(s, prompts, n, t))
                except (OSError, RuntimeError, urllib.error.URLError) as e:
                    for t in args.temperatures:
                        add(name, t, note=str(e))
    report(rows, set(stop))
    return rows


def report(rows: list[dict], stop: set[int]) -> None:
    print("\n| T | system | tok/s | tau | vs llama.cpp + drafter | greedy output = dspark plain |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        t = r["temperature"]
        same_t = {x["system"]: x for x in rows if x["temperature"] == t}
        peer = same_t.get("llama.cpp + drafter (draft-dspark)", {}).get("tok_s")
        ours = same_t["dspark engine, plain"]["outputs"]
        if r["tok_s"] is None:
            print(f"| {t:g} | {r['system']} | missing: {r['note']} | | | |")
            continue
        equal = "-"
        if t == 0:
            same = sum(strip_stop(a, stop) == strip_stop(b, stop) for a, b in zip(r["outputs"], ours))
            equal = f"{same}/{len(ours)}"
        print(f"| {t:g} | {r['system']} | {r['tok_s']:.1f} | {r['tau']:.2f} |" if r["tau"] else
              f"| {t:g} | {r['system']} | {r['tok_s']:.1f} | - |", end="")
        print(f" {r['tok_s'] / peer:.2f}x | {equal} |" if peer else f" - | {equal} |")
    for t in sorted({r["temperature"] for r in rows}):
        same_t = {x["system"]: x["tok_s"] for x in rows if x["temperature"] == t}
        ours, peer = same_t.get("dspark engine + drafter"), same_t.get("llama.cpp + drafter (draft-dspark)")
        if ours and peer:
            verdict = "met" if ours / peer >= 1.2 else "NOT met"
            print(f"goal T={t:g}: dspark engine + drafter / llama.cpp + drafter = {ours / peer:.2f}x "
                  f"(goal >= 1.2x: {verdict})")


if __name__ == "__main__":
    main()

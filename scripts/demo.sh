#!/usr/bin/env bash
# The main job: set-up, then SmolLM2-135M-Instruct generating on this machine with and without
# speculative decoding (prints the text, tau and the speedup), then the verify kernel benchmark.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
dspark info
dspark fetch-model smollm2-135m
DRAFTER_ARGS=()
if ! python -c "import sys; from dspark_ops.generate import shipped_drafter; sys.exit(shipped_drafter('smollm2-135m') is None)"; then
  DRAFTER_ARGS=(--self-drafter 4)   # no trained drafter in this checkout: a copy of the target's first layers
fi
dspark generate --model smollm2-135m "${DRAFTER_ARGS[@]}" --compare --max-new-tokens 96 \
  --prompt "Write a short Python function that returns the n-th Fibonacci number, and explain it."
dspark bench verify --quick

#!/usr/bin/env bash
# The main job: set-up, then what the package can do today.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
dspark info
python bench/bench_verify.py --quick

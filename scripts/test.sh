#!/usr/bin/env bash
# The test suite: set-up, pytest on the normal build, then the op tests again
# on an AddressSanitizer + UBSan build of the CPU kernels, then the packaging
# check (wheel and sdist installed into fresh environments).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
python -m pytest -q "$@"
bash "$ROOT/scripts/sanitize.sh"
bash "$ROOT/scripts/wheel_check.sh"

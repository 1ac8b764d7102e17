#!/usr/bin/env bash
# Builds the CPU kernels with -fsanitize=address,undefined into build/asan and
# runs the op tests (marker `not slow`) with that library loaded: an
# out-of-bounds access in a kernel fails this step.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$(command -v python)"
cmake -S . -B build/asan -G Ninja -DDSPARK_CUDA=off -DDSPARK_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DPython_EXECUTABLE="$PY" -DSKBUILD_PROJECT_VERSION=0.1.0 > build/asan.configure.log
cmake --build build/asan > build/asan.build.log
LIB="$(ls build/asan/_C*.so)"
export DSPARK_OPS_LIBRARY="$ROOT/$LIB"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:halt_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
python -c "import dspark_ops, sys; sys.exit(0 if dspark_ops.build_info()['sanitize'] else 'sanitizer build not loaded')"
python -m pytest -q -m "not slow and not cuda" tests/ops -p no:cacheprovider

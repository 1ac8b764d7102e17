#!/usr/bin/env bash
# One call on a GPU machine: build there (torch + nvcc installed, no internet), run every CUDA
# test and GPU benchmark, write logs under $OUT (default ./out). Budget: under 8 minutes.
#   run: bash bench/device_check.sh
# The tensor-core attention kernel needs the CUTLASS/CuTe headers at build time. That machine has no
# internet: carry this checkout's copy (27 MB) and point the build at it, e.g. carry
# .venv/lib/python3.11/site-packages/cutlass_library/source/include and run
#   DSPARK_CUTLASS_INCLUDE=$PWD/.venv/lib/python3.11/site-packages/cutlass_library/source/include bash bench/device_check.sh
# Without them the build still succeeds (SIMT path only) and the tc_path line below says so.
set -uo pipefail
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
export DSPARK_CUDA=on DSPARK_CUDA_ARCHS="${DSPARK_CUDA_ARCHS:-90}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"   # the interpreter that holds torch there (its pip may not be the `pip` on PATH)
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
} > "$OUT/env.txt" 2>&1
start=$(date +%s)
step() {  # step NAME TIMEOUT CMD...: run, log to $OUT/NAME.log, one summary line
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? ($(( $(date +%s) - start ))s): $(tail -1 "$OUT/$name.log")" | tee -a "$OUT/summary.txt"
}
step build 300 $PY -m pip install --no-build-isolation --no-deps -e .
step info 30 $PY -m dspark_ops.cli info
step tc_path 30 $PY -c "import dspark_ops; print('attention tensor-core path built:', dspark_ops.build_info()['attention_tc'])"
step cuda_tests 240 $PY -m pytest -q -m cuda tests -p no:cacheprovider
step bench_verify 90 $PY -m dspark_ops.bench.verify --gpu --quick
step bench_verify_draft_vocab 45 $PY -m dspark_ops.bench.verify --gpu --draft-vocab
step bench_attention 90 $PY -m dspark_ops.bench.attention --gpu --quick
step bench_drafter 60 $PY -m dspark_ops.bench.drafter --device cuda --quick
step bench_drafter_bf16 60 $PY -m dspark_ops.bench.drafter --device cuda --quick --dtype bfloat16
step bench_e2e 120 $PY -m dspark_ops.bench.e2e --device cuda --quick --random-weights
echo "total $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.txt"

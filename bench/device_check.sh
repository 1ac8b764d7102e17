#!/usr/bin/env bash
# One call on a GPU machine: build there (torch + nvcc installed, no internet), run every CUDA
# test and GPU benchmark, write logs under $OUT (default ./out). Budget: under 8 minutes.
#   run: bash bench/device_check.sh
set -uo pipefail
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
export DSPARK_CUDA=on DSPARK_CUDA_ARCHS="${DSPARK_CUDA_ARCHS:-90}"
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
  python -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
} > "$OUT/env.txt" 2>&1
start=$(date +%s)
timeout 300 pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
echo "build rc=$? in $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.txt"
python -m dspark_ops.cli info >> "$OUT/summary.txt" 2>&1
timeout 240 python -m pytest -q -m cuda tests -p no:cacheprovider > "$OUT/cuda_tests.log" 2>&1
echo "cuda tests rc=$?: $(tail -1 "$OUT/cuda_tests.log")" | tee -a "$OUT/summary.txt"
for b in "bench/bench_verify.py --gpu"; do
  name=$(echo "$b" | awk '{print $1}' | xargs basename .py)
  timeout 120 python $b > "$OUT/$name.log" 2>&1
  echo "$b rc=$?" | tee -a "$OUT/summary.txt"
done
echo "total $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.txt"

#!/usr/bin/env bash
# GPU truth in one call: on a lent GPU machine (torch + nvcc installed, no network, 16 cores) build the
# extension offline, check that the tensor-core attention was built, run every CUDA test one pytest process
# per file (op tests first), the GPU benchmarks, and compute-sanitizer on the op tests, within one deadline.
#
#   bash bench/device_check.sh --prepare   HERE, before the call: stage the CUTLASS/CuTe headers the CUDA
#                                          kernels include into third_party/cutlass/include (git-ignored;
#                                          the device has no network and no nvidia-cutlass wheel)
#   bash bench/device_check.sh             ON THE GPU MACHINE
#   bash bench/device_check.sh --dry-run   here or in CI: every step's logic without a GPU and without
#                                          building (the installed build is used; CUDA tests skip)
#
# The device call (the `run` tool), after --prepare:
#   command:   bash bench/device_check.sh
#   carry:     ["third_party/cutlass"]
#   timeout_s: 570
# The script stops starting steps at DSPARK_CHECK_BUDGET_S (default 540) seconds, so it ends inside the
# call's limit; a step that would not fit in the time left is skipped and says so. DSPARK_CHECK_STEPS="a b"
# runs only the named steps (and what they need: give "build" too on a fresh machine).
#
# Everything comes back in at most 8 files under $OUT (default ./out), each written as the run goes, so a
# call cut short still returns what it found:
#   summary.txt      one line per step (PASS / FAIL / TIMEOUT / SKIP, time, counts), the verdict last
#   run.log          every step's output under a header
#   build.log        the pip / CMake / compiler output of the build
#   junit.tar.gz     one pytest junit file per test file
#   bench.json       the benchmarks' JSON (device, clocks, times, bandwidth, FlashInfer where importable)
#   sanitizer.log    compute-sanitizer (memcheck) over the op tests
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODE=device
case "${1:-}" in
  "") ;;
  --prepare) MODE=prepare ;;
  --dry-run) MODE=dry ;;
  *) sed -n '2,12p' "$0" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3}"   # the interpreter that holds torch (on the GPU machine: python3)
STAGED="$ROOT/third_party/cutlass/include"

# ---- --prepare: the CUTLASS/CuTe headers the kernels include, and nothing else ---------------------------
if [ "$MODE" = prepare ]; then
  set -e
  inc="$("$PY" -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))")"
  probe="$(mktemp -d)"
  trap 'rm -rf "$probe"' EXIT
  grep -h '^#include <\(cute\|cutlass\)/' csrc/cuda/*.cu csrc/cuda/*.cuh | sort -u > "$probe/probe.cu"
  for arch in 80 90; do   # every header either architecture's compilation opens
    nvcc -M -std=c++20 --expt-relaxed-constexpr -arch=sm_$arch -isystem "$inc" -x cu "$probe/probe.cu" \
      -o "$probe/deps_$arch.d"
  done
  rm -rf "$ROOT/third_party/cutlass"
  mkdir -p "$STAGED"
  cat "$probe"/deps_*.d | tr ' \\' '\n\n' | grep "^$inc/" | sort -u > "$probe/headers.txt"
  while read -r f; do
    rel="${f#"$inc"/}"
    mkdir -p "$STAGED/$(dirname "$rel")"
    cp "$f" "$STAGED/$rel"
  done < "$probe/headers.txt"
  "$PY" - "$ROOT/third_party/cutlass" <<'PYEOF'   # the wheel's version and licence beside the headers
import importlib.metadata as m, pathlib, sys
dist, dst = m.distribution("nvidia-cutlass"), pathlib.Path(sys.argv[1])
(dst / "VERSION").write_text(f"nvidia-cutlass {dist.version}\n")
for f in dist.files or []:
    if "licen" in f.name.lower():
        (dst / f.name).write_bytes(f.locate().read_bytes())
PYEOF
  staged_bytes=$(du -sb "$ROOT/third_party/cutlass" | cut -f1)
  tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  echo "staged $(wc -l < "$probe/headers.txt") headers from $inc: $staged_bytes bytes in third_party/cutlass"
  echo "the call carries about $(( (staged_bytes + tree_bytes) / 1048576 )) MiB (limit 64 MiB: tracked and untracked files + carry)"
  echo "device call: command 'bash bench/device_check.sh', carry [\"third_party/cutlass\"], timeout_s 570"
  exit 0
fi

# ---- the run ------------------------------------------------------------------------------------------
OUT="${OUT:-$ROOT/out}"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/dspark_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/junit" "$WORK/bench"
BUDGET="${DSPARK_CHECK_BUDGET_S:-540}"
RESERVE=10                  # seconds kept for the verdict after the last step
START=$SECONDS
SUMMARY="$OUT/summary.txt" RUNLOG="$OUT/run.log" BUILDLOG="$OUT/build.log" SANLOG="$OUT/sanitizer.log"
: > "$SUMMARY"; : > "$RUNLOG"
FAILED=() SKIPPED=()
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

elapsed() { echo $(( SECONDS - START )); }
left() { echo $(( BUDGET - (SECONDS - START) - RESERVE )); }
wanted() { [ -z "${DSPARK_CHECK_STEPS:-}" ] || [[ " $DSPARK_CHECK_STEPS " == *" $1 "* ]]; }
# record NAME STATUS DETAIL: one summary line (FAIL and TIMEOUT make the verdict FAIL).
record() {
  local line
  line="$(printf '%-22s %-7s at %4ss  %s' "$1" "$2" "$(elapsed)" "$3")"
  echo "$line" >> "$SUMMARY"
  echo "$line"
  case $2 in FAIL|TIMEOUT) FAILED+=("$1") ;; SKIP) SKIPPED+=("$1") ;; esac
}
# run_step NAME LIMIT NEED LOG CMD...: runs CMD for at most LIMIT seconds (fewer if the deadline is nearer),
# its output appended to LOG (under a header) as it comes; skipped (STEP_RC=-1) when fewer than NEED seconds
# are left. Sets STEP_RC and STEP_OUT (the step's own output).
run_step() {
  local name=$1 limit=$2 need=$3 log=$4
  shift 4
  STEP_OUT="$WORK/$name.out"
  : > "$STEP_OUT"
  local l
  l=$(left)
  if (( l < need )); then
    record "$name" SKIP "deadline: ${l}s left, the step needs ${need}s"
    STEP_RC=-1
    return
  fi
  (( limit > l )) && limit=$l
  printf '\n===== %s (at %ss, limit %ss): %s\n' "$name" "$(elapsed)" "$limit" "$*" >> "$log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$STEP_OUT" >> "$log"
  STEP_RC=${PIPESTATUS[0]}
}
status_of() {  # exit status -> PASS / TIMEOUT / FAIL
  case $1 in 0) echo PASS ;; 124|137) echo TIMEOUT ;; *) echo FAIL ;; esac
}
last_line() { grep -v '^\s*$' "$STEP_OUT" | tail -1 | cut -c1-160; }
# step NAME LIMIT NEED CMD...
step() {
  local name=$1
  wanted "$name" || return 0
  run_step "$1" "$2" "$3" "$RUNLOG" "${@:4}"
  (( STEP_RC == -1 )) || record "$name" "$(status_of "$STEP_RC")" "$(last_line)"
}

HAVE_TIMEOUT_PLUGIN=$("$PY" -c "import pytest_timeout" > /dev/null 2>&1 && echo 1 || echo 0)
# pytest_step NAME LIMIT NEED PER_TEST_S FILE [pytest args]: the CUDA tests of one file in their own
# process, junit into junit.tar.gz. A file whose CUDA tests all skip on a GPU machine fails: the summary
# must not read green when nothing ran.
pytest_step() {
  local name=$1 limit=$2 need=$3 per_test=$4 file=$5
  shift 5
  wanted "$name" || return 0
  local xml="$WORK/junit/$name.xml"
  local args=(-m pytest -q -rfEs -p no:cacheprovider -m cuda --junitxml="$xml" "$@")
  (( HAVE_TIMEOUT_PLUGIN )) && args+=(--timeout="$per_test" --timeout-method=thread)
  run_step "$name" "$limit" "$need" "$RUNLOG" "$PY" "${args[@]}" "$file"
  (( STEP_RC == -1 )) && return 0
  tar -czf "$OUT/junit.tar.gz" -C "$WORK" junit
  local counts status
  status=$(status_of "$STEP_RC")
  if [ -s "$xml" ]; then
    counts=$("$PY" bench/device_check_report.py junit "$xml")
    if [ "$MODE" = device ] && [ "$status" = PASS ] && [[ "$counts" == passed=0\ * ]]; then
      status=FAIL
      counts="$counts (no CUDA test ran)"
    fi
  else
    counts="no junit file: $(last_line)"
  fi
  record "$name" "$status" "$counts"
}
# bench_step NAME LIMIT NEED SCRIPT ARGS...: a benchmark writing its JSON, then bench.json merged again.
bench_step() {
  local name=$1
  wanted "$name" || return 0
  step "$name" "$2" "$3" "$PY" "${@:4}" --json "$WORK/bench/$name.json"
  shopt -s nullglob
  local parts=("$WORK"/bench/*.json)
  shopt -u nullglob
  (( ${#parts[@]} )) && "$PY" bench/device_check_report.py merge "$OUT/bench.json" "${parts[@]}"
}
HAVE_SANITIZER=$(command -v compute-sanitizer > /dev/null && echo 1 || echo 0)
# sanitizer_step NAME LIMIT NEED FILE: memcheck over one op test file (CUDA tests, graph capture left out:
# it needs the caching allocator, which is off so that out-of-bounds accesses hit unallocated memory).
sanitizer_step() {
  local name=$1 limit=$2 need=$3 file=$4
  wanted "$name" || return 0
  if [ "$MODE" = dry ] || (( ! HAVE_SANITIZER )); then
    record "$name" SKIP "$([ "$MODE" = dry ] && echo "dry run: no GPU" || echo "compute-sanitizer not found")"
    return 0
  fi
  local args=(-m pytest -q -rfEs -p no:cacheprovider -m cuda -k "not graph" -x)
  (( HAVE_TIMEOUT_PLUGIN )) && args+=(--timeout=180 --timeout-method=thread)
  run_step "$name" "$limit" "$need" "$SANLOG" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 50 --target-processes all "$PY" "${args[@]}" "$file"
  (( STEP_RC == -1 )) && return 0
  local errors
  errors=$(grep -h "ERROR SUMMARY" "$STEP_OUT" | tail -1)
  record "$name" "$(status_of "$STEP_RC")" "${errors:-$(last_line)}"
}

# ---- environment ----------------------------------------------------------------------------------------
{
  echo "dspark_ops device check, mode $MODE, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), budget ${BUDGET}s"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed files"
  echo "host: $(uname -srm), $(nproc) cores"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem \
      --format=csv
  else
    echo "nvidia-smi: not available"
  fi
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| GPU:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible')"
  nvcc --version 2>&1 | tail -1 || true
  cmake --version 2>&1 | head -1 || true
  command -v compute-sanitizer > /dev/null && compute-sanitizer --version 2>&1 | tail -1
  "$PY" -c "import flashinfer; print('flashinfer', flashinfer.__version__)" 2>/dev/null || echo "flashinfer: not importable"
  echo "pytest-timeout: $([ "$HAVE_TIMEOUT_PLUGIN" = 1 ] && echo yes || echo no), compute-sanitizer: $([ "$HAVE_SANITIZER" = 1 ] && echo yes || echo no)"
} 2>&1 | tee -a "$RUNLOG" | sed 's/^/# /' >> "$SUMMARY"

GPU_CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
GPU_CC=${GPU_CC:-0}
if [ "$MODE" = device ] && (( GPU_CC == 0 )); then
  record gpu FAIL "torch sees no CUDA GPU: every CUDA test would skip"
fi

# ---- build ------------------------------------------------------------------------------------------------
export DSPARK_CUDA=on
export DSPARK_CUDA_ARCHS="${DSPARK_CUDA_ARCHS:-$( (( GPU_CC > 0 )) && echo "$GPU_CC" || echo 90)}"
if [ -z "${DSPARK_CUTLASS_INCLUDE:-}" ] && [ -d "$STAGED/cute" ]; then export DSPARK_CUTLASS_INCLUDE="$STAGED"; fi
if wanted build && [ "$MODE" = device ] && [ ! -f "${DSPARK_CUTLASS_INCLUDE:-$STAGED}/cute/arch/mma_sm80.hpp" ]; then
  record cutlass FAIL "no CUTLASS/CuTe headers at ${DSPARK_CUTLASS_INCLUDE:-$STAGED}: run --prepare here and carry third_party/cutlass"
fi
if [ "$MODE" = device ]; then
  if wanted build; then
    run_step build 330 60 "$BUILDLOG" env CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e .
    if (( STEP_RC != -1 )); then
      record build "$(status_of "$STEP_RC")" "archs $DSPARK_CUDA_ARCHS, $(grep -m1 -o 'CUTLASS/CuTe headers [a-z ]*' "$STEP_OUT" || echo '?')"
      grep -E "warning|error" "$STEP_OUT" | grep -v "^\s*$" | head -40 >> "$RUNLOG"
    fi
  fi
else
  step build 60 5 "$PY" -c "import dspark_ops; print('dry run, the installed build:', dspark_ops.build_info())"
fi
# What was built: whether it imports, the tensor-core attention (required on sm_80+), the library file.
read -r BUILT tc lib < <("$PY" -c "import dspark_ops, dspark_ops._C as m; print(1, dspark_ops.build_info()['attention_tc'], m.__file__)" 2>/dev/null || echo "0 - -")
if (( ! BUILT )); then
  record import FAIL "dspark_ops does not import: the steps below cannot run"
elif wanted build; then
  if [ "$MODE" = device ] && (( GPU_CC >= 80 )) && [ "$tc" != True ]; then
    record tensor_core FAIL "sm_$GPU_CC but the tensor-core attention was NOT built (attention_tc=$tc): its tests skip"
  else
    record tensor_core "$([ "$MODE" = dry ] && echo INFO || echo PASS)" "attention_tc=$tc, GPU: $( (( GPU_CC )) && echo "sm_$GPU_CC" || echo none)"
  fi
  # The shared CUDA runtime, torch's own, not a static copy beside it.
  cudart=$(readelf -d "$lib" 2>/dev/null | grep -o 'libcudart[^]]*' | head -1)
  if [ "$MODE" = device ] && [ -z "$cudart" ]; then
    record cudart FAIL "$lib does not list libcudart.so as NEEDED (static CUDA runtime)"
  else
    record cudart "$([ "$MODE" = dry ] && echo INFO || echo PASS)" "NEEDED: ${cudart:-no libcudart} ($lib)"
  fi
fi

# ---- tests: one process per file, the op tests first --------------------------------------------------
if (( BUILT )); then
  pytest_step test_verify 90 15 60 tests/ops/test_verify.py
  pytest_step test_markov 60 10 60 tests/ops/test_markov_sample.py
  pytest_step test_kv_cache 60 10 60 tests/ops/test_kv_cache.py
  pytest_step test_scheduler 45 10 60 tests/ops/test_scheduler.py
  pytest_step test_attention 120 15 60 tests/ops/test_attention.py
  pytest_step test_linear 45 10 60 tests/ops/test_linear.py
  pytest_step test_norm_rotary 30 10 60 tests/ops/test_norm.py tests/ops/test_rotary.py
  pytest_step test_models 60 10 60 tests/test_models.py
  pytest_step test_engine 180 30 120 tests/test_engine.py
  pytest_step test_train 90 20 90 tests/test_train.py

# ---- benchmarks ---------------------------------------------------------------------------------------------
  bench_step bench_verify 90 30 -m dspark_ops.bench.verify --gpu --quick
  bench_step bench_attention 90 30 -m dspark_ops.bench.attention --gpu --quick
  bench_step bench_drafter 60 20 -m dspark_ops.bench.drafter --device cuda --quick
  bench_step bench_e2e 150 60 -m dspark_ops.bench.e2e --device cuda --quick --random-weights

# ---- compute-sanitizer over the op tests, with the time that is left ---------------------------------------
  sanitizer_step memcheck_verify 150 40 tests/ops/test_verify.py
  sanitizer_step memcheck_attention 150 40 tests/ops/test_attention.py
  sanitizer_step memcheck_markov 90 30 tests/ops/test_markov_sample.py
  sanitizer_step memcheck_kv_cache 90 30 tests/ops/test_kv_cache.py
  sanitizer_step memcheck_scheduler 60 20 tests/ops/test_scheduler.py
  sanitizer_step memcheck_norm 45 15 tests/ops/test_norm.py
  sanitizer_step memcheck_rotary 45 15 tests/ops/test_rotary.py
fi

# ---- verdict ------------------------------------------------------------------------------------------------
if (( ${#FAILED[@]} )); then
  record verdict FAIL "${#FAILED[@]} failed: ${FAILED[*]}$( (( ${#SKIPPED[@]} )) && echo "; skipped: ${SKIPPED[*]}")"
  exit 1
fi
record verdict PASS "total $(elapsed)s$( (( ${#SKIPPED[@]} )) && echo "; skipped: ${SKIPPED[*]}")"
exit 0

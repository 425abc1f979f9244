#!/usr/bin/env bash
# Create .venv and install the project on the CPU. Idempotent and quiet.
# torch is pinned to the 2.13.0 CPU build first: a looser pin pulls a multi-GB CUDA build.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh dev,loadtest
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${1:-}

pip_quiet() {  # pip, with its output shown only when it fails
  local log
  log=$(mktemp)
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2
    rm -f "$log"
    echo "pip install $* failed" >&2
    exit 1
  fi
  rm -f "$log"
}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -c "import torch" 2>/dev/null || pip_quiet torch==2.13.0
spec="."
[ -n "$EXTRAS" ] && spec=".[${EXTRAS}]"
pip_quiet -e "$spec"
.venv/bin/python -c "import torch, model, engines, service, training" >/dev/null

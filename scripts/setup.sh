#!/usr/bin/env bash
# Create .venv and install the project on the CPU. Idempotent and quiet.
# torch is pinned to the 2.13.0 CPU build first: a looser pin pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${1:-}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>/dev/null || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
fi
spec="."
[ -n "$EXTRAS" ] && spec=".[${EXTRAS}]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec" 2>&1 | grep -v -E "^WARNING: Location|^\s*$" || true
.venv/bin/python -c "import torch, model, engines, service" >/dev/null

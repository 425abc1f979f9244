#!/usr/bin/env bash
# Create .venv and install the project. Idempotent and quiet.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh dev,loadtest
#
# torch goes in first, chosen by the environment (the same names as the Dockerfile's build args):
#   TORCH_VERSION    default 2.13.0: `pip install torch==$TORCH_VERSION` from pip's configured index.
#                    That is the CPU build only where the index serves one under that pin; PyPI's
#                    Linux x86_64 wheel of the same pin is the CUDA build (several GB).
#   TORCH_INDEX_URL  install torch from this index instead (e.g. PyTorch's own CPU wheel index,
#                    the URL ending in /whl/cpu): the CPU build wherever you are.
#   TORCH_WHEEL      a wheel file (path or URL) to install as torch; overrides the two above.
# An already installed torch is kept (delete .venv to change it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${1:-}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

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
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_WHEEL:-}" ]; then
    pip_quiet "$TORCH_WHEEL"
  elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    pip_quiet --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
  else
    pip_quiet "torch==$TORCH_VERSION"
  fi
fi
spec="."
[ -n "$EXTRAS" ] && spec=".[${EXTRAS}]"
pip_quiet -e "$spec"
.venv/bin/python -c "import torch, model, engines, service, training" >/dev/null

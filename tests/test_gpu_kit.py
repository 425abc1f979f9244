"""The GPU verification kit on the CPU: its plan fits one device call, its dry run runs every step at tiny
sizes, and a step that its cap kills still leaves its line (and what it measured) in the output folder.

The kit runs on GPU machines that are lent rarely, for one call of at most 600 s that brings back at
most 8 files; running its dry run here keeps it from rotting between those runs (an import that moved,
a step that no longer fits the engine API) and keeps its output inside what comes back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engines.torch_backend import PARITY_REL_TOL

REPO = Path(__file__).resolve().parent.parent
KIT = REPO / "scripts" / "gpu_check.sh"
DEVICE_CALL_S = 600
MAX_FILES = 8  # what a lent device brings back from $OUT


def plan() -> tuple[list[str], int]:
    lines = subprocess.run([str(KIT), "--plan"], capture_output=True, text=True, check=True).stdout.splitlines()
    steps = [ln.split()[0] for ln in lines if not ln.startswith("total")]
    total = int(lines[-1].split()[1])
    assert total == sum(int(c) + int(k) for _, c, k in (ln.split() for ln in lines[:-1]))
    return steps, total


def test_the_caps_fit_one_device_call_with_margin():
    steps, total = plan()
    assert total <= 520 < DEVICE_CALL_S, total  # caps + kill-after slack, with time left for the start
    assert steps[0] == "preflight" and steps[-1] == "summary"
    assert {"env", "pytest_gpu", "xl", "vae", "service", "batching", "tensorrt", "xl_compiled"} <= set(steps)


@pytest.mark.slow
def test_dry_run_leaves_one_json_line_per_step_even_for_killed_steps(tmp_path):
    # vae hangs before it starts (nothing saved) and tensorrt after its work (result saved): both are killed
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "LDIT_KIT_STALL": "vae:before,tensorrt:after", "LDIT_KIT_CAP_VAE": "2"}
    proc = subprocess.run([str(KIT), "--dry-run", "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1500)
    log = (tmp_path / "gpu_check.log").read_text() if (tmp_path / "gpu_check.log").exists() else ""
    assert proc.returncode == 1, proc.stdout + proc.stderr + log[-4000:]  # the killed steps fail the kit
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) <= MAX_FILES and {"steps.jsonl", "summary.json", "gpu_check.log"} <= set(files), files

    lines = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    steps, _ = plan()
    assert [e["step"] for e in lines] == steps[:-1], "one line per step, in order (summary is its own file)"
    by_step = {e["step"]: e for e in lines}
    killed = {name for name, e in by_step.items() if e["timed_out"]}
    assert killed == {"vae", "tensorrt"}, {n: e["exit"] for n, e in by_step.items()}
    assert by_step["vae"]["exit"] == 124 and by_step["vae"]["result"] is None
    assert "skipped" in by_step["tensorrt"]["result"] or by_step["tensorrt"]["result"].get("exit_code") == 0
    assert all(e["exit"] == 0 for n, e in by_step.items() if n not in killed), log[-4000:]

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] is True and sorted(summary["timed_out"]) == ["tensorrt", "vae"]
    assert summary["exit_codes"] == {n: e["exit"] for n, e in by_step.items()}
    results = summary["steps"]
    assert results["preflight"]["ok"] and not results["preflight"]["missing"]
    assert "passed" in results["pytest_gpu"]["outcome"] or "skipped" in results["pytest_gpu"]["outcome"]
    ran = [c for c in results["xl"]["configs"] if "skipped" not in c]
    assert {c["config"] for c in ran} >= {"fp32", "bf16"}
    low = next(c for c in ran if c["config"] == "bf16")
    assert 0 < low["rows2"]["rel_err_vs_fp32"] < 0.1 and low["rows2"]["finite"]
    assert low["rows2"]["mfu"] is None and low["rows2"]["of_measured_matmul_peak"] > 0  # no datasheet for a CPU
    assert low["recipe"]["images"] == 4
    assert set(results["xl"]["recipes"]) >= {"bf16 fp32 residual", "bf16 low residual"}
    assert results["xl"]["gflop_per_row"] == results["xl"]["gflop_per_row_analytic"]
    service = results["service"]["configs"][0]
    assert service["pass"] and service["statuses"] == {"200": 8}
    batching = results["batching"]["setups"]["demo/preset"]
    assert batching["capacity"]["wall"]["step"] > 0 and batching["runs"]
    # the compiled step really compiles in the dry run (inductor's C++ backend, tiny model)
    fused = next(c for c in results["xl_compiled"]["configs"] if c["config"] == "bf16 compiled")
    assert fused["compile_s"] > 0 and fused["rows2"]["finite"]
    assert 0 < fused["rows2"]["rel_err_vs_fp32"] < PARITY_REL_TOL["bf16"]
    assert fused["recipe"]["images"] == 4

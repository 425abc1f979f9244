"""The GPU verification kit's dry run: every step of scripts/gpu_check.sh at tiny sizes on the CPU.

The kit runs on GPU machines that are lent rarely; running its dry run here keeps it from
rotting between those runs (an import that moved, a step that no longer fits the engine API).
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


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_step(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = (tmp_path / "gpu_check.log").read_text() if (tmp_path / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + log[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] is True
    steps = summary["steps"]
    assert set(summary["exit_codes"]) == {"env", "pytest_gpu", "xl", "vae", "service", "batching", "tensorrt",
                                          "xl_compiled"}
    assert all(code == "0" for code in summary["exit_codes"].values()), summary["exit_codes"]
    ran = [c for c in steps["xl"]["configs"] if "skipped" not in c]
    assert {c["config"] for c in ran} >= {"fp32", "bf16"}
    low = next(c for c in ran if c["config"] == "bf16")
    assert 0 < low["rows2"]["rel_err_vs_fp32"] < 0.1 and low["rows2"]["finite"]
    assert low["recipe"]["images"] == 4
    assert steps["vae"]["precisions"]["bf16"]["psnr_vs_fp32_db"] > 30
    service = steps["service"]["configs"][0]
    assert service["pass"] and service["statuses"] == {"200": 8}
    assert "skipped" in steps["tensorrt"] or steps["tensorrt"].get("exit_code") == 0
    # the compiled step really compiles in the dry run (inductor's C++ backend, tiny model)
    fused = next(c for c in steps["xl_compiled"]["configs"] if c["config"] == "bf16 compiled")
    assert fused["compile_s"] > 0 and fused["rows2"]["finite"]
    assert 0 < fused["rows2"]["rel_err_vs_fp32"] < PARITY_REL_TOL["bf16"]
    assert fused["recipe"]["images"] == 4

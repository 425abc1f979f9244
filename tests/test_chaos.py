"""Chaos in CI: the short form of loadtest/chaos.py (SIGKILLed workers mid-batch, one Redis restart, under load).

Every accepted request must end exactly once with a correct image (PSNR >= 40 dB against the offline
reference, identical requests pixel-identical) or a clear JSON error; nothing lost, the stream drained.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.service_harness import REPO, have_redis_server

pytestmark = pytest.mark.skipif(not have_redis_server(), reason="Debian's redis-server is not installed")


def test_chaos_quick_loses_no_accepted_request(tmp_path):
    report_path = tmp_path / "chaos.json"
    proc = subprocess.run([sys.executable, "loadtest/chaos.py", "--quick", "--json", str(report_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    print("\n".join(line for line in out.splitlines() if line.startswith(("CHAOS", "[chaos"))))
    assert report_path.is_file(), out[-4000:]
    report = json.loads(report_path.read_text())
    s = report["summary"]
    assert s["accepted"] >= 40, s  # enough load to mean something
    assert s["worker_kills"] >= 3 and s["mid_batch_kills"] >= 2, report["events"]
    assert s["redis_restarts"] == 1
    assert s["lost"] == 0, report["bad"]
    assert s["mismatched"] == 0 and s["identical_requests_with_different_pixels"] == 0, report["bad"]
    assert s["duplicates"] == 0
    assert s["succeeded"] + s["clear_errors"] == s["accepted"]
    assert all(code for code in s["error_codes"]), s["error_codes"]  # every error names its cause
    assert s["succeeded"] >= 0.8 * s["accepted"], s
    assert s["stream"]["drained"], s["stream"]
    assert s["unexpected_worker_exits"] == 0, report["unexpected_exits"]
    assert proc.returncode == 0, out[-4000:]

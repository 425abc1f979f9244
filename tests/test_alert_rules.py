"""The alert rules (helm/lightningdit/rules/lightningdit.rules.yaml) with Prometheus's own `promtool`.

* `promtool check rules`: the file loads (YAML, PromQL, templates).
* `promtool test rules tests/alert_rules_test.yaml`: every alert fires on series that should fire
  it and stays quiet on series that should not (other namespaces or instances of the same test).
* Every alert has a unit test that fires it, a summary, a description and a runbook section in
  docs/deploy.md.

promtool comes with Debian's `prometheus` package (scripts/test.sh installs it as root).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "helm" / "lightningdit" / "rules" / "lightningdit.rules.yaml"
UNIT_TESTS = ROOT / "tests" / "alert_rules_test.yaml"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not installed (Debian package prometheus; scripts/test.sh "
                                           "installs it when run as root)")


def alerts() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


@needs_promtool
def test_promtool_check_rules() -> None:
    out = promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in out.stdout


@needs_promtool
def test_compose_prometheus_config_loads_the_rules(tmp_path: Path) -> None:
    """monitoring/prometheus.yml as the compose `monitoring` profile mounts it: /etc/prometheus/prometheus.yml
    beside /etc/prometheus/rules (the chart's rules directory)."""
    (tmp_path / "prometheus.yml").write_text((ROOT / "monitoring" / "prometheus.yml").read_text())
    (tmp_path / "rules").symlink_to(RULES.parent)
    out = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in out.stdout, out.stdout


@needs_promtool
def test_promtool_unit_tests_fire_and_stay_quiet() -> None:
    out = promtool("test", "rules", str(UNIT_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_is_unit_tested_and_documented() -> None:
    tests = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case.get("exp_alerts")}
    anchors = {re.sub(r"[^a-z0-9 -]", "", m.lower()).replace(" ", "-")
               for m in re.findall(r"^#+ (.+)$", DEPLOY_DOC.read_text(), re.M)}
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names)) >= 7
    for rule in alerts():
        name = rule["alert"]
        assert name in fired, f"{name}: no promtool test fires it"
        notes = rule["annotations"]
        assert notes["summary"] and "Check first" in notes["description"], name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        path, _, anchor = notes["runbook"].partition("#")
        assert path == "docs/deploy.md" and anchor == name.lower() and anchor in anchors, \
            f"{name}: no runbook section '### {name}' in docs/deploy.md"

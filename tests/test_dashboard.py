"""The Grafana dashboard's JSON and the alert rules, against the metrics the service exports.

No Prometheus needed (tests/test_prometheus.py runs the queries on a real one): the dashboard is
Grafana's classic JSON model with a data-source variable and `namespace`/`job` variables that every
query honours; it shows what an operator looks at first; and every metric it or an alert reads is
one that service/metrics.py exports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.metrics import MetricWrapperBase

from service import metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = json.loads((ROOT / "helm" / "lightningdit" / "dashboards" / "lightningdit.json").read_text())
RULES = yaml.safe_load((ROOT / "helm" / "lightningdit" / "rules" / "lightningdit.rules.yaml").read_text())
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def panels() -> list[dict]:
    out = []
    for p in DASHBOARD["panels"]:
        out += [p, *p.get("panels", [])]
    return out


def exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p.get("targets", [])]


def rule_exprs() -> list[str]:
    return [r["expr"] for g in RULES["groups"] for r in g["rules"]]


def exported_series_names() -> set[str]:
    """Every sample name the service's metrics can export (counters' _total, histograms' _bucket...)."""
    names = set()
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            for family in metric.collect():
                suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"],
                            "gauge": [""]}[family.type]
                names |= {family.name + s for s in suffixes}
    return names


def test_classic_model_with_variables() -> None:
    assert DASHBOARD["schemaVersion"] >= 39 and DASHBOARD["uid"] and DASHBOARD["title"]
    assert DASHBOARD["id"] is None, "an exported dashboard carries no database id"
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "job"):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"] == DATASOURCE
        assert v["includeAll"] and v["multi"] and v["allValue"] == ".*"
        assert v["query"]["query"].startswith("label_values(") and v["query"]["query"].endswith(f", {name})")


def test_every_query_uses_the_datasource_and_the_filters() -> None:
    queries = 0
    for p in panels():
        if p["type"] == "row":
            continue
        assert p["datasource"] == DATASOURCE, p["title"]
        assert p["targets"] and p.get("description"), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE, p["title"]
            queries += 1
            # every series selector names the metric and carries both filters
            for name, rest in re.findall(r"\b(ldit_[a-z0-9_]+)(\{[^}]*\})?", t["expr"]):
                assert 'namespace=~"$namespace"' in rest and 'job=~"$job"' in rest, (p["title"], name, t["expr"])
    assert queries >= 40


def test_layout() -> None:
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in panels():
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel at {(x, y)}"
                cells.add((x, y))


def test_shows_what_an_operator_looks_at_first() -> None:
    used = {n for e in exprs() for n in re.findall(r"\b(ldit_[a-z0-9_]+)", e)}
    wanted = {
        "images/s": "ldit_inference_count_total", "by status": "ldit_http_requests_total",
        "outcomes": "ldit_inference_request_failure_total", "queue depth": "ldit_inference_pending_request_count",
        "oldest job": "ldit_queue_oldest_job_age_seconds",
        "e2e latency": "ldit_inference_request_duration_seconds_bucket",
        "queue wait": "ldit_inference_queue_duration_seconds_bucket",
        "compute": "ldit_inference_compute_duration_seconds_bucket", "rows per forward": "ldit_rows_per_forward_sum",
        "padding": "ldit_padding_rows_total", "busy fraction": "ldit_worker_busy_ratio",
        "heartbeats": "ldit_worker_heartbeats_total", "live workers": "ldit_live_workers",
        "over capacity": "ldit_http_connections_refused_total", "set bytes": "ldit_batch_bytes",
        "set states": "ldit_batch_sets", "set write errors": "ldit_batch_write_errors_total",
        "redis errors": "ldit_redis_errors_total", "reconnects": "ldit_redis_connections_opened_total",
        "hot swaps": "ldit_model_swaps_total",
    }
    missing = {what: name for what, name in wanted.items() if name not in used}
    assert not missing, missing
    quantiles = {(m, q) for e in exprs() for q, m in re.findall(r"histogram_quantile\((0\.\d+), .*?\b(ldit_\w+)_bucket", e)}
    for m in ("ldit_inference_request_duration_seconds", "ldit_inference_queue_duration_seconds",
              "ldit_inference_compute_duration_seconds"):
        assert {(m, q) for q in ("0.5", "0.95", "0.99")} <= quantiles, m


def test_dashboard_and_rules_read_only_exported_metrics() -> None:
    exported = exported_series_names()
    for source, texts in (("dashboard", exprs()), ("rules", rule_exprs())):
        for expr in texts:
            for name in re.findall(r"\b(ldit_[a-z0-9_]+)", expr):
                assert name in exported, f"{source} reads {name}, which service/metrics.py does not export"


def test_oldest_job_age() -> None:
    from service.http.routes.system import oldest_age_s

    assert oldest_age_s([], 100.0) == 0.0
    assert oldest_age_s([(b"5000-0", {b"enqueued_at": b"90.5"})], 100.0) == 9.5
    assert oldest_age_s([(b"95000-3", {b"id": b"x"})], 100.0) == 5.0  # no enqueued_at: the entry id's time
    assert oldest_age_s([(b"1-0", {b"enqueued_at": b"200"})], 100.0) == 0.0  # clocks apart: never negative

"""The Grafana dashboard and the alert rules against a real Prometheus scraping a loaded service.

Debian's `prometheus` (the server, scripts/test.sh installs it as root) scrapes a real API process and
a real worker process (a tiny random model on CPU) that share a real redis-server, every second, as
two jobs with a `namespace` label like a ServiceMonitor's. The test puts load on the service
(/generate, /jobs, a sample set, a refused request, and one /generate that runs into the request
timeout while the worker is stopped with SIGSTOP), waits until Prometheus has scraped the load's
end, then through Prometheus's HTTP API:

* every query of every dashboard panel (Grafana's variables replaced by their "All" values) parses
  and returns data: at least one series with a finite value;
* the dashboard's variables find their values (label_values as Prometheus's series API answers it);
* every alert rule's expression parses, every metric it reads exists, and Prometheus loaded the
  rules file itself and evaluates every rule without error (health "ok"); none fires on a healthy,
  loaded service, and the latency alert is pending on the timeout (1 request of 14 is above the p99).

Before the load, one request and two scrapes: the per-route series exist, as on a running service
(a counter's first sample is rate()'s baseline). No timed assertion: every wait polls a condition.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from tests.service_harness import free_port, have_redis_server, make_tiny_bundle, start_redis, start_service

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "helm" / "lightningdit" / "dashboards" / "lightningdit.json"
RULES = ROOT / "helm" / "lightningdit" / "rules" / "lightningdit.rules.yaml"
NAMESPACE = "ldit-test"
RATE_WINDOW = "5m"  # $__rate_interval: the whole run fits in it
GENERATE = 12  # /generate requests, distinct seeds
JOBS = 3  # /jobs requests
SET_IMAGES = 4  # one sample set: 2 classes x 2
TIMEOUT_S = 8  # LDIT_REQUEST_TIMEOUT_S: one /generate runs into it

pytestmark = [
    pytest.mark.skipif(shutil.which("prometheus") is None,
                       reason="prometheus not installed (Debian package prometheus; scripts/test.sh installs it as "
                              "root)"),
    pytest.mark.skipif(not have_redis_server(), reason="redis-server not installed (Debian package redis-server)"),
]


def panel_targets(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel, rows' nested panels included."""
    out = []
    for panel in dashboard["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            out += [(p["title"], t["expr"]) for t in p.get("targets", [])]
    return out


def grafana_to_promql(expr: str) -> str:
    """The query as Grafana sends it with every variable at "All" (allValue .*)."""
    return (expr.replace("$__rate_interval", RATE_WINDOW).replace("$namespace", ".*").replace("$job", ".*"))


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(ldit_[a-z0-9_]+)", expr))


class Prom:
    def __init__(self, url: str):
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=30)

    def query(self, expr: str, at: float | None = None) -> dict:
        params = {"query": expr, **({"time": f"{at:.3f}"} if at else {})}
        return self.http.get("/api/v1/query", params=params).json()

    def value(self, expr: str) -> float | None:
        res = self.query(expr)
        assert res["status"] == "success", (expr, res)
        return float(res["data"]["result"][0]["value"][1]) if res["data"]["result"] else None

    def wait_for(self, expr: str, what: str, timeout: float = 120) -> float:
        """Poll until `expr` (a PromQL condition) returns a sample; returns its value."""
        end = time.time() + timeout
        while time.time() < end:
            v = self.value(expr)
            if v is not None:
                return v
            time.sleep(0.5)
        raise AssertionError(f"Prometheus never saw {what}: {expr}")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    root = tmp_path_factory.mktemp("prometheus")
    bundle = make_tiny_bundle(root / "bundle")
    server = start_redis("debian")
    metrics_port = free_port()
    env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(bundle), "LDIT_BATCH_DIR": str(root / "batches"),
           "LDIT_MAX_QUEUE_DELAY_MS": "0", "LDIT_HEARTBEAT_INTERVAL_S": "0.5",
           "LDIT_REQUEST_TIMEOUT_S": str(TIMEOUT_S), "LDIT_HEARTBEAT_TTL_S": "60"}  # stays live while stopped
    (root / "batches").mkdir()
    procs = []
    prom_proc = None
    try:
        procs.append(start_service("worker", {**env, "LDIT_METRICS_PORT": str(metrics_port)}))
        api = start_service("api", env)
        procs.append(api)
        prom_port = free_port()
        api_target = api.url.removeprefix("http://")
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": "lightningdit-api",
                 "static_configs": [{"targets": [api_target], "labels": {"namespace": NAMESPACE}}]},
                {"job_name": "lightningdit-worker",
                 "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"], "labels": {"namespace": NAMESPACE}}]},
            ],
        }
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = (root / "prometheus.log").open("w")
        prom_proc = subprocess.Popen(
            ["prometheus", f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=log, stderr=subprocess.STDOUT)
        prom = Prom(f"http://127.0.0.1:{prom_port}")
        end = time.time() + 60
        while True:
            try:
                if prom.http.get("/-/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert prom_proc.poll() is None and time.time() < end, (root / "prometheus.log").read_text()[-3000:]
            time.sleep(0.2)
        prom.wait_for('up{job="lightningdit-worker"} == 1 and on () up{job="lightningdit-api"} == 1',
                      "both targets up")

        # -- load --------------------------------------------------------------------------------
        client = httpx.Client(base_url=api.url, timeout=60)

        def generate(seed: int) -> int:
            return client.post("/generate", json={"class_label": seed % 10, "seed": seed}).status_code

        def two_more_scrapes() -> None:
            for job in ("lightningdit-api", "lightningdit-worker"):
                scrapes = prom.value(f'count_over_time(up{{job="{job}"}}[1h])')
                prom.wait_for(f'count_over_time(up{{job="{job}"}}[1h]) >= {scrapes + 2}', f"two more scrapes of {job}")

        # A service in steady state: its per-route series exist before the load (a counter's first
        # sample is its baseline, so rate() sees only what comes after it).
        assert generate(GENERATE + 100) == 200
        two_more_scrapes()
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(generate, range(GENERATE)))
        assert codes == [200] * GENERATE
        assert generate(0) == 200  # the same request again: from the result cache
        assert client.post("/generate", json={"class_label": "no-such-class", "seed": 1}).status_code == 422
        job_ids = [client.post("/jobs", json={"class_label": 3, "seed": 1000 + i}).json()["id"] for i in range(JOBS)]
        batch = client.post("/batches", json={"classes": [1, 2], "per_class": SET_IMAGES // 2}).json()
        deadline = time.time() + 120
        while True:
            states = [client.get(f"/jobs/{j}").json()["status"] for j in job_ids]
            set_state = client.get(f"/batches/{batch['id']}").json()["status"]
            if all(s == "done" for s in states) and set_state == "done":
                break
            assert time.time() < deadline, (states, set_state)
            time.sleep(0.2)
        images = 1 + GENERATE + JOBS + SET_IMAGES
        prom.wait_for(f'sum(ldit_inference_count_total{{job="lightningdit-worker"}}) >= {images}', "every image")
        # A worker that stops answering with its heartbeat still fresh: a /generate runs into the request
        # timeout (504), its job expires once the worker runs again.
        worker = procs[0].proc
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            late = client.post("/generate", json={"class_label": 5, "seed": 99_999}, timeout=TIMEOUT_S + 30)
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        assert late.status_code == 504 and late.json()["error"] == "timeout"
        prom.wait_for('sum(ldit_expired_jobs_total{job="lightningdit-worker"}) >= 1', "the late job expired")
        two_more_scrapes()  # after the load: a series it created has two samples, its rate() a number
        prom.wait_for('ldit_batch_sets{job="lightningdit-api", state="done"} >= 1', "the sample set done")
        yield {"prom": prom, "images": images, "api": api, "worker": procs[0], "bundle": bundle,
               "metrics_port": metrics_port}
    finally:
        if prom_proc is not None:
            prom_proc.terminate()
            prom_proc.wait(30)
        for p in procs:
            p.stop()
        server.stop()


def test_every_dashboard_query_returns_data(loaded) -> None:
    prom: Prom = loaded["prom"]
    dashboard = json.loads(DASHBOARD.read_text())
    targets = panel_targets(dashboard)
    assert len(targets) >= 40
    empty = []
    for title, expr in targets:
        res = prom.query(grafana_to_promql(expr))
        assert res["status"] == "success", f"{title}: {expr}: {res}"
        values = [float(s["value"][1]) for s in res["data"]["result"]]
        if not any(math.isfinite(v) for v in values):
            empty.append(f"{title}: {expr} -> {values}")
    assert not empty, "panel queries without data:\n" + "\n".join(empty)


def test_dashboard_variables_find_their_values(loaded) -> None:
    prom: Prom = loaded["prom"]
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    found = {}
    for name in ("namespace", "job"):
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", variables[name]["query"]["query"])
        assert m, variables[name]["query"]
        selector, label = grafana_to_promql(m.group(1)), m.group(2)
        res = prom.http.get(f"/api/v1/label/{label}/values", params={"match[]": selector}).json()
        assert res["status"] == "success", res
        found[name] = set(res["data"])
    assert found == {"namespace": {NAMESPACE}, "job": {"lightningdit-api", "lightningdit-worker"}}


def test_the_numbers_are_the_load(loaded) -> None:
    """A few panels' values checked against what the test did and what the service is."""
    prom: Prom = loaded["prom"]
    assert prom.value('sum(ldit_inference_count_total{job="lightningdit-worker"})') == loaded["images"]
    assert prom.value('max(ldit_live_workers{job="lightningdit-api"})') == 1
    assert prom.value("min(ldit_redis_up)") == 1
    assert prom.value('max(ldit_request_timeout_seconds)') == TIMEOUT_S
    # /generate's latency: the warm-up, the load and the timeout (not the cache hit, not the 422)
    assert prom.value("sum(ldit_inference_request_duration_seconds_count)") == 1 + GENERATE + 1
    assert prom.value('sum(ldit_inference_request_duration_seconds_bucket{le="5.0"})') == 1 + GENERATE
    assert prom.value('sum(ldit_inference_request_failure_total{reason="timeout"})') == 1
    assert prom.value("sum(ldit_expired_jobs_total)") == 1
    assert prom.value('sum(ldit_worker_heartbeats_total{job="lightningdit-worker"})') > 0
    assert prom.value('sum(ldit_worker_heartbeats_total{job="lightningdit-api"})') == 0  # the API does not beat
    assert prom.value('sum(ldit_padding_rows_total)') == 0  # eager torch on CPU pads nothing
    assert prom.value('sum(ldit_result_cache_hits_total)') == 1
    assert prom.value('sum(ldit_inference_request_failure_total{reason=~"full|busy|no_worker"})') == 0
    assert prom.value('sum(ldit_http_requests_total{endpoint="/generate", status_class="4xx"})') == 1
    assert prom.value('sum(ldit_redis_connections_opened_total{job="lightningdit-api"})') >= 1
    # no refused connection, no Redis error, no swap: the zero series exist and stay zero
    for expr in ("sum(ldit_http_connections_refused_total)", "sum(ldit_redis_errors_total)",
                 "sum(ldit_model_swaps_total)", "sum(ldit_batch_write_errors_total)"):
        assert prom.value(expr) == 0, expr
    # only the API exports the gauges it reads from Redis at a scrape
    assert prom.value('count(ldit_queue_oldest_job_age_seconds{job="lightningdit-worker"})') is None
    assert prom.value('count(ldit_live_workers{job="lightningdit-worker"})') is None


def test_every_rule_parses_reads_real_series_and_evaluates(loaded) -> None:
    prom: Prom = loaded["prom"]
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    for rule in rules:
        res = prom.query(rule["expr"])
        assert res["status"] == "success", f"{rule['alert']}: {res}"
        for name in metric_names(rule["expr"]):
            assert prom.value(f"count({name})"), f"{rule['alert']} reads {name}, which Prometheus never scraped"
    # Prometheus loaded the rules file itself and has evaluated every rule without error
    end = time.time() + 60
    while True:
        groups = prom.http.get("/api/v1/rules").json()["data"]["groups"]
        loaded_rules = [r for g in groups for r in g["rules"]]
        if loaded_rules and all(not r.get("lastEvaluation", "0001").startswith("0001") and r["health"] != "unknown"
                                for r in loaded_rules):
            break
        assert time.time() < end, loaded_rules
        time.sleep(0.5)
    assert sorted(r["name"] for r in loaded_rules) == sorted(r["alert"] for r in rules)
    bad = [(r["name"], r["health"], r.get("lastError")) for r in loaded_rules if r["health"] != "ok"]
    assert not bad, bad
    firing = [a for a in prom.http.get("/api/v1/alerts").json()["data"]["alerts"] if a["state"] == "firing"]
    assert not firing, firing


def test_the_timeout_makes_the_latency_alert_pending(loaded) -> None:
    """One /generate of 14 ran into the timeout: the p99 is above it, so Prometheus holds the alert pending
    (it fires after its `for`, longer than this test)."""
    prom: Prom = loaded["prom"]
    end = time.time() + 60
    while True:
        alerts = prom.http.get("/api/v1/alerts").json()["data"]["alerts"]
        latency = [a for a in alerts if a["labels"]["alertname"] == "LightningDiTLatencyAboveTimeout"]
        if latency:
            break
        assert time.time() < end, alerts
        time.sleep(0.5)
    (alert,) = latency
    assert alert["state"] == "pending" and alert["labels"]["namespace"] == NAMESPACE
    assert float(alert["value"]) > TIMEOUT_S
    assert alert["annotations"]["summary"] == f"LightningDiT: p99 latency above the request timeout in {NAMESPACE}"


def test_processes_say_when_they_load_and_are_ready(loaded) -> None:
    """At the default log level (warning; the harness sets it), each process logs its startup lines."""
    def startup(proc) -> list[str]:
        records = [json.loads(line) for line in proc.lines if line.startswith("{")]
        return [r["msg"] for r in records if r["logger"] == "ldit.startup" and r["level"] == "info"]

    worker, api = startup(loaded["worker"]), startup(loaded["api"])
    assert worker[0] == f"loading the model from {loaded['bundle']} (backend torch, device auto, precision fp32)"
    assert re.fullmatch(rf"ready: worker \S+ takes jobs from the queue; metrics on "
                        rf"http://0\.0\.0\.0:{loaded['metrics_port']}/metrics", worker[1]), worker
    assert api == [f"ready on {loaded['api'].url}: the API (try GET /readyz, POST /generate)"]

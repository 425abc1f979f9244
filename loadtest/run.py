#!/usr/bin/env python
"""Run the Locust load test headless and write a report (Markdown + PNG plots).

    python loadtest/run.py --quick                       # starts `python -m service` itself (LDIT_PORT=0)
    python loadtest/run.py --url http://127.0.0.1:8000   # an already running service
    python loadtest/run.py --shape ramp --max-users 32 --duration 120 --model-dir checkpoints/demo

Scrapes /metrics before and after; the report (default loadtest/out/) has throughput
against users, latency percentiles over time, and the batch-size and rows-per-forward
distributions of the run (the Prometheus histograms' increase). Every run is bounded:
the load shape stops at --duration and Locust is killed at --duration + 60 s.
Only loopback URLs are accepted.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from service.launcher import start_service

REPO = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
HISTOGRAMS = ("ldit_batch_size", "ldit_rows_per_forward", "ldit_decode_batch_size")


def log(msg: str) -> None:
    print(msg, flush=True)


# -- the service ------------------------------------------------------------------------------
def get(url: str, timeout: float = 30) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only (checked)
        return resp.read()


# -- Prometheus ---------------------------------------------------------------------------------
def scrape(url: str) -> dict[str, dict]:
    """{histogram name: {"buckets": {le: cumulative}, "sum": s, "count": n}} plus plain counters/gauges."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict] = {"_values": {}}
    for fam in text_string_to_metric_families(get(url.rstrip("/") + "/metrics").decode()):
        for s in fam.samples:
            if fam.type == "histogram" and fam.name in HISTOGRAMS:
                h = out.setdefault(fam.name, {"buckets": {}, "sum": 0.0, "count": 0.0})
                if s.name.endswith("_bucket"):
                    h["buckets"][s.labels["le"]] = s.value
                elif s.name.endswith("_sum"):
                    h["sum"] = s.value
                elif s.name.endswith("_count"):
                    h["count"] = s.value
            elif not s.labels and fam.type in ("counter", "gauge"):
                out["_values"][s.name] = s.value
    return out


def histogram_delta(before: dict, after: dict, name: str) -> list[tuple[str, float]]:
    """Per-bucket counts (not cumulative) of the run: [(upper bound, count)]."""
    a = after.get(name, {"buckets": {}})["buckets"]
    b = before.get(name, {"buckets": {}})["buckets"]
    les = sorted(a, key=lambda le: float("inf") if le == "+Inf" else float(le))
    out, prev = [], 0.0
    for le in les:
        cum = a[le] - b.get(le, 0.0)
        out.append((le, cum - prev))
        prev = cum
    return out


def histogram_mean(before: dict, after: dict, name: str) -> float:
    n = after.get(name, {}).get("count", 0) - before.get(name, {}).get("count", 0)
    s = after.get(name, {}).get("sum", 0) - before.get(name, {}).get("sum", 0)
    return s / n if n else float("nan")


# -- Locust -------------------------------------------------------------------------------------
def run_locust(url: str, out: Path, shape: str, max_users: int, duration: float, step_users: int, step_s: float,
               steps: int) -> int:
    prefix = out / "locust"
    env = {**os.environ, "LDIT_LOAD_SHAPE": shape, "LDIT_LOAD_MAX_USERS": str(max_users),
           "LDIT_LOAD_DURATION": str(duration), "LDIT_LOAD_STEP_USERS": str(step_users),
           "LDIT_LOAD_STEP_SECONDS": str(step_s), "LDIT_LOAD_SAMPLER_STEPS": str(steps)}
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-H", url, "--csv", str(prefix),
           "--csv-full-history", "--only-summary", "--stop-timeout", "30", "--loglevel", "WARNING",
           "--run-time", f"{int(duration) + 30}s", "--exit-code-on-error", "1", "--load-shape", shape]
    log(f"$ {' '.join(cmd)}")
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, timeout=duration + 90, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        log("locust ran past its bound and was killed")
        return 124
    (out / "locust.log").write_text(proc.stdout + proc.stderr)
    return proc.returncode


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def num(x, default=float("nan")) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return default


# -- report -------------------------------------------------------------------------------------
def plots(out: Path, history: list[dict], deltas: dict[str, list]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    agg = [r for r in history if r.get("Name") == "Aggregated"]
    if agg:
        by_users: dict[int, list[float]] = {}
        for r in agg:
            by_users.setdefault(int(num(r["User Count"], 0)), []).append(num(r["Requests/s"], 0))
        users = sorted(u for u in by_users if u > 0)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(users, [sum(by_users[u]) / len(by_users[u]) for u in users], "-o")
        ax.set(xlabel="concurrent users", ylabel="images/s (mean over the level)", title="Throughput against users")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "throughput_vs_users.png", dpi=110)
        plt.close(fig)
        files.append("throughput_vs_users.png")

        t0 = num(agg[0]["Timestamp"], 0)
        ts = [num(r["Timestamp"], 0) - t0 for r in agg]
        fig, ax = plt.subplots(figsize=(7, 4))
        for q in ("50%", "95%", "99%"):
            ax.plot(ts, [num(r.get(q)) / 1000 for r in agg], label=f"p{q[:-1]}")
        ax2 = ax.twinx()
        ax2.plot(ts, [num(r["User Count"], 0) for r in agg], "k:", label="users")
        ax.set(xlabel="seconds", ylabel="latency (s)", title="Latency percentiles (rolling)")
        ax2.set_ylabel("users")
        ax.legend(loc="upper left")
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=110)
        plt.close(fig)
        files.append("latency.png")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, ("ldit_batch_size", "ldit_rows_per_forward"), strict=True):
        d = [(le, c) for le, c in deltas.get(name, []) if c > 0 or le != "+Inf"]
        ax.bar([le for le, _ in d], [c for _, c in d])
        ax.set(title=f"{name} (forwards in this run)", xlabel="bucket upper bound", ylabel="forwards")
        ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "batching_histograms.png", dpi=110)
    plt.close(fig)
    files.append("batching_histograms.png")
    return files


def report(out: Path, args, url: str, model: dict, before: dict, after: dict, rc: int, wall: float) -> str:
    stats = read_csv(out / "locust_stats.csv")
    history = read_csv(out / "locust_stats_history.csv")
    failures = read_csv(out / "locust_failures.csv")
    deltas = {n: histogram_delta(before, after, n) for n in HISTOGRAMS}
    files = plots(out, history, deltas)
    v0, v1 = before["_values"], after["_values"]

    def inc(name: str) -> float:
        return v1.get(name, 0.0) - v0.get(name, 0.0)

    lines = ["# Load test report", "",
             f"Target {url} ({'started by run.py' if not args.url else 'given'}), model {model.get('name')} "
             f"({model.get('resolution')}px, {model.get('num_classes')} classes, workers "
             f"{', '.join(sorted({w['backend'] + ' ' + w['precision'] for w in model.get('workers', [])})) or 'none'}). Shape **{args.shape}**, up to {args.max_users} users, {args.duration:g} s "
             f"(wall {wall:.0f} s), locust exit code {rc}.", "",
             "| request | count | failures | median ms | p95 ms | p99 ms | max ms | req/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in stats:
        lines.append(f"| {r['Name']} | {r['Request Count']} | {r['Failure Count']} | {r['Median Response Time']} | "
                     f"{r.get('95%', '')} | {r.get('99%', '')} | {num(r['Max Response Time']):.0f} | "
                     f"{num(r['Requests/s']):.3f} |")
    lines += ["", f"From /metrics (increase over the run): {inc('ldit_inference_count_total'):.0f} images, "
              f"{inc('ldit_inference_exec_count_total'):.0f} DiT forwards, mean samples per forward "
              f"{histogram_mean(before, after, 'ldit_batch_size'):.2f}, mean rows per forward "
              f"{histogram_mean(before, after, 'ldit_rows_per_forward'):.2f}, mean decode batch "
              f"{histogram_mean(before, after, 'ldit_decode_batch_size'):.2f}, "
              f"{inc('ldit_admitted_mid_flight_total'):.0f} admitted mid-flight, "
              f"{inc('ldit_queue_full_rejections_total'):.0f} queue-full rejections.", ""]
    if failures:
        lines += ["Failures:", ""] + [f"- {f.get('Occurrences')}x {f.get('Name')}: {f.get('Error')}" for f in failures]
        lines.append("")
    lines += [f"![{f}]({f})" for f in files]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"stats": stats, "histograms": deltas, "rc": rc}, indent=2))
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running service (loopback only); default: start `python -m service`")
    p.add_argument("--out", type=Path, default=REPO / "loadtest" / "out")
    p.add_argument("--shape", choices=["step", "ramp"], default="step")
    p.add_argument("--max-users", type=int, default=32)
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load (the run is bounded by it)")
    p.add_argument("--step-users", type=int, default=4)
    p.add_argument("--step-seconds", type=float, default=20.0)
    p.add_argument("--steps", type=int, default=0, help="sampler grid points per request (0: model preset)")
    p.add_argument("--quick", action="store_true", help="30 s, step shape 2 users every 10 s up to 6")
    p.add_argument("--model-dir", help="LDIT_MODEL_DIR of the started service")
    p.add_argument("--service-env", action="append", default=[], metavar="LDIT_X=V",
                   help="extra settings of the started service (repeatable)")
    a = p.parse_args(argv)
    if a.quick:
        a.duration, a.max_users, a.step_users, a.step_seconds = 30.0, 6, 2, 10.0
    a.out.mkdir(parents=True, exist_ok=True)
    svc = None
    if a.url:
        host = urlparse(a.url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit(f"refusing to load-test {host}: only loopback targets are allowed")
        url = a.url.rstrip("/")
    else:
        env = dict(kv.split("=", 1) for kv in a.service_env)
        if a.model_dir:
            env["LDIT_MODEL_DIR"] = str(Path(a.model_dir).resolve())
        log("starting python -m service ...")
        svc = start_service("all", env)
        url = svc.url
        log(f"service at {url}")
    try:
        model = json.loads(get(url + "/v1/model"))
        before = scrape(url)
        t0 = time.time()
        rc = run_locust(url, a.out, a.shape, a.max_users, a.duration, a.step_users, a.step_seconds, a.steps)
        wall = time.time() - t0
        after = scrape(url)
    finally:
        if svc is not None:
            svc.stop()
    text = report(a.out, a, url, model, before, after, rc, wall)
    log(text)
    log(f"report: {a.out / 'report.md'}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())

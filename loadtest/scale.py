#!/usr/bin/env python
"""Many workers, one Redis (issue 14, part 4): images/s against the number of worker processes, under Locust.

    python loadtest/scale.py --quick                                  # 1, 2 workers, short levels
    python loadtest/scale.py --workers 1,2,4,8,12,16 --apis 2 --json loadtest/out/scale.json \
        --plot docs/img/scale.png

All on 127.0.0.1: Debian's redis-server (appendonly yes, as in production), `--apis` API
processes and up to max(--workers) worker processes (`python -m service api|worker`), the
workers on the simulated backend (a timing profile: they wait like an accelerator and burn
no CPU doing so, which is how 16 of them fit on a small machine). Workers are added level by
level; at each level Locust runs headless, closed loop, `--users-per-worker` x N users spread
over the APIs (loadtest/locustfile.py, LDIT_LOAD_HOSTS), first `--warmup` seconds unmeasured,
then `--duration` seconds measured. Per level:

* images/s (from Locust's history: successful /generate over the measured window; and the jobs
  Redis saw acknowledged in the window, the count that the per-image figures divide by),
  latency percentiles, failures;
* CPU seconds per image of every process (/proc): the APIs, the workers, redis-server, Locust;
* Redis's own view (INFO): CPU per image, network bytes in and out per image, commands per
  image, memory.

The report says where the images/s stop growing with N and which resource ran out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.one_worker import cpu_seconds, redis_info  # noqa: E402

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def log(msg: str) -> None:
    print(msg, flush=True)


class CpuSampler:
    """CPU seconds of a changing set of processes between two marks (dead ones keep their last reading)."""

    def __init__(self):
        self.last: dict[int, float] = {}

    def read(self, pids: list[int]) -> dict[int, float]:
        for pid in pids:
            try:
                self.last[pid] = cpu_seconds(pid)
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
        return {pid: self.last.get(pid, 0.0) for pid in pids}


def locust_rate(history_csv: Path, t_from: float) -> tuple[float, int]:
    """Successful /generate per second after `t_from` seconds of the run (from the cumulative history)."""
    rows = []
    with history_csv.open() as f:
        for r in csv.DictReader(f):
            if r.get("Name") == "Aggregated" and r.get("Timestamp"):
                rows.append((float(r["Timestamp"]), int(float(r["Total Request Count"])),
                             int(float(r["Total Failure Count"]))))
    if len(rows) < 2:
        return float("nan"), 0
    start = rows[0][0]
    inside = [r for r in rows if r[0] - start >= t_from]
    if len(inside) < 2:
        return float("nan"), 0
    (ta, na, fa), (tb, nb, fb) = inside[0], inside[-1]
    ok = (nb - fb) - (na - fa)
    return ok / (tb - ta) if tb > ta else float("nan"), ok


def run_level(n: int, apis: list, workers: list, server, a, out: Path) -> dict:
    users = a.users_per_worker * n
    prefix = out / f"locust-n{n}"
    env = {**os.environ, "LDIT_LOAD_HOSTS": ",".join(api.url for api in apis), "LDIT_LOAD_PRESET": a.preset,
           "LDIT_LOAD_SAMPLER_STEPS": str(a.steps), "LDIT_LOAD_SHAPE": "none"}
    total = a.warmup + a.duration
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-H", apis[0].url,
           "-u", str(users), "-r", str(max(1, users // 5)), "-t", f"{int(total)}s", "--csv", str(prefix),
           "--csv-full-history", "--only-summary", "--stop-timeout", "60", "--loglevel", "WARNING",
           "--load-shape", "none"]
    sampler = CpuSampler()
    pids = {"api": [api.proc.pid for api in apis], "workers": [w.proc.pid for w in workers],
            "redis": [server.proc.pid]}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    time.sleep(a.warmup)
    r = server.client()
    c0 = {k: sum(sampler.read(v).values()) for k, v in pids.items()}
    c0["locust"] = sum(sampler.read([proc.pid]).values())
    red0, t0 = redis_info(r), time.time()
    time.sleep(a.duration)
    c1 = {k: sum(sampler.read(v).values()) for k, v in pids.items()}
    c1["locust"] = sum(sampler.read([proc.pid]).values())
    red1, t1 = redis_info(r), time.time()
    try:
        proc.wait(timeout=a.duration + 180)
    except subprocess.TimeoutExpired:
        proc.kill()
    (out / f"locust-n{n}.log").write_text("".join(lines))
    rate, ok = locust_rate(Path(f"{prefix}_stats_history.csv"), a.warmup)
    with open(f"{prefix}_stats.csv") as f:
        stats = {row["Name"]: row for row in csv.DictReader(f)}
    gen = stats.get("/generate", {})
    wall = t1 - t0
    images = max(1, red1["acks"] - red0["acks"])  # jobs acknowledged in the window: the same clock as the rest
    level = {"workers": n, "users": users, "images_per_s": rate, "images_measured": ok,
             "acked_per_s": images / wall,
             "requests": int(float(gen.get("Request Count", 0))), "failures": int(float(gen.get("Failure Count", 0))),
             "p50_ms": float(gen.get("50%", "nan") or "nan"), "p95_ms": float(gen.get("95%", "nan") or "nan"),
             "p99_ms": float(gen.get("99%", "nan") or "nan"),
             "cpu_ms_per_image": {k: 1000 * (c1[k] - c0[k]) / images for k in c0},
             "cpu_cores": {k: (c1[k] - c0[k]) / wall for k in c0},
             "redis": {"cpu_ms_per_image": 1000 * (red1["cpu"] - red0["cpu"]) / images,
                       "cpu_share": (red1["cpu"] - red0["cpu"]) / wall,
                       "net_in_kb_per_image": (red1["net_in"] - red0["net_in"]) / images / 1000,
                       "net_out_kb_per_image": (red1["net_out"] - red0["net_out"]) / images / 1000,
                       "commands_per_image": (red1["commands"] - red0["commands"]) / images,
                       "used_memory_mib": red1["used_memory"] / 2**20},
             "loadavg": os.getloadavg()[0]}
    log(f"[scale] N={n:2d} users {users:4d}: {rate:7.2f} images/s, p50 {level['p50_ms']:.0f} ms, "
        f"failures {level['failures']}, cores " + json.dumps({k: round(v, 2) for k, v in level["cpu_cores"].items()})
        + f", redis {level['redis']['cpu_ms_per_image']:.3f} ms CPU, "
        f"{level['redis']['net_in_kb_per_image']:.0f}+{level['redis']['net_out_kb_per_image']:.0f} kB per image")
    return level


def marginal_costs(levels: list[dict]) -> dict[str, float]:
    """CPU ms per extra image of each process: the slope of its busy cores against the acknowledged
    images/s over the levels. Unlike a level's ratio, it leaves out the fixed background work (Redis's
    cron and fsync, heartbeats, idle polling), which dominates at low rates."""
    import numpy as np

    if len(levels) < 2:
        return {}
    x = np.array([lv["acked_per_s"] for lv in levels])
    out = {k: 1000 * float(np.polyfit(x, [lv["cpu_cores"][k] for lv in levels], 1)[0]) for k in levels[0]["cpu_cores"]}
    out["redis_self"] = 1000 * float(np.polyfit(x, [lv["redis"]["cpu_share"] for lv in levels], 1)[0])
    return out


def plot(levels: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [lv["workers"] for lv in levels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(n, [lv["images_per_s"] for lv in levels], "-o", label="measured")
    if levels:
        per = levels[0]["images_per_s"] / levels[0]["workers"]
        ax1.plot(n, [per * k for k in n], "k:", label="linear from N=1")
    ax1.set(xlabel="worker processes", ylabel="images/s", title=title)
    ax1.legend()
    for key in ("api", "workers", "redis", "locust"):
        ax2.plot(n, [lv["cpu_cores"][key] for lv in levels], "-o", label=key)
    ax2.plot(n, [sum(lv["cpu_cores"].values()) for lv in levels], "k-", label="total")
    ax2.axhline(os.cpu_count() or 2, color="r", ls=":", label="cores of this machine")
    ax2.set(xlabel="worker processes", ylabel="CPU cores busy", title="where the CPU goes")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    from service.launcher import start_service
    from tests.service_harness import start_redis

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="workers 1,2; 20 s levels")
    p.add_argument("--workers", default="1,2,4,8,12,16")
    p.add_argument("--apis", type=int, default=2)
    p.add_argument("--profile", default="xl1-256-h200-measured")
    p.add_argument("--model-dir", default=str(REPO / "checkpoints" / "demo"))
    p.add_argument("--preset", default="800ep")
    p.add_argument("--steps", type=int, default=0, help="grid points per request (0: the preset's)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--users-per-worker", type=int, default=48)
    p.add_argument("--warmup", type=float, default=45.0)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--out", type=Path, default=REPO / "loadtest" / "out" / "scale")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.workers, a.warmup, a.duration, a.users_per_worker = "1,2", 10.0, 20.0, 16
    a.out.mkdir(parents=True, exist_ok=True)
    counts = sorted({int(x) for x in a.workers.split(",")})
    server = start_redis("debian")
    env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": a.model_dir, "LDIT_BACKEND": "simulated",
           "LDIT_SIMULATED_PROFILE": a.profile, "LDIT_MAX_BATCH_SIZE": str(a.max_batch_size),
           "LDIT_MAX_QUEUE_LENGTH": str(10 * a.users_per_worker * max(counts)), "LDIT_REQUEST_TIMEOUT_S": "600",
           "LDIT_RESULT_TTL_S": "120", "OMP_NUM_THREADS": "1"}
    apis, workers, levels = [], [], []
    started = time.time()
    try:
        apis = [start_service("api", env) for _ in range(a.apis)]
        for n in counts:
            while len(workers) < n:
                workers.append(start_service("worker", {**env, "LDIT_WORKER_NAME": f"scale-w{len(workers) + 1}"}))
            levels.append(run_level(n, apis, workers, server, a, a.out))
    finally:
        for sp in [*workers, *apis]:
            sp.stop()
        server.stop()
        # what the services complained about (e.g. why a level had failures), kept beside Locust's CSVs
        complaints = [line for sp in [*apis, *workers] for line in sp.lines
                      if '"level": "warning"' in line or '"level": "error"' in line]
        (a.out / "service-warnings.log").write_text("".join(complaints))
    best = max(levels, key=lambda lv: lv["images_per_s"])
    result = {"argv": sys.argv[1:], "profile": a.profile, "preset": a.preset, "steps": a.steps, "apis": a.apis,
              "cpus": os.cpu_count(), "levels": levels, "best": best, "marginal": marginal_costs(levels),
              "seconds": time.time() - started}
    log("[scale] marginal CPU ms per image (slope over the levels): "
        + json.dumps({k: round(v, 3) for k, v in result["marginal"].items()}))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2))
    plot(levels, a.plot or a.out / "scale.png", f"{a.profile}, {a.preset}: images/s against workers")
    log(f"[scale] best: N={best['workers']} at {best['images_per_s']:.2f} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

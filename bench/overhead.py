"""(b) Serving overhead at saturation: the all-in-one service (HTTP + Redis + PNG) against
the same scheduler/runner loop in-process (no HTTP, Redis or PNG).

Both are closed loops of `clients` concurrent requests (a finished request is replaced at
once), enough to keep every row of the batch busy; throughput is counted between the
`warmup`-th and the last completion. The in-process loop runs the same Scheduler and
Runner as service/worker/loop.py, including the batched VAE decode.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from urllib.parse import urlparse

import torch

from bench.common import REPO, THREADS, Model, log, progress
from service.launcher import start_service
from service.store.jobs import Job
from service.worker.runner import Runner
from service.worker.scheduler import Scheduler


def _rate(stamps: list[float], warmup: int) -> float:
    stamps = sorted(stamps)
    if len(stamps) <= warmup + 1 or stamps[-1] <= stamps[warmup]:
        return float("nan")
    return (len(stamps) - 1 - warmup) / (stamps[-1] - stamps[warmup])


def engine_alone(model: Model, engine, clients: int, total: int, warmup: int, max_rows: int,
                 batching: str = "step") -> dict:
    runner = Runner(engine, model.bundle.stats, model.bundle.null_class)
    sched = Scheduler(max_rows, model.bundle.spec.latent_shape, batching, device=engine.device)
    waiting: deque[Job] = deque()
    issued, stamps = 0, []
    bar = progress(total, f"{model.key} engine alone")

    def new_job() -> Job:
        nonlocal issued
        issued += 1
        return Job(class_id=issued % model.bundle.spec.num_classes, seed=issued, preset=model.preset,
                   key=str(issued), deadline=time.time() + 1e6)

    deadline = time.monotonic() + 3600
    with torch.inference_mode():
        while len(stamps) < total and time.monotonic() < deadline:
            while issued < total and len(waiting) + len(sched.active) < clients:
                waiting.append(new_job())
            sched.admit_waiting(waiting)
            plan = sched.schedule()
            if plan is None:
                break
            x_next, secs = runner.step(plan)
            done = sched.commit(plan, x_next, secs)
            if done:
                runner.decode([s.x for s in done])
                now = time.perf_counter()
                stamps += [now] * len(done)
                bar.update(len(done))
    bar.close()
    return {"completed": len(stamps), "images_per_s": _rate(stamps, warmup)}


def http_clients(url: str, clients: int, total: int, num_classes: int, seed_base: int,
                 time_limit: float = 3600) -> list[float]:
    """`clients` threads POST /generate with unique seeds until `total` answers; completion times."""
    u = urlparse(url)
    lock = threading.Lock()
    counter = {"issued": 0}
    stamps: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + time_limit
    bar = progress(total, "service (HTTP)")

    def client():
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
        while time.monotonic() < deadline:
            with lock:
                if counter["issued"] >= total:
                    break
                counter["issued"] += 1
                i = counter["issued"]
            body = json.dumps({"class_label": i % num_classes, "seed": seed_base + i})
            conn.request("POST", "/generate", body, {"content-type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            with lock:
                if resp.status == 200 and data[:8] == b"\x89PNG\r\n\x1a\n":
                    stamps.append(time.perf_counter())
                    bar.update(1)
                else:
                    errors.append(f"{resp.status} {data[:200]!r}")
        conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, deadline - time.monotonic() + 60))
    bar.close()
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    return stamps


def service_saturated(model: Model, backend: str, precision: str, clients: int, total: int, warmup: int,
                      max_rows: int) -> dict:
    env = {"LDIT_BACKEND": backend, "LDIT_PRECISION": precision, "LDIT_MAX_BATCH_SIZE": str(max_rows),
           "LDIT_MAX_QUEUE_LENGTH": str(max(256, 4 * clients)), "LDIT_REQUEST_TIMEOUT_S": "3600"}
    svc = start_service("all", {"LDIT_MODEL_DIR": str(model.root), "OMP_NUM_THREADS": str(THREADS), **env})
    url = svc.url
    try:
        # one request first: loads lazily-built kernels outside the measured window
        http_clients(url, 1, 1, model.bundle.spec.num_classes, seed_base=10_000_000)
        stamps = http_clients(url, clients, total, model.bundle.spec.num_classes,
                              seed_base=int(time.time()) % 1_000_000 * 1000)
    finally:
        svc.stop()
    return {"completed": len(stamps), "images_per_s": _rate(stamps, warmup)}


def engine_alone_subprocess(model: Model, backend: str, precision: str, clients: int, total: int, warmup: int,
                            max_rows: int) -> dict:
    """engine_alone in a fresh process (as fresh as the service's), torch called from a non-main thread."""
    cmd = [sys.executable, "-m", "bench.overhead", "--model-dir", str(model.root), "--backend", backend,
           "--precision", precision, "--clients", str(clients), "--total", str(total), "--warmup", str(warmup),
           "--max-rows", str(max_rows)]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"engine-alone run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(model: Model, backend: str, precision: str, clients: int, total: int, warmup: int,
            max_rows: int, rounds: int = 1) -> dict:
    """Alternates engine-alone and service runs `rounds` times; overhead = 1 - service / engine."""
    eng_rates, svc_rates = [], []
    for r in range(rounds):
        log(f"[overhead] {model.key} round {r + 1}/{rounds}: engine alone")
        eng_rates.append(engine_alone_subprocess(model, backend, precision, clients, total, warmup,
                                                 max_rows)["images_per_s"])
        log(f"[overhead] {model.key} round {r + 1}/{rounds}: service")
        svc_rates.append(service_saturated(model, backend, precision, clients, total, warmup, max_rows)["images_per_s"])
    e, s = max(eng_rates), max(svc_rates)
    return {"backend": f"{backend} {precision}", "clients": clients, "requests": total, "warmup": warmup,
            "max_rows": max_rows, "engine_images_per_s": eng_rates, "service_images_per_s": svc_rates,
            "overhead_pct": 100 * (1 - s / e)}


def _cli() -> None:
    import argparse

    from bench.common import in_thread
    from engines import load_engine
    from model.bundle import load_bundle

    p = argparse.ArgumentParser(description="engine alone at saturation (in-process scheduler + runner)")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--backend", default="torch")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--total", type=int, default=96)
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--max-rows", type=int, default=16)
    a = p.parse_args()
    torch.set_num_threads(THREADS)
    b = load_bundle(a.model_dir)
    m = Model("cli", b.spec.name, a.model_dir, b, b.spec.presets[b.spec.default_preset])

    def go():
        eng = load_engine(b, a.backend, "cpu", a.precision, max_rows=a.max_rows)
        engine_alone(m, eng, 2, 2, 0, a.max_rows)  # warm-up, as the service's first request
        return engine_alone(m, eng, a.clients, a.total, a.warmup, a.max_rows)

    print(json.dumps(in_thread(go)), flush=True)


if __name__ == "__main__":
    _cli()

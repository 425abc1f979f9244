#!/usr/bin/env python
"""Issue 6: step-level vs request-level batching under open-loop Poisson arrivals.

In-process (Scheduler + Runner + engine, no HTTP/Redis/PNG): real wall-clock arrivals
from a seeded exponential RNG, one compute thread like the worker. Capacity is measured
first (saturated step-level throughput: a closed loop with the queue always full); then
each load (30%, 70%, 90% of capacity) runs both modes on the same arrival times.

Latency = arrival -> image decoded. Throughput = completed / (last completion - first arrival).

    python bench/batching.py --quick             # demo model, few requests (< 2 min)
    python bench/batching.py --models demo,b1    # B/1 at 16x16 with the 800ep preset cut to --b1-steps points
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import REPO, Model, in_thread, load_model, log, machine, progress, setup_threads  # noqa: E402
from bench.overhead import engine_alone  # noqa: E402
from service.jobs import Job  # noqa: E402
from service.runner import Runner  # noqa: E402
from service.scheduler import Scheduler  # noqa: E402


def arrivals(rate: float, n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def open_loop(model: Model, engine, batching: str, max_rows: int, times: list[float], time_limit: float) -> dict:
    runner = Runner(engine, model.bundle.stats, model.bundle.null_class)
    sched = Scheduler(max_rows, model.bundle.spec.latent_shape, batching, device=engine.device)
    waiting: deque[Job] = deque()
    arrive: dict[str, float] = {}
    latencies: list[float] = []
    rows, widths = [], []
    n, nxt = len(times), 0
    bar = progress(n, f"{model.key} {batching}")
    t0 = time.perf_counter()
    end = t0 + time_limit
    last_done = t0
    with torch.inference_mode():
        while len(latencies) < n and time.perf_counter() < end:
            now = time.perf_counter() - t0
            while nxt < n and times[nxt] <= now:
                key = str(nxt)
                waiting.append(Job(class_id=nxt % model.bundle.spec.num_classes, seed=nxt, preset=model.preset,
                                   key=key, deadline=time.time() + 1e6))
                arrive[key] = t0 + times[nxt]
                nxt += 1
            sched.admit_waiting(waiting)
            plan = sched.schedule()
            if plan is None:
                if nxt < n:
                    time.sleep(max(0.0, min(times[nxt] - (time.perf_counter() - t0), 0.05)))
                continue
            x_next, secs = runner.step(plan)
            rows.append(plan.rows)
            widths.append(len(plan.samples))
            done = sched.commit(plan, x_next, secs)
            if done:
                runner.decode([s.x for s in done])
                last_done = time.perf_counter()
                latencies += [last_done - arrive[s.job.key] for s in done]
                bar.update(len(done))
    bar.close()
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    span = last_done - (t0 + times[0])
    return {"batching": batching, "completed": len(latencies), "offered": n,
            "throughput": len(latencies) / span if span > 0 else float("nan"),
            "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
            "p99": float(np.percentile(lat, 99)), "mean_rows": float(np.mean(rows)) if rows else 0.0,
            "mean_batch": float(np.mean(widths)) if widths else 0.0, "forwards": len(rows)}


def run_model(model: Model, max_rows: int, requests: int, cap_requests: int, loads: list[float], seed: int,
              time_limit: float, device: str = "cpu", precision: str = "fp32", cuda_graphs: bool = False) -> dict:
    from engines import load_engine

    engine = load_engine(model.bundle, "torch", device, precision, max_rows=max_rows, cuda_graphs=cuda_graphs)
    engine.warmup()
    engine_alone(model, engine, 2, 2, 0, max_rows)  # warm-up
    cap = {}
    for mode in ("step", "request"):
        cap[mode] = engine_alone(model, engine, 2 * max_rows, cap_requests, max(2, cap_requests // 6), max_rows,
                                 batching=mode)["images_per_s"]
        log(f"[batching] {model.key}: saturated {mode}-level throughput {cap[mode]:.3f} img/s")
    capacity = cap["step"]
    runs = []
    for i, load in enumerate(loads):
        rate = load * capacity
        times = arrivals(rate, requests, seed + i)
        for mode in ("step", "request"):
            r = open_loop(model, engine, mode, max_rows, times, time_limit)
            r.update(load=load, rate=rate)
            runs.append(r)
            log(f"[batching] {model.key} load {load:.0%} ({rate:.3f}/s) {mode:7s}: {r['throughput']:.3f} img/s, "
                f"p50 {r['p50']:.2f} s p95 {r['p95']:.2f} s p99 {r['p99']:.2f} s, mean rows {r['mean_rows']:.1f}, "
                f"{r['completed']}/{r['offered']} done")
    engine.close()
    return {"label": model.label, "note": model.note, "preset": model.preset.to_dict(), "max_rows": max_rows,
            "engine": f"{engine.info.device} {engine.info.precision} ({engine.info.detail})",
            "capacity": cap, "requests": requests, "runs": runs}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"].items())
    fig, axes = plt.subplots(1, 2 * len(models), figsize=(6 * 2 * len(models), 4), squeeze=False)
    for k, (_key, m) in enumerate(models):
        ax_lat, ax_thr = axes[0][2 * k], axes[0][2 * k + 1]
        for mode, color in (("step", "tab:blue"), ("request", "tab:orange")):
            rs = [r for r in m["runs"] if r["batching"] == mode]
            x = [100 * r["load"] for r in rs]
            for q, style in (("p50", "-o"), ("p95", "--s"), ("p99", ":^")):
                ax_lat.plot(x, [r[q] for r in rs], style, color=color, label=f"{mode} {q}")
            ax_thr.plot(x, [r["throughput"] for r in rs], "-o", color=color, label=mode)
        ax_thr.plot(x, [r["rate"] for r in rs], "k:", label="offered")
        ax_lat.set(title=f"{m['label']}: latency", xlabel="load (% of step-level capacity)", ylabel="seconds")
        ax_thr.set(title=f"{m['label']}: throughput", xlabel="load (% of step-level capacity)", ylabel="images/s")
        ax_lat.legend(fontsize=7)
        ax_thr.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    lines = [f"Machine: {result['machine']['cpu']}, {result['machine']['torch_threads']} torch threads, load "
             f"average at start {result['machine']['loadavg']}; run took {result['seconds']:.0f} s.", ""]
    for m in result["models"].values():
        cap = m["capacity"]
        lines += [f"### {m['label']}", "", f"{m['note']}. Engine {m.get('engine', 'cpu fp32')}. "
                  f"Preset {m['preset']}, max_rows {m['max_rows']}, "
                  f"{m['requests']} requests per run. Saturated throughput: step-level {cap['step']:.3f} img/s, "
                  f"request-level {cap['request']:.3f} img/s (capacity = step-level).", "",
                  "| load | batching | offered/s | throughput/s | p50 s | p95 s | p99 s | mean rows/forward | done |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in m["runs"]:
            lines.append(f"| {r['load']:.0%} | {r['batching']} | {r['rate']:.3f} | {r['throughput']:.3f} | "
                         f"{r['p50']:.2f} | {r['p95']:.2f} | {r['p99']:.2f} | {r['mean_rows']:.1f} | "
                         f"{r['completed']}/{r['offered']} |")
        for load in sorted({r["load"] for r in m["runs"]}):
            s = next(r for r in m["runs"] if r["load"] == load and r["batching"] == "step")
            q = next(r for r in m["runs"] if r["load"] == load and r["batching"] == "request")
            lines.append(f"\nAt {load:.0%}: step/request p50 ratio **{s['p50'] / q['p50']:.2f}**, throughput ratio "
                         f"**{s['throughput'] / q['throughput']:.2f}**.")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", default="demo")
    p.add_argument("--max-rows", type=int, default=16)
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--loads", default="0.3,0.7,0.9")
    p.add_argument("--b1-steps", type=int, default=25, help="grid points of B/1's shortened 800ep preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=900, help="seconds per open-loop run (bound)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--precision", default="fp32", help="torch backend precision (fp32 | bf16 | fp16)")
    p.add_argument("--cuda-graphs", action="store_true", help="capture CUDA graphs per bucket (device cuda)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    p.add_argument("--plot", type=Path, default=None, help="also save the plot here (e.g. docs/img/batching.png)")
    a = p.parse_args(argv)
    setup_threads()
    a.out.mkdir(parents=True, exist_ok=True)
    requests = 40 if a.quick else a.requests
    started = time.time()
    result = {"machine": machine(), "argv": sys.argv[1:], "models": {}}
    with tempfile.TemporaryDirectory(prefix="ldit-batching-") as tmp:
        for key in a.models.split(","):
            m = load_model(key, Path(tmp))
            if key == "b1":
                m.preset = m.preset.replace(num_steps=a.b1_steps)
            result["models"][key] = in_thread(run_model, m, a.max_rows, requests, max(24, requests // 3),
                                              [float(x) for x in a.loads.split(",")], a.seed, a.time_limit,
                                              a.device, a.precision, a.cuda_graphs)
    result["seconds"] = time.time() - started
    (a.out / "batching.json").write_text(json.dumps(result, indent=2))
    (a.out / "batching.md").write_text(markdown(result))
    plot(result, a.out / "batching.png")
    if a.plot:
        plot(result, a.plot)
    log(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

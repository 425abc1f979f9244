#!/usr/bin/env python
"""Step-level vs request-level batching under open-loop Poisson arrivals (issues 6 and 14).

In-process: the service's Scheduler, DecodeQueue and Runner on one engine, one compute
thread as in the worker; no HTTP, Redis or PNG. Arrivals come from a seeded exponential
RNG at 30/70/90% of capacity (saturated step-level throughput), the same arrival times and
requests for every mode. Latency = arrival -> image decoded; throughput = completed /
(last completion - first arrival).

Engines:
* `--backend simulated --profiles NAME,...`: the timing model of an accelerator
  (engines/profiles) on the demo bundle's latents. Forwards and decodes are wall-clock
  waits; the host work (scheduling, tensor building, CFG arithmetic) is real. The same
  experiment also runs in virtual time ("model"): the same Scheduler and DecodeQueue code,
  the profile's costs added to a clock, no host work and no waiting. The model is exact and
  fast, so it spans many loads for the plots; the gap between it and the wall-clock run is
  what the host adds.
* `--backend torch --models demo,b1`: the real models (CPU, or a GPU with --device cuda).

Workloads: `preset` (every request the model's preset: 800ep for the profiles, whose
models are XL/1 and B/1), `mixed` (steps 25/50/100/250 and presets 800ep/64ep/demo,
uniformly and seeded).

Modes: `step` and `request` (LDIT_BATCHING), `step+dN` = step-level with
LDIT_MAX_DECODE_DELAY_MS=N (finished samples may wait N ms to share a decode call).

    python bench/batching.py --quick                                   # demo model on torch (< 2 min)
    python bench/batching.py --backend simulated --profiles xl1-256-h200-measured --workloads preset,mixed
    python bench/batching.py --backend simulated --no-wall ...         # the virtual-time model only (seconds)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import REPO, Model, in_thread, load_model, log, machine, progress, setup_threads  # noqa: E402
from engines.timing_profile import TimingProfile, load_profile  # noqa: E402
from model.sampling import SamplerPreset  # noqa: E402
from service.store.jobs import Job  # noqa: E402
from service.worker.runner import Runner  # noqa: E402
from service.worker.scheduler import DecodeQueue, Scheduler  # noqa: E402

MIXED_STEPS = (25, 50, 100, 250)
MIXED_PRESETS = ("800ep", "64ep", "demo")
MODEL_LOADS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass
class Setup:
    """One row of experiments: a model (real or a profile on the demo bundle's latents) and a workload."""

    key: str
    label: str
    model: Model
    workload: str  # "preset" | "mixed"
    engine: object = None  # None: the virtual-time model only
    profile: TimingProfile | None = None


def arrivals(rate: float, n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def workload(setup: Setup, n: int, seed: int) -> list[SamplerPreset]:
    """The sampler settings of requests 0..n-1 (the same for every mode and load)."""
    if setup.workload == "preset":
        return [setup.model.preset] * n
    presets = setup.model.bundle.spec.presets
    names = [p for p in MIXED_PRESETS if p in presets] or sorted(presets)
    rng = random.Random(seed)
    return [presets[rng.choice(names)].replace(num_steps=rng.choice(MIXED_STEPS)) for _ in range(n)]


def parse_mode(mode: str) -> tuple[str, float]:
    """"step" | "request" | "step+d10" -> (batching, max_decode_delay_ms)."""
    batching, _, delay = mode.partition("+d")
    if batching not in ("step", "request"):
        raise ValueError(f"unknown mode {mode!r}")
    return batching, float(delay or 0)


class VirtualClock:
    """The profile's costs on a clock of their own: no host work, no waiting."""

    def __init__(self, profile: TimingProfile):
        self.profile, self.now = profile, 0.0

    def step(self, plan) -> tuple[torch.Tensor, float]:
        secs = self.profile.dit_ms(plan.rows) / 1000
        self.now += secs
        x = torch.zeros(()).expand(len(plan.samples), *plan.samples[0].x.shape)
        return x, secs

    def decode(self, n: int) -> None:
        self.now += self.profile.decode_ms(n) / 1000


def open_loop(setup: Setup, mode: str, max_rows: int, times: list[float], presets: list[SamplerPreset],
              time_limit: float, virtual: bool) -> dict:
    """One run: requests i arrive at times[i] (seconds from the start) with presets[i]."""
    bundle = setup.model.bundle
    batching, delay_ms = parse_mode(mode)
    vclock = VirtualClock(setup.profile) if virtual else None
    runner = None if virtual else Runner(setup.engine, bundle.stats, bundle.null_class)
    device = "cpu" if virtual else setup.engine.device
    sched = Scheduler(max_rows, bundle.spec.latent_shape, batching, device=device)
    decodes = DecodeQueue(delay_ms / 1000, max_rows)
    waiting: deque[Job] = deque()
    arrive: dict[str, float] = {}
    latencies, done_at, rows, widths, decode_calls = [], [], [], [], 0
    n, nxt = len(times), 0
    bar = None if virtual else progress(n, f"{setup.key} {mode}")
    t0 = time.perf_counter()

    def clock() -> float:
        return vclock.now if virtual else time.perf_counter() - t0

    with torch.inference_mode():
        while len(latencies) < n and (virtual or clock() < time_limit):
            now = clock()
            while nxt < n and times[nxt] <= now:
                key = str(nxt)
                waiting.append(Job(class_id=nxt % bundle.spec.num_classes, seed=nxt, preset=presets[nxt], key=key,
                                   deadline=time.time() + 1e6))
                arrive[key] = times[nxt]
                nxt += 1
            sched.admit_waiting(waiting)
            plan = sched.schedule()
            if plan is not None:
                x_next, secs = vclock.step(plan) if virtual else runner.step(plan)
                rows.append(plan.rows)
                widths.append(len(plan.samples))
                decodes.add(sched.commit(plan, x_next, secs, now=clock()))
            batch = decodes.due(clock(), sched.active_rows(), max_rows)
            if batch:
                if virtual:
                    vclock.decode(len(batch))
                else:
                    runner.decode([s.x for s in batch])
                decode_calls += 1
                end = clock()
                latencies += [end - arrive[s.job.key] for s in batch]
                done_at += [end] * len(batch)
                if bar:
                    bar.update(len(batch))
            if plan is None and not batch and not waiting and nxt < n:  # idle until the next arrival
                if virtual:
                    vclock.now = max(vclock.now, times[nxt])
                else:
                    time.sleep(max(0.0, min(times[nxt] - clock(), 0.05)))
    if bar:
        bar.close()
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    span = (max(done_at) - times[0]) if done_at else float("nan")
    return {"mode": mode, "kind": "model" if virtual else "wall", "completed": len(latencies), "offered": n,
            "throughput": len(latencies) / span if span > 0 else float("nan"),
            "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
            "p99": float(np.percentile(lat, 99)), "mean_rows": float(np.mean(rows)) if rows else 0.0,
            "mean_batch": float(np.mean(widths)) if widths else 0.0, "forwards": len(rows),
            "decode_calls": decode_calls, "done_at": done_at}


def saturated(setup: Setup, mode: str, max_rows: int, n: int, time_limit: float, virtual: bool, seed: int) -> float:
    """Throughput with every request queued at once: completed / time of the last completion.

    Completions come in bursts (samples admitted together finish together), so a rate between two
    completions inside the run would depend on where the bursts fall; the whole run's rate does not
    (n is several batches, so the last, partly filled one weighs little)."""
    r = open_loop(setup, mode, max_rows, [0.0] * n, workload(setup, n, seed), time_limit, virtual)
    return r["completed"] / max(r["done_at"]) if r["done_at"] else float("nan")


def run_setup(setup: Setup, modes: list[str], max_rows: int, requests: int, cap_requests: int, loads: list[float],
              model_loads: list[float], seed: int, time_limit: float, wall: bool, out: dict | None = None,
              saved=lambda: None) -> dict:
    """Fills `out` (a fresh dict by default) and calls `saved()` after every run, so a caller can keep the
    runs done so far (the GPU kit's time cap may cut the last one)."""
    kinds = (["model"] if setup.profile is not None else []) + (["wall"] if wall and setup.engine is not None else [])
    out = {} if out is None else out
    out.update({"label": setup.label, "note": setup.model.note, "workload": setup.workload,
                "preset": setup.model.preset.to_dict(), "max_rows": max_rows, "modes": modes, "requests": requests,
                "profile": setup.profile.name if setup.profile else None, "capacity": {}, "runs": []})
    if setup.engine is not None:
        info = setup.engine.info
        out["engine"] = f"{info.backend} {info.device} {info.precision} ({info.detail})"
    for kind in kinds:
        virtual = kind == "model"
        cap = out["capacity"][kind] = {}
        for m in modes:
            cap[m] = saturated(setup, m, max_rows, cap_requests * (4 if virtual else 1), time_limit, virtual, seed)
            saved()
        log(f"[batching] {setup.key} {kind}: saturated " + ", ".join(f"{m} {v:.3f}" for m, v in cap.items()) + " img/s")
        capacity = cap["step"]
        for i, load in enumerate(model_loads if virtual else loads):
            rate = load * capacity
            n = requests * (3 if virtual else 1)
            times, presets = arrivals(rate, n, seed + 1 + i), workload(setup, n, seed + 101 + i)
            for mode in modes:
                r = open_loop(setup, mode, max_rows, times, presets, time_limit, virtual)
                r.pop("done_at")
                r.update(load=load, rate=rate)
                out["runs"].append(r)
                saved()
                log(f"[batching] {setup.key} {kind} load {load:.0%} ({rate:.3f}/s) {mode:9s}: "
                    f"{r['throughput']:.3f} img/s, p50 {r['p50']:.3f} s p99 {r['p99']:.3f} s, "
                    f"rows {r['mean_rows']:.1f}, decodes {r['decode_calls']}, {r['completed']}/{r['offered']} done")
    return out


def ratio_lines(m: dict, kind: str) -> list[str]:
    runs = [r for r in m["runs"] if r["kind"] == kind]
    lines = []
    for load in sorted({r["load"] for r in runs}):
        req = next((r for r in runs if r["load"] == load and r["mode"] == "request"), None)
        if req is None:
            continue
        parts = []
        for r in runs:
            if r["load"] == load and r["mode"] != "request":
                parts.append(f"{r['mode']}: p50 **{r['p50'] / req['p50']:.2f}x**, p99 {r['p99'] / req['p99']:.2f}x, "
                             f"throughput {r['throughput'] / req['throughput']:.2f}x")
        lines.append(f"- {load:.0%}: " + "; ".join(parts))
    return lines


def markdown(result: dict) -> str:
    lines = [f"Machine: {result['machine']['cpu']}, {result['machine']['torch_threads']} torch threads, load "
             f"average at start {result['machine']['loadavg']}; run took {result['seconds']:.0f} s.", ""]
    for m in result["setups"].values():
        lines += [f"### {m['label']}", "", f"{m['note']}. {m.get('engine', '')} Workload `{m['workload']}`"
                  f"{' (preset ' + json.dumps(m['preset']) + ')' if m['workload'] == 'preset' else ''}, "
                  f"max_rows {m['max_rows']}.", ""]
        for kind, cap in m["capacity"].items():
            lines.append(f"Saturated throughput ({kind}): " + ", ".join(f"{k} {v:.3f} img/s" for k, v in cap.items())
                         + ".")
        lines.append("")
        wall = [r for r in m["runs"] if r["kind"] == "wall"]
        if wall:
            lines += ["Wall clock:", "", "| load | mode | offered/s | throughput/s | p50 s | p95 s | p99 s | rows/forward "
                      "| decode calls | done |", "|---|---|---|---|---|---|---|---|---|---|"]
            for r in wall:
                lines.append(f"| {r['load']:.0%} | {r['mode']} | {r['rate']:.3f} | {r['throughput']:.3f} | "
                             f"{r['p50']:.3f} | {r['p95']:.3f} | {r['p99']:.3f} | {r['mean_rows']:.1f} | "
                             f"{r['decode_calls']} | {r['completed']}/{r['offered']} |")
            lines += ["", "Against request-level, wall clock:", *ratio_lines(m, "wall"), ""]
        if any(r["kind"] == "model" for r in m["runs"]):
            lines += ["Against request-level, virtual-time model:", *ratio_lines(m, "model"), ""]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # a GPU image without it: the JSON and the markdown carry the numbers
        log(f"[batching] matplotlib is not installed: no plot {path.name}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = list(result["setups"].values())
    fig, axes = plt.subplots(len(setups), 2, figsize=(12, 3.6 * len(setups)), squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for row, m in zip(axes, setups, strict=True):
        ax_lat, ax_thr = row
        for mode, color in zip(m["modes"], colors, strict=False):
            model = [r for r in m["runs"] if r["mode"] == mode and r["kind"] == "model"]
            wall = [r for r in m["runs"] if r["mode"] == mode and r["kind"] == "wall"]
            if model:
                x = [100 * r["load"] for r in model]
                ax_lat.plot(x, [r["p50"] for r in model], "-", color=color, label=f"{mode} p50 (model)")
                ax_lat.plot(x, [r["p99"] for r in model], ":", color=color, label=f"{mode} p99 (model)")
                ax_thr.plot(x, [r["throughput"] for r in model], "-", color=color, label=f"{mode} (model)")
            if wall:
                x = [100 * r["load"] for r in wall]
                ax_lat.plot(x, [r["p50"] for r in wall], "o", color=color, label=f"{mode} p50 (wall)")
                ax_lat.plot(x, [r["p99"] for r in wall], "^", color=color, label=f"{mode} p99 (wall)")
                ax_thr.plot(x, [r["throughput"] for r in wall], "o", color=color, label=f"{mode} (wall)")
        ax_lat.set(title=f"{m['label']}, {m['workload']}: latency", xlabel="load (% of step-level capacity)",
                   ylabel="seconds")
        ax_thr.set(title="throughput", xlabel="load (% of step-level capacity)", ylabel="images/s")
        ax_lat.legend(fontsize=6, ncol=2)
        ax_thr.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def setups_for(a, tmp: Path) -> list[Setup]:
    out = []
    if a.backend == "simulated":
        from engines.simulated import SimulatedEngine

        base = load_model("demo", tmp)
        preset = base.bundle.spec.presets.get("800ep", base.preset)
        for name in a.profiles.split(","):
            profile = load_profile(name)
            model = Model(base.key, base.label, base.root, base.bundle, preset,
                          f"simulated: profile {profile.name} ({profile.source}) on the demo bundle's latents")
            engine = SimulatedEngine(base.bundle, profile, a.max_rows) if a.wall else None
            for wl in a.workloads.split(","):
                out.append(Setup(f"{profile.name}/{wl}", profile.name, model, wl, engine, profile))
        return out
    from engines import load_engine

    for key in a.models.split(","):
        m = load_model(key, tmp)
        if key == "b1":
            m.preset = m.preset.replace(num_steps=a.b1_steps)
        engine = load_engine(m.bundle, "torch", a.device, a.precision, max_rows=a.max_rows,
                             cuda_graphs=a.cuda_graphs)
        engine.warmup()
        for wl in a.workloads.split(","):
            out.append(Setup(f"{key}/{wl}", m.label, m, wl, engine))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--backend", default="torch", choices=("torch", "simulated"))
    p.add_argument("--profiles", default="xl1-256-h200-measured", help="simulated: timing profiles (names or files)")
    p.add_argument("--models", default="demo", help="torch: demo, b1")
    p.add_argument("--workloads", default="preset", help="preset, mixed")
    p.add_argument("--modes", default="step,request", help="step, request, step+dN (decode delay N ms)")
    p.add_argument("--max-rows", type=int, default=16)
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--cap-requests", type=int, default=0, help="requests of the saturated run (default: max(24, requests/3))")
    p.add_argument("--loads", default="0.3,0.7,0.9")
    p.add_argument("--model-loads", default=",".join(map(str, MODEL_LOADS)), help="loads of the virtual-time model")
    p.add_argument("--no-wall", dest="wall", action="store_false", help="simulated: the virtual-time model only")
    p.add_argument("--b1-steps", type=int, default=25, help="grid points of B/1's shortened 800ep preset (torch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=900, help="seconds per wall-clock run (bound)")
    p.add_argument("--device", default="cpu", help="torch: cpu | cuda | cuda:N")
    p.add_argument("--precision", default="fp32", help="torch backend precision (fp32 | bf16 | fp16)")
    p.add_argument("--cuda-graphs", action="store_true", help="capture CUDA graphs per bucket (device cuda)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    p.add_argument("--name", default="batching", help="output file stem under --out")
    p.add_argument("--plot", type=Path, default=None, help="also save the plot here (e.g. docs/img/batching.png)")
    a = p.parse_args(argv)
    setup_threads()
    a.out.mkdir(parents=True, exist_ok=True)
    requests = 40 if a.quick else a.requests
    cap_requests = a.cap_requests or max(24, requests // 3)
    modes = a.modes.split(",")
    if "step" not in modes or "request" not in modes:
        p.error("--modes must include step (the capacity) and request (the baseline)")
    started = time.time()
    result = {"machine": machine(), "argv": sys.argv[1:], "setups": {}}
    path = a.out / f"{a.name}.json"

    def save() -> None:  # the whole result so far, replaced atomically: a run cut short keeps what it did
        result["seconds"] = time.time() - started
        tmp_path = path.with_name(path.name + ".tmp")
        tmp_path.write_text(json.dumps(result))
        tmp_path.replace(path)

    with tempfile.TemporaryDirectory(prefix="ldit-batching-") as tmp:
        for setup in setups_for(a, Path(tmp)):
            result["setups"][setup.key] = {}
            in_thread(run_setup, setup, modes, a.max_rows, requests, cap_requests, [float(x) for x in a.loads.split(",")],
                      [float(x) for x in a.model_loads.split(",")], a.seed, a.time_limit, a.wall,
                      result["setups"][setup.key], save)
    save()
    (a.out / f"{a.name}.md").write_text(markdown(result))
    plot(result, a.out / f"{a.name}.png")
    if a.plot:
        plot(result, a.plot)
    log(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""One worker at GPU rates (issue 14, part 3): does the serving stack keep a fast accelerator busy?

The accelerator is the simulated backend (a timing profile: it waits, it burns no CPU), so
everything that costs CPU here is the serving stack's own work. Two measurements, side by
side in one run:

* engine alone: the worker's compute loop in-process (Scheduler, DecodeQueue, Runner,
  the simulated engine; no HTTP, Redis or PNG), saturated: what the accelerator could deliver;
* the whole service: Debian's redis-server, `python -m service api` and `python -m service
  worker` (the simulated engine), and `--clients` closed-loop HTTP clients posting /generate
  with distinct seeds (no cache hits) and reading every PNG.

Reported: images/s of both and their ratio (target >= 0.9), and the CPU seconds per image of
every process (API, worker, Redis, the clients) from /proc, Redis's own CPU and network bytes
per image (INFO), PNG bytes. `--cprofile DIR` runs the API and the worker under cProfile
(main threads: the event loop and the compute loop) and writes their top functions.

    python bench/one_worker.py --quick
    python bench/one_worker.py --profile b1-256-h100-flops40 --steps 25 --duration 60 --json bench/out/one_worker.json
    python bench/one_worker.py --plot-runs a.json b.json --plot docs/img/one_worker.png   # runs side by side
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pstats
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import in_thread, log, machine  # noqa: E402
from engines.simulated import SimulatedEngine  # noqa: E402
from engines.timing_profile import load_profile  # noqa: E402
from model.bundle import load_bundle  # noqa: E402
from service.settings import DEMO_MODEL_DIR  # noqa: E402
from service.store.jobs import Job  # noqa: E402
from service.worker.runner import Runner  # noqa: E402
from service.worker.scheduler import DecodeQueue, Scheduler  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """`pid` and every live descendant (a worker's encoder processes count as the worker's CPU)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:  # the thread or the process ended meanwhile
                pass
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU so far of a process (all its threads) and of its live descendants, plus
    what its ended children used (cutime/cstime, counted once the parent has waited for them)."""
    total = 0.0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15]) / TICK
    return total


def rate_between(stamps: list[float], t0: float, t1: float) -> float:
    inside = [s for s in stamps if t0 <= s <= t1]
    return len(inside) / (t1 - t0) if t1 > t0 else float("nan")


# -- the engine alone ---------------------------------------------------------------------------
def engine_alone(bundle, profile, preset, max_rows: int, clients: int, seconds: float, warmup_s: float,
                 decode_delay_ms: float) -> dict:
    """The worker's compute loop with `clients` requests always outstanding, for `seconds`."""
    engine = SimulatedEngine(bundle, profile, max_rows)
    runner = Runner(engine, bundle.stats, bundle.null_class)
    sched = Scheduler(max_rows, bundle.spec.latent_shape, "step", device=engine.device)
    decodes = DecodeQueue(decode_delay_ms / 1000, max_rows)
    waiting: deque[Job] = deque()
    issued, stamps, forwards, pending = 0, [], 0, []
    start = time.perf_counter()
    cpu0 = time.thread_time()
    with torch.inference_mode():
        while time.perf_counter() - start < seconds:
            while len(waiting) + len(sched.active) + len(decodes) < clients:
                issued += 1
                waiting.append(Job(class_id=issued % bundle.spec.num_classes, seed=issued, preset=preset,
                                   key=str(issued), deadline=time.time() + 1e6))
            sched.admit_waiting(waiting)
            plan = sched.schedule()
            if plan is not None:
                x_next, secs = runner.step(plan)
                forwards += 1
                decodes.add(sched.commit(plan, x_next, secs))
            batch = decodes.due(time.time(), sched.active_rows(), max_rows)
            if batch:  # as the worker does: enqueue the decode, collect the images later (a pool thread there)
                if pending:
                    pending[0].wait()
                    stamps += [time.perf_counter()] * len(pending[0].finite)
                pending[:] = [runner.decode_async([s.x for s in batch])]
    end = time.perf_counter()
    return {"images_per_s": rate_between(stamps, start + warmup_s, end), "forwards": forwards,
            "host_cpu_s_per_forward": (time.thread_time() - cpu0) / max(1, forwards),
            "device_busy": engine.device_queue.busy_s / (end - start)}


# -- the whole service --------------------------------------------------------------------------
class Clients:
    """`n` threads, each a keep-alive HTTP connection posting /generate in a closed loop."""

    def __init__(self, url: str, n: int, body: dict, num_classes: int):
        self.u = urlparse(url)
        self.n, self.body, self.num_classes = n, body, num_classes
        self.stamps: list[float] = []
        self.png_bytes: list[int] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counter = iter(range(10**12))
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(n)]

    def run(self) -> None:
        conn = http.client.HTTPConnection(self.u.hostname, self.u.port, timeout=300)
        base = int(time.time()) % 100_000 * 1_000_000
        while not self.stop.is_set():
            with self.lock:
                i = next(self.counter)
            body = json.dumps({**self.body, "class_label": i % self.num_classes, "seed": base + i})
            try:
                conn.request("POST", "/generate", body, {"content-type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as err:
                with self.lock:
                    self.errors.append(repr(err))
                conn.close()
                conn = http.client.HTTPConnection(self.u.hostname, self.u.port, timeout=300)
                continue
            with self.lock:
                if resp.status == 200 and data[:8] == b"\x89PNG\r\n\x1a\n":
                    self.stamps.append(time.perf_counter())
                    self.png_bytes.append(len(data))
                else:
                    self.errors.append(f"{resp.status} {data[:120]!r}")
        conn.close()

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def redis_info(r) -> dict:
    """Redis's CPU, network bytes, commands and memory so far, and `acks`: jobs acknowledged (one per image)."""
    info = r.info()
    acks = r.info("commandstats").get("cmdstat_xack", {}).get("calls", 0)
    return {"cpu": float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
            "net_in": int(info["total_net_input_bytes"]), "net_out": int(info["total_net_output_bytes"]),
            "commands": int(info["total_commands_processed"]), "used_memory": int(info["used_memory"]),
            "acks": int(acks)}


def service_run(a, profile_ref: str, body: dict, num_classes: int, prof_dir: Path | None) -> dict:
    from service.launcher import start_service
    from tests.service_harness import start_redis

    server = start_redis("debian")
    env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(a.model_dir), "LDIT_BACKEND": "simulated",
           "LDIT_SIMULATED_PROFILE": profile_ref, "LDIT_MAX_BATCH_SIZE": str(a.max_batch_size),
           "LDIT_MAX_QUEUE_LENGTH": str(4 * a.clients), "LDIT_REQUEST_TIMEOUT_S": "300",
           "LDIT_RESULT_TTL_S": "60",
           "LDIT_MAX_DECODE_DELAY_MS": str(a.decode_delay_ms),
           "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in service_knobs(a).items()}}
    procs = {}
    try:
        for role in ("api", "worker"):
            python_args = () if prof_dir is None else ("-m", "cProfile", "-o", str(prof_dir / f"{role}.prof"))
            procs[role] = start_service(role, env, python_args=python_args)
        pids = {"api": procs["api"].proc.pid, "worker": procs["worker"].proc.pid, "redis": server.proc.pid}
        r = server.client()
        clients = Clients(procs["api"].url, a.clients, body, num_classes)
        clients.start()
        time.sleep(a.warmup)
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        me0 = time.process_time()
        red0 = redis_info(r)
        t0 = time.perf_counter()
        time.sleep(a.duration)
        t1 = time.perf_counter()
        cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
        me1 = time.process_time()
        red1 = redis_info(r)
        clients.join()
        complaints = [line.strip()[:300] for sp in procs.values() for line in sp.lines
                      if '"level": "warning"' in line or '"level": "error"' in line]
        images = len([s for s in clients.stamps if t0 <= s <= t1])
        per = max(1, images)
        cpu = {k: (cpu1[k] - cpu0[k]) / per * 1000 for k in pids}
        cpu["clients"] = (me1 - me0) / per * 1000
        return {"images_per_s": images / (t1 - t0), "images": images, "errors": len(clients.errors),
                "error_examples": clients.errors[:3], "service_warnings": complaints[:10],
                "cpu_ms_per_image": cpu, "cpu_cores": {k: v * images / (t1 - t0) / 1000 for k, v in cpu.items()},
                "redis": {"cpu_ms_per_image": (red1["cpu"] - red0["cpu"]) / per * 1000,
                          "net_in_bytes_per_image": (red1["net_in"] - red0["net_in"]) / per,
                          "net_out_bytes_per_image": (red1["net_out"] - red0["net_out"]) / per,
                          "commands_per_image": (red1["commands"] - red0["commands"]) / per,
                          "used_memory_mib": red1["used_memory"] / 2**20},
                "png_bytes_mean": sum(clients.png_bytes) / max(1, len(clients.png_bytes))}
    finally:
        for sp in procs.values():
            sp.stop()
        server.stop()


def service_knobs(a) -> dict:
    """The image-path settings of this run: the service's defaults unless an option overrides them."""
    from service.settings import Settings

    knobs = {"png_threads": a.png_threads, "png_compress_level": a.png_level, "png_encoder": a.png_encoder,
             "png_filter": a.png_filter, "encode_processes": a.encode_processes}
    defaults = Settings()
    return {"LDIT_" + k.upper(): (v if v is not None else getattr(defaults, k, None)) for k, v in knobs.items()
            if v is not None or hasattr(defaults, k)}


def top_functions(path: Path, n: int = 25) -> list[str]:
    if not path.is_file():
        return [f"(no profile at {path})"]
    st = pstats.Stats(str(path))
    total = st.total_tt
    rows = sorted(st.stats.items(), key=lambda kv: kv[1][3], reverse=True)[:n]  # by cumulative time
    out = [f"total {total:.2f} s in the main thread"]
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in rows:
        out.append(f"{ct:8.2f} s cum {tt:8.2f} s self {nc:8d} calls  {Path(file).name}:{line}({fn})")
    return out


def plot_runs(paths: list[Path], out: Path) -> None:
    """Saved runs side by side: images/s of the engine alone and the service; CPU ms per image by process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in paths]
    names = [p.stem for p in paths]
    x = range(len(runs))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.bar([i - 0.2 for i in x], [r["engine_alone"]["images_per_s"] for r in runs], 0.4, label="engine alone")
    ax1.bar([i + 0.2 for i in x], [r["service"]["images_per_s"] for r in runs], 0.4, label="whole service")
    for i, r in enumerate(runs):
        ax1.annotate(f"{r['ratio']:.2f}", (i + 0.2, r["service"]["images_per_s"]), ha="center", va="bottom")
    ax1.set(ylabel="images/s", title="one worker: service / engine alone")
    bottom = [0.0] * len(runs)
    for key in ("api", "worker", "redis", "clients"):
        vals = [r["service"]["cpu_ms_per_image"][key] for r in runs]
        ax2.bar(list(x), vals, 0.6, bottom=bottom, label=key)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax2.set(ylabel="CPU ms per image", title="where the CPU goes")
    for ax in (ax1, ax2):
        ax.set_xticks(list(x), names, rotation=15, fontsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short run (15 s windows)")
    p.add_argument("--profile", default="b1-256-h100-flops40", help="timing profile (name or file)")
    p.add_argument("--images", default="", help="override the profile's images (bundle | photos | a path)")
    p.add_argument("--model-dir", type=Path, default=DEMO_MODEL_DIR)
    p.add_argument("--preset", default="800ep")
    p.add_argument("--steps", type=int, default=25, help="grid points of every request")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--clients", type=int, default=128)
    p.add_argument("--duration", type=float, default=60.0, help="measured seconds (service and engine alone)")
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--png-threads", type=int, default=2)
    p.add_argument("--png-level", type=int, default=None, help="LDIT_PNG_COMPRESS_LEVEL (default: the service's)")
    p.add_argument("--png-encoder", default=None, help="LDIT_PNG_ENCODER (default: the service's)")
    p.add_argument("--png-filter", default=None, help="LDIT_PNG_FILTER (default: the service's)")
    p.add_argument("--encode-processes", type=int, default=None, help="LDIT_ENCODE_PROCESSES (default: the service's)")
    p.add_argument("--decode-delay-ms", type=float, default=20.0)
    p.add_argument("--cprofile", type=Path, default=None, help="profile the API and worker main threads into DIR")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot-runs", type=Path, nargs="+", default=None, help="only plot these saved --json runs")
    p.add_argument("--plot", type=Path, default=None, help="where --plot-runs saves its figure")
    a = p.parse_args(argv)
    if a.plot_runs:
        plot_runs(a.plot_runs, a.plot or Path("bench/out/one_worker.png"))
        return 0
    if a.quick:
        a.duration, a.warmup = 15.0, 5.0
    profile = load_profile(a.profile)
    profile_ref = str(profile.path)
    if a.images:
        raw = dict(profile.raw, images=a.images, name=f"{profile.name}+{Path(a.images).stem}")
        tmp = Path(tempfile.mkdtemp(prefix="ldit-profile-")) / "profile.json"
        tmp.write_text(json.dumps(raw))
        profile, profile_ref = load_profile(tmp), str(tmp)
    bundle = load_bundle(a.model_dir)
    preset = bundle.spec.presets[a.preset].replace(num_steps=a.steps)
    body = {"preset": a.preset, "steps": a.steps}
    log(f"[one_worker] profile {profile.name}, preset {a.preset} at {a.steps} points, max_batch_size "
        f"{a.max_batch_size}, {a.clients} clients, {a.duration:g} s windows")
    torch.set_num_threads(1)
    alone = in_thread(engine_alone, bundle, profile, preset, a.max_batch_size, a.clients, a.duration + a.warmup,
                      a.warmup, a.decode_delay_ms)
    log(f"[one_worker] engine alone: {alone['images_per_s']:.1f} images/s, host CPU "
        f"{1000 * alone['host_cpu_s_per_forward']:.2f} ms per forward, device busy {alone['device_busy']:.0%}")
    if a.cprofile:
        a.cprofile.mkdir(parents=True, exist_ok=True)
    svc = service_run(a, profile_ref, body, bundle.spec.num_classes, a.cprofile)
    ratio = svc["images_per_s"] / alone["images_per_s"]
    log(f"[one_worker] service: {svc['images_per_s']:.1f} images/s = {ratio:.2f} of the engine alone "
        f"({svc['errors']} errors); CPU ms per image " + json.dumps({k: round(v, 2) for k, v in
                                                                     svc["cpu_ms_per_image"].items()}))
    log("[one_worker] redis per image: " + json.dumps({k: round(v, 2) for k, v in svc["redis"].items()})
        + f"; PNG {svc['png_bytes_mean'] / 1000:.1f} kB")
    result = {"machine": machine(), "argv": sys.argv[1:], "profile": profile.name, "preset": preset.to_dict(),
              "max_batch_size": a.max_batch_size, "clients": a.clients, "service_knobs": service_knobs(a),
              "engine_alone": alone, "service": svc, "ratio": ratio}
    if a.cprofile:
        result["cprofile"] = {role: top_functions(a.cprofile / f"{role}.prof") for role in ("api", "worker")}
        for role, lines in result["cprofile"].items():
            log(f"[one_worker] cProfile {role}:\n  " + "\n  ".join(lines))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

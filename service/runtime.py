"""Process wiring: embedded Redis, engine loading, and the three ways to run.

* `run_all`: embedded Redis (unless `redis_url` is set), the API and one worker
  in one process. The same code paths as production; only addresses differ.
* `run_api` / `run_worker`: the separate processes of compose and Kubernetes.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

import uvicorn

from service import metrics
from service.http.server import server_config
from service.logs import STARTUP
from service.settings import REPO_ROOT, Settings
from service.store.connections import sync_client
from service.store.embedded_redis import EmbeddedRedis

log = logging.getLogger("ldit")
startup = logging.getLogger(STARTUP)


def load_model(settings: Settings):
    """(runner, bundle spec, version, engine info) for the bundle in settings.model_dir.

    For ONNX Runtime and TensorRT, the artifacts are (re)built first when missing or stale.
    """
    from engines import load_engine
    from model.bundle import load_bundle
    from service.worker.runner import Runner

    startup.info("loading the model from %s (backend %s, device %s, precision %s)", settings.model_dir,
                 settings.backend, settings.device, settings.precision)
    if settings.backend in ("onnxruntime", "tensorrt"):
        # Export (and for TensorRT, build) the engines when missing or stale; a no-op otherwise.
        build_args = settings.engine_build().cli_args()
        rc = subprocess.run([sys.executable, str(REPO_ROOT / "build_engine.py"), *build_args, "--if-stale"]).returncode
        ok = {0, 3} if settings.backend == "onnxruntime" else {0}  # 3: ONNX only, TensorRT skipped
        if rc not in ok:
            raise SystemExit(f"build_engine.py failed (exit {rc}) for backend {settings.backend}")
    bundle = load_bundle(settings.model_dir)
    engine = load_engine(
        bundle, backend=settings.backend, device=settings.device, precision=settings.precision,
        engine_dir=settings.engine_dir if settings.backend != "torch" else None,
        max_rows=settings.max_batch_size, compile=settings.compile, cuda_graphs=settings.cuda_graphs,
        decode=settings.decode_precision, simulated_profile=settings.simulated_profile,
    )
    # Before anything reports ready: CUDA graphs captured, compiled code built, for every bucket.
    engine.warmup()
    info = engine_report(engine)
    metrics.ENGINE.info({k: str(v) for k, v in info.items()})
    if info["backend"] == "simulated":
        log.warning("SIMULATED BACKEND: no model runs here; forwards and decodes only take the time of timing "
                    "profile %s, and every image is a crop of a stock picture. For measuring the serving stack, "
                    "never for real images.", info["simulated_profile"], extra={"detail": engine.info.detail})
    return Runner(engine, bundle.stats, bundle.null_class), bundle.spec, bundle.spec.version(), info


def engine_report(engine) -> dict:
    """How a worker describes its engine (heartbeat, metrics): what really runs, simulated or not."""
    info = {"backend": engine.info.backend, "device": engine.info.device, "precision": engine.info.precision,
            "decode_precision": engine.info.decode_precision}
    if engine.info.backend == "simulated":
        info.update(simulated_profile=engine.profile.name, image_size=engine.image_size)
    return info


def build_worker(settings: Settings, redis_url: str):
    """Load the bundle and the engine, and return a ready Worker."""
    from service.worker.loop import Worker

    return Worker(settings, sync_client(settings, redis_url), lambda: load_model(settings))


def serve_api(settings: Settings, redis_url: str, started: threading.Event | None = None,
              what: str = "the API") -> None:
    from service.http.app import create_app
    from service.model_watch import ModelWatcher

    app = create_app(settings, ModelWatcher(settings.model_dir, settings.model_watch_interval_s), redis_url)
    server = _Server(server_config(settings, app))
    if started is not None:
        threading.Thread(target=_announce, args=(server, started, what), daemon=True).start()
    server.run()


class _Server(uvicorn.Server):
    """uvicorn re-raises a captured SIGTERM after shutting down, which would kill the
    process before the worker drains and the embedded Redis stops; swallow it instead."""

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def _announce(server: uvicorn.Server, started: threading.Event, what: str) -> None:
    while not server.started:
        if server.should_exit:
            return
        threading.Event().wait(0.05)
    for s in server.servers:
        for sock in s.sockets:
            host, port = sock.getsockname()[:2]
            # One line on stdout so scripts (and tests) learn the address when LDIT_PORT=0.
            print(f"LDIT_LISTENING http://{host}:{port}", flush=True)
            startup.info("ready on http://%s:%s: %s (try GET /readyz, POST /generate)",
                         f"[{host}]" if ":" in host else host, port, what)
    started.set()


def run_all(settings: Settings) -> None:
    embedded = None
    url = settings.redis_url
    if not url:
        embedded = EmbeddedRedis()
        url = embedded.url
    worker = build_worker(settings, url)
    thread = threading.Thread(target=worker.run, name="worker", daemon=True)
    thread.start()
    try:
        # Listen once the worker beats: /generate answers 503 while no worker is alive.
        while not worker.ready.wait(0.1):
            if not thread.is_alive():
                raise SystemExit("the worker stopped before it was ready")
        threading.Thread(target=_stop_when_the_device_fails, args=(worker, thread), name="device-watch",
                         daemon=True).start()
        serve_api(settings, url, threading.Event(), "the API and one worker")  # uvicorn handles SIGINT/SIGTERM
        if worker.fatal is not None:  # the process must exit non-zero, so that it is restarted
            raise SystemExit(f"the worker stopped on a device failure: {worker.fatal}")
    finally:
        worker.stop()
        thread.join(timeout=60)
        if embedded:
            embedded.close()


def _stop_when_the_device_fails(worker, thread: threading.Thread) -> None:
    """All-in-one: a worker stopped by a sticky device error stops the API too (SIGTERM: uvicorn's own
    graceful shutdown), so the whole process exits non-zero instead of serving 503s with a dead GPU."""
    thread.join()
    if worker.fatal is not None:
        os.kill(os.getpid(), signal.SIGTERM)


def run_api(settings: Settings) -> None:
    if not settings.redis_url:
        raise SystemExit("LDIT_REDIS_URL must be set to run the API alone (or run `python -m service`)")
    serve_api(settings, settings.redis_url, threading.Event())


def run_worker(settings: Settings) -> None:
    if not settings.redis_url:
        raise SystemExit("LDIT_REDIS_URL must be set to run a worker alone (or run `python -m service`)")
    worker = build_worker(settings, settings.redis_url)
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr="0.0.0.0")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    # Announced after the first heartbeat, when the API would route work to it.
    def announce() -> None:
        worker.ready.wait()
        print(f"LDIT_WORKER_READY {worker.name}", flush=True)
        where = f"; metrics on http://0.0.0.0:{settings.metrics_port}/metrics" if settings.metrics_port else ""
        startup.info("ready: worker %s takes jobs from the queue%s", worker.name, where)

    threading.Thread(target=announce, name="announce", daemon=True).start()
    worker.run()

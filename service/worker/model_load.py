"""The worker's models: timing the engine before the first heartbeat, and loading a newly published
checkpoint in a background thread while the old one serves (the loop switches between batches)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from engines.device import use_device_in_this_thread
from model.sampling import SamplerPreset
from service import metrics
from service.store.jobs import Job
from service.worker.runner import Runner
from service.worker.scheduler import Scheduler

log = logging.getLogger("ldit.worker")


def calibrate(scheduler: Scheduler, runner: Runner, max_rows: int) -> dict[int, float]:
    """Seconds of one step at 1 row and at `max_rows`: the median of three after a warm-up run."""
    one_step = SamplerPreset(num_steps=2)
    seconds = {}
    for rows in sorted({1, max_rows}):
        times = []
        for _ in range(4):  # the first run pays lazy initialisation; the median of the others counts
            for i in range(rows):
                scheduler.admit(Job(class_id=0, seed=i, preset=one_step, key="calibration", deadline=float("inf")))
            plan = scheduler.schedule()
            start = time.perf_counter()
            runner.step(plan)
            runner.drain()  # the runner runs ahead of the device: time the step to its end
            times.append(time.perf_counter() - start)
            scheduler.drop(lambda s: s.job.key == "calibration")
        seconds[rows] = sorted(times[1:])[1]
    return seconds


def load_in_background(load_model: Callable[[], tuple], device, on_done: Callable[[tuple | None], None],
                       serving: str) -> threading.Thread:
    """`load_model()` in a thread; `on_done(model)` with its result, or `on_done(None)` when it failed
    (the old model, version `serving`, keeps serving)."""

    def load():
        use_device_in_this_thread(device)  # the new engine's first CUDA calls happen in this thread
        model = None
        try:
            model = load_model()
        except Exception:  # noqa: BLE001 - keep serving the old model
            log.exception("loading the new checkpoint failed; keeping version %s", serving)
            metrics.MODEL_SWAPS.labels("failed").inc()
        finally:
            on_done(model)

    thread = threading.Thread(target=load, name="model-loader", daemon=True)
    thread.start()
    return thread

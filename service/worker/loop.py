"""The worker's loop: Redis Stream in, PNGs out, one scheduler step at a time.

Each tick: reclaim and read jobs (service/worker/intake.py) -> drop expired ones and the samples of
stopped sets -> switch to a newly published model between batches -> admit waiting jobs into free
rows -> one forward for all active samples (`_step`, the plan from service/worker/scheduler.py run
by service/worker/runner.py) -> enqueue the decode of the finished ones in a batch (they may wait up
to `max_decode_delay_ms` for companions while others are denoising). The loop only plans, steps and
hands off: the store threads (service/worker/results.py) wait for the pixels to reach the host,
encode the PNGs and store each result with one script call that also acknowledges the job and wakes
the waiting API process, so the accelerator never waits on the host, on deflate or on Redis.

Two streams: interactive requests, and the jobs of sample sets (POST /batches), which a worker
reads only when the interactive stream has nothing for it and runs only while no interactive sample
is active. A job is acknowledged only after its result is stored; a crashed worker's jobs go to
another worker's XAUTOCLAIM. The heartbeat (service/worker/heartbeat.py) beats only while this loop
ticks, and carries the measured tick time against rows per forward (service/store/capacity.py), from
which the API's admission estimates how long the work ahead will take. The loop survives a Redis
restart and a deleted stream or consumer group (it creates them again).

A sticky device error (an illegal memory access, an uncorrectable ECC error...: the CUDA context is
lost, and every later call fails the same way) ends the worker instead: the heartbeat is withdrawn at
once, nothing more runs on the device, jobs not yet started go back to the queue and the ones in
flight stay pending for another worker's reclaim, and `run()` raises `DeviceFailed` (a SystemExit:
the process exits non-zero and its orchestrator restarts it on a fresh context).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import redis

from engines.device import is_sticky_device_error, use_device_in_this_thread
from service import metrics
from service.model_watch import ModelWatcher
from service.settings import Settings
from service.store.capacity import TickModel
from service.store.jobs import GROUP, Keys
from service.store.progress import PROGRESS_INTERVAL_S  # at most 4 progress messages a second per worker
from service.worker.heartbeat import Heartbeat
from service.worker.intake import Intake
from service.worker.model_load import calibrate, load_in_background
from service.worker.results import Results
from service.worker.scheduler import DecodeQueue, Sample, Scheduler

log = logging.getLogger("ldit.worker")



class DeviceFailed(SystemExit):
    """The worker stopped on a sticky device error; raised by `Worker.run()`, so the process exits non-zero."""


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def ensure_group(r: redis.Redis, keys: Keys) -> None:
    for stream in (keys.stream, keys.batch_stream):
        try:
            r.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise


class Worker:
    def __init__(self, settings: Settings, r: redis.Redis, load_model):
        """`load_model()` returns (runner, bundle spec, version, engine info); called again on hot swap."""
        self.s = settings
        self.r = r
        self.keys = Keys(settings.key_prefix)
        self.load_model = load_model
        metrics.init_role("worker", settings.request_timeout_s)
        self.runner, spec, self.version, self.engine_info = load_model()
        self._computed_rows = self.runner.engine.computed_rows  # rows a forward really costs (padding metric)
        self.name = settings.worker_name or default_worker_name()
        self.scheduler = Scheduler(settings.max_batch_size, spec.latent_shape, settings.batching,
                                   device=self.runner.engine.device)
        self.decodes = DecodeQueue(settings.max_decode_delay_ms / 1000, settings.max_batch_size)
        self.watcher = ModelWatcher(settings.model_dir, settings.model_watch_interval_s)
        self._swap: tuple | None = None  # a newly loaded model waiting for the active samples to finish
        self._loading: threading.Thread | None = None
        self.fatal: BaseException | None = None  # the sticky device error that stopped this worker
        self.results = Results(settings, r, self.keys, self.name, device=self.runner.engine.device,
                               on_device_error=self.device_failed)
        self.intake = Intake(settings, r, self.keys, self.name, self.scheduler, self.decodes, self.results)
        self.beats = Heartbeat(self)
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._busy_s = 0.0  # device time since the last take_busy_s() (the heartbeat's busy ratio)
        self._last_reclaim = 0.0
        self._last_progress = 0.0
        self.held: list[tuple[str, str]] = []  # (stream, id) of waiting + active jobs, refreshed every tick
        self.last_tick = time.monotonic()  # the loop's pulse, read by the heartbeat thread
        self.ticks = TickModel(settings.max_batch_size)
        self.ready = threading.Event()  # set after the first heartbeat

    def _ensure_group(self) -> bool:
        try:
            ensure_group(self.r, self.keys)
            return True
        except redis.RedisError as err:  # unreachable, or the key holds something else: retried later
            log.warning("cannot create the consumer group (%r)", err)
            return False

    def run(self) -> None:
        use_device_in_this_thread(self.runner.engine.device)
        backoff = 0.1
        while not self._ensure_group() and not self.stop_event.wait(backoff):  # Redis may still be starting
            backoff = min(2 * backoff, 2.0)
        self._calibrate()
        self.last_tick = time.monotonic()
        beat = threading.Thread(target=self.beats.run, name="heartbeat", daemon=True)
        beat.start()
        log.info("worker started", extra={"worker": self.name, "batching": self.s.batching})
        try:
            backoff = 0.1
            while not self.stop_event.is_set():
                self.last_tick = time.monotonic()
                try:
                    self.tick()
                    backoff = 0.1
                    continue
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as err:
                    # Redis restarting: keep the samples in memory and retry; held jobs are
                    # still pending in the (persisted) stream if this worker dies meanwhile.
                    log.warning("redis unavailable (%r); retrying in %.1f s", err, backoff)
                    metrics.REDIS_ERRORS.labels("worker").inc()
                except redis.ResponseError as err:
                    if "NOGROUP" not in str(err) and "no longer exists" not in str(err):
                        log.exception("redis refused a command")
                    else:  # someone deleted the stream or the group: make them again, go on
                        log.warning("job stream or consumer group lost (%s); recreating it", err)
                        self.intake.forget_cursors()
                except Exception as err:  # noqa: BLE001 - the loop must outlive any one tick, not a lost device
                    if is_sticky_device_error(err):
                        self.device_failed(err)
                        break
                    log.exception("worker tick failed")
                self.stop_event.wait(backoff)
                backoff = min(2 * backoff, 2.0)
                self._ensure_group()
            if self.fatal is None:
                self._drain()
            else:
                beat.join(self.s.heartbeat_interval_s + 5)  # it sees `fatal` and withdraws: no beat after the hdel below
                self._abandon()
        finally:
            self.results.shutdown(wait=self.fatal is None)
            try:
                self.r.hdel(self.keys.workers, self.name)
            except redis.RedisError:  # readers prune it once stale
                pass
            log.info("worker stopped", extra={"worker": self.name})
        if self.fatal is not None:
            raise DeviceFailed(f"worker {self.name}: the device failed ({self.fatal}); exiting so that it is restarted "
                               f"on a fresh CUDA context, its jobs left for another worker")

    def device_failed(self, err: BaseException) -> None:
        """A sticky device error (any thread): stop at once, without draining on the lost device."""
        if self.fatal is None:
            self.fatal = err
            log.critical("the device failed with a sticky error; stopping this worker: %s", err,
                         extra={"worker": self.name})
        self.stop_event.set()

    def _abandon(self) -> None:
        """After a device failure: jobs not yet started go back to the queue; active and decoding ones stay
        pending, unacknowledged, for another worker's reclaim (they are never failed: the job is fine)."""
        try:
            self.intake.release_all()
        except Exception:  # noqa: BLE001 - they are reclaimed after the visibility timeout anyway
            log.warning("releasing the waiting jobs failed; they will be reclaimed", exc_info=True)
        self.scheduler.active.clear()
        self.decodes.waiting.clear()

    def stop(self) -> None:
        """Stop taking jobs; the loop finishes the active samples and releases the rest."""
        self.stop_event.set()

    def heartbeat(self) -> None:
        self.beats.beat()

    def take_busy_s(self) -> float:
        """Seconds the device was busy since the last call."""
        with self._lock:
            busy, self._busy_s = self._busy_s, 0.0
        return busy

    def tick(self) -> None:
        # when idle the read below may block: such a tick is not timed
        busy = bool(self.scheduler.active or self.intake.pending() or self.decodes)
        start = time.perf_counter()
        now = time.time()
        if now - self._last_reclaim > self.s.visibility_timeout_ms / 2000:
            self.intake.reclaim()
            self.intake.reconcile()
            self._last_reclaim = now
        self.intake.read_jobs()
        self.intake.drop_stopped_sets()
        self.intake.expire(time.time())
        self._hot_swap()
        if self._swap is None:  # while a new model waits, the old one only finishes its samples
            was_active = bool(self.scheduler.active)
            admitted = self.scheduler.admit_waiting(self.intake.waiting, 0)
            admitted += self.scheduler.admit_waiting(self.intake.waiting_batch, 1)
            self._on_admit(admitted, was_active)
        rows = self._step()
        if busy and rows:
            self.ticks.observe(rows, time.perf_counter() - start)
        self._publish_progress()

    def _publish_progress(self) -> None:
        """Step k of N of every active sample: one message for all of them, at most every 0.25 s.

        The API processes relay it to their Server-Sent Events clients (service/store/progress.py)."""
        now = time.monotonic()
        if not self.scheduler.active or now - self._last_progress < PROGRESS_INTERVAL_S:
            return
        self._last_progress = now
        progress = {s.job.id: [s.step, len(s.grid) - 1] for s in self.scheduler.active if not s.job.batch}
        if not progress:
            return
        self.r.publish(self.keys.events, json.dumps({"progress": progress}))

    def _calibrate(self) -> None:
        """Time a forward of one row and of a full batch, so the first heartbeat already carries a rate."""
        self.ticks.calibrate(calibrate(self.scheduler, self.runner, self.s.max_batch_size))

    def _hot_swap(self) -> None:
        """Load a newly published checkpoint in the background; switch between batches."""
        loading = self._loading is not None and self._loading.is_alive()
        if not loading and self._swap is None and self.watcher.poll() is not None:
            self._loading = load_in_background(self.load_model, self.runner.engine.device, self._loaded, self.version)
        if self._swap is not None and not self.scheduler.active and not self.decodes:
            runner, spec, version, info = self._swap
            old, old_runner, self._swap = self.version, self.runner, None
            self.runner, self.version, self.engine_info = runner, version, info
            self._computed_rows = runner.engine.computed_rows
            self.scheduler.latent_shape = spec.latent_shape
            self.scheduler.device = runner.engine.device
            log.warning("switched model", extra={"from": old, "to": version})
            metrics.MODEL_SWAPS.labels("switched").inc()
            self.heartbeat()
            try:  # free the old model's device memory now, not when the garbage collector gets to it
                old_runner.engine.close()
            except Exception as err:  # noqa: BLE001 - the new model serves either way
                if is_sticky_device_error(err):
                    self.device_failed(err)
                else:
                    log.warning("closing the old engine failed", exc_info=True)

    def _loaded(self, model: tuple | None) -> None:
        """From the loader thread: the new model (switched to between batches), or None when loading failed."""
        self._swap = model
        self._loading = None

    def _drain(self) -> None:
        """On stop: release jobs not yet started, finish the ones in flight."""
        self.intake.release_all()
        while self.scheduler.active or self.decodes:
            self.last_tick = time.monotonic()
            self.intake.expire(time.time())
            self._step()

    def _on_admit(self, samples: list[Sample], mid_flight: bool) -> None:
        """Metrics and the `running` status of newly admitted samples: one Redis round trip."""
        if not samples:
            return
        pipe = self.r.pipeline(transaction=False)
        for sample in samples:
            job = sample.job
            if job.batch:  # a sample-set image has no job hash: its set counts it when done
                continue
            metrics.QUEUE_DURATION.observe(max(0.0, sample.admitted_at - job.enqueued_at))
            pipe.hset(self.keys.job(job.id), mapping={"status": "running", "worker": self.name})
        if mid_flight:
            metrics.ADMITTED_MID_FLIGHT.inc(len(samples))
        pipe.execute()

    # -- compute ------------------------------------------------------------------------
    def _step(self) -> int:
        """One forward for the planned samples, and any decode due; returns the forward's rows (0: none ran)."""
        self.held = [(j.stream, j.stream_id)
                     for j in (*self.intake.jobs(), *(s.job for s in (*self.scheduler.active, *self.decodes.waiting)))]
        plan = self.scheduler.schedule()
        metrics.ACTIVE_SLOTS.set(len(self.scheduler.active))
        if plan is None:
            self._decode_due()
            return 0
        try:
            x_next, seconds = self.runner.step(plan)
        except Exception as err:  # noqa: BLE001 - leave the jobs pending; XAUTOCLAIM retries them
            if is_sticky_device_error(err):
                self.device_failed(err)
                return 0
            log.exception("forward failed; %d jobs left for redelivery", len(plan.samples))
            ids = {id(s) for s in plan.samples}
            self.scheduler.drop(lambda s: id(s) in ids)
            return 0
        with self._lock:
            self._busy_s += seconds
        metrics.EXEC_COUNT.inc()
        metrics.ROWS_PER_FORWARD.observe(plan.rows)
        metrics.PADDING_ROWS.inc(self._computed_rows(plan.rows) - plan.rows)
        metrics.BATCH_SIZE.observe(len(plan.samples))
        self.decodes.add(self.scheduler.commit(plan, x_next, seconds))
        self._decode_due()
        return plan.rows

    def _decode_due(self) -> None:
        batch = self.decodes.due(time.time(), self.scheduler.active_rows(), self.scheduler.max_rows)
        if batch:
            self._finish(batch)

    def _finish(self, samples: list[Sample]) -> None:
        """Enqueue the decode of finished samples and hand them to the store pool: the loop never waits
        for the images to reach the host, nor for encoding or Redis."""
        try:
            decoded = self.runner.decode_async([s.x for s in samples])
        except Exception as err:  # noqa: BLE001
            if is_sticky_device_error(err):
                self.device_failed(err)
                return
            log.exception("decode failed; %d jobs left for redelivery", len(samples))
            return
        with self._lock:
            self._busy_s += decoded.enqueue_s
        metrics.DECODE_BATCH.observe(len(samples))
        self.results.submit(samples, decoded, self.version)


"""The worker: Redis Stream in, PNGs out, one scheduler step at a time.

Loop: reclaim jobs of silent workers -> read new jobs -> drop expired ones ->
admit into free rows -> one forward for all active samples -> enqueue the
decode of the finished ones in a batch (they may wait up to `max_decode_delay_ms`
for companions while others are denoising: service.worker.scheduler.DecodeQueue). The
loop only plans, steps and hands off: a thread pool waits for the decoded uint8
pixels to reach the host, encodes the PNGs (service/png.py: about 1 ms an
image; ISA-L compresses without the GIL) and stores each result with one script call
that also acknowledges the job and sends the PNG to the waiting API process, so
the accelerator never waits on the host, on deflate or on Redis.

Two streams: interactive requests, and the jobs of sample sets (POST /batches),
which a worker reads only when the interactive stream has nothing for it and
runs only while no interactive sample is active (service/worker/scheduler.py). A
sample-set image goes to its set's file and is counted in one Lua call
(service/batches/sets.py) instead of the result cache.

A job is acknowledged (and deleted from the stream) only after its result is
stored, in one MULTI/EXEC. Jobs this worker holds are re-claimed to itself
every heartbeat so their idle time stays below the visibility timeout; a
crashed worker stops doing that and its jobs go to the next XAUTOCLAIM, whose
cursor every worker keeps and advances, so a long pending list is scanned whole.

The heartbeat is written only while the loop ticks: a loop stuck for longer than
`heartbeat_ttl_s` withdraws it (readiness fails, and held jobs are no longer kept
from the other workers). The loop survives a deleted stream or consumer group by
creating it again. Each heartbeat carries the measured tick time against rows per
forward (service/store/capacity.py), from which the API's admission estimates how long
the work ahead will take.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import redis

from model.sampling import SamplerPreset
from service import metrics
from service.batches import disk as batch_disk
from service.batches import sets as batches
from service.model_watch import ModelWatcher
from service.settings import Settings
from service.store import scripts
from service.store.capacity import TickModel, row_steps
from service.store.jobs import GROUP, Job, Keys, ResultMeta, result_key
from service.worker.runner import Decoded
from service.worker.scheduler import DecodeQueue, Sample, Scheduler

log = logging.getLogger("ldit.worker")

IDLE_BLOCK_MS = 500  # how long an idle worker blocks on the stream before checking its stop flag
PROGRESS_INTERVAL_S = 0.25  # at most 4 progress messages a second per worker, whatever the step rate
RECLAIM_CALLS = 16  # most XAUTOCLAIM calls per stream and reclaim pass (each scans at most COUNT x 10 entries)
RECONCILE_MAX_ENTRIES = 10000  # recount the queue's work only while the stream is this short


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
        self.runner, spec, self.version, self.engine_info = load_model()
        self.name = settings.worker_name or default_worker_name()
        self.scheduler = Scheduler(settings.max_batch_size, spec.latent_shape, settings.batching,
                                   device=self.runner.engine.device)
        self.decodes = DecodeQueue(settings.max_decode_delay_ms / 1000, settings.max_batch_size)
        self.watcher = ModelWatcher(settings.model_dir, settings.model_watch_interval_s)
        self._swap: tuple | None = None  # a newly loaded model waiting for the active samples to finish
        self._loading: threading.Thread | None = None
        self.waiting: deque[Job] = deque()  # read from the stream, not yet admitted
        self.waiting_batch: deque[Job] = deque()  # the same for sample-set jobs (lower priority)
        self._record_batch = r.register_script(batches.RECORD_LUA)
        self._batch_shapes: dict[str, tuple] = {}
        self.finishing: dict[str, Job] = {}  # handed to the PNG pool, not yet acknowledged
        self.pool = ThreadPoolExecutor(settings.png_threads, thread_name_prefix="png")
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._busy_s = 0.0
        self._last_reclaim = 0.0
        self._last_progress = 0.0
        self._images = 0  # finished since the last heartbeat
        self.images_per_s = 0.0  # smoothed, reported in the heartbeat (estimated start times)
        self._claim_cursor: dict[str, str] = {}  # per stream: where the next XAUTOCLAIM goes on
        self._held: list[str] = []  # stream ids of waiting + active jobs, refreshed every tick
        self._last_tick = time.monotonic()  # the loop's pulse, read by the heartbeat thread
        self.ticks = TickModel(settings.max_batch_size)
        self.ready = threading.Event()  # set after the first heartbeat
        self._end_script = r.register_script(scripts.END)
        self._release_script = r.register_script(scripts.RELEASE)
        self._reconcile_script = r.register_script(scripts.RECONCILE)

    # -- the loop ---------------------------------------------------------------------
    def _ensure_group(self) -> bool:
        try:
            ensure_group(self.r, self.keys)
            return True
        except redis.RedisError as err:  # unreachable, or the key holds something else: retried later
            log.warning("cannot create the consumer group (%r)", err)
            return False

    def run(self) -> None:
        backoff = 0.1
        while not self._ensure_group() and not self.stop_event.wait(backoff):  # Redis may still be starting
            backoff = min(2 * backoff, 2.0)
        self._calibrate()
        self._last_tick = time.monotonic()
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beat.start()
        log.info("worker started", extra={"worker": self.name, "batching": self.s.batching})
        try:
            backoff = 0.1
            while not self.stop_event.is_set():
                self._last_tick = time.monotonic()
                try:
                    self.tick()
                    backoff = 0.1
                    continue
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as err:
                    # Redis restarting: keep the samples in memory and retry; held jobs are
                    # still pending in the (persisted) stream if this worker dies meanwhile.
                    log.warning("redis unavailable (%r); retrying in %.1f s", err, backoff)
                except redis.ResponseError as err:
                    if "NOGROUP" not in str(err) and "no longer exists" not in str(err):
                        log.exception("redis refused a command")
                    else:  # someone deleted the stream or the group: make them again, go on
                        log.warning("job stream or consumer group lost (%s); recreating it", err)
                        self._claim_cursor.clear()
                except Exception:  # noqa: BLE001 - the loop must outlive any one tick
                    log.exception("worker tick failed")
                self.stop_event.wait(backoff)
                backoff = min(2 * backoff, 2.0)
                self._ensure_group()
            self._drain()
        finally:
            self.pool.shutdown(wait=True)
            try:
                self.r.hdel(self.keys.workers, self.name)
            except redis.RedisError:  # readers prune it once stale
                pass
            log.info("worker stopped", extra={"worker": self.name})

    def stop(self) -> None:
        """Stop taking jobs; the loop finishes the active samples and releases the rest."""
        self.stop_event.set()

    def tick(self) -> None:
        # when idle the read below may block: such a tick is not timed
        busy = bool(self.scheduler.active or self.waiting or self.waiting_batch or self.decodes)
        start = time.perf_counter()
        now = time.time()
        if now - self._last_reclaim > self.s.visibility_timeout_ms / 2000:
            self._reclaim()
            self._reconcile()
            self._last_reclaim = now
        self._read_jobs()
        self._drop_stopped_sets()
        self._expire(time.time())
        self._hot_swap()
        if self._swap is None:  # while a new model waits, the old one only finishes its samples
            was_active = bool(self.scheduler.active)
            admitted = self.scheduler.admit_waiting(self.waiting, 0)
            admitted += self.scheduler.admit_waiting(self.waiting_batch, 1)
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
        one_step = SamplerPreset(num_steps=2)
        seconds = {}
        for rows in sorted({1, self.s.max_batch_size}):
            times = []
            for _ in range(4):  # the first run pays lazy initialisation; the median of the others counts
                for i in range(rows):
                    self.scheduler.admit(Job(class_id=0, seed=i, preset=one_step, key="calibration",
                                             deadline=float("inf")))
                plan = self.scheduler.schedule()
                start = time.perf_counter()
                self.runner.step(plan)
                self.runner.drain()  # the runner runs ahead of the device: time the step to its end
                times.append(time.perf_counter() - start)
                self.scheduler.drop(lambda s: s.job.key == "calibration")
            seconds[rows] = sorted(times[1:])[1]
        self.ticks.calibrate(seconds)

    def _hot_swap(self) -> None:
        """Load a newly published checkpoint in the background; switch between batches."""
        if self._loading is None and self._swap is None and self.watcher.poll() is not None:
            def load():
                try:
                    self._swap = self.load_model()
                except Exception:  # noqa: BLE001 - keep serving the old model
                    log.exception("loading the new checkpoint failed; keeping version %s", self.version)
                finally:
                    self._loading = None

            self._loading = threading.Thread(target=load, name="model-loader", daemon=True)
            self._loading.start()
        if self._swap is not None and not self.scheduler.active and not self.decodes:
            runner, spec, version, info = self._swap
            old, self._swap = self.version, None
            self.runner, self.version, self.engine_info = runner, version, info
            self.scheduler.latent_shape = spec.latent_shape
            self.scheduler.device = runner.engine.device
            log.warning("switched model", extra={"from": old, "to": version})
            self.heartbeat()

    def _drain(self) -> None:
        """On stop: release jobs not yet started, finish the ones in flight."""
        self._release(list(self.waiting) + list(self.waiting_batch))
        self.waiting.clear()
        self.waiting_batch.clear()
        while self.scheduler.active or self.decodes:
            self._last_tick = time.monotonic()
            self._expire(time.time())
            self._step()

    # -- intake ---------------------------------------------------------------------
    def _read(self, count: int, block_ms: int | None, streams: tuple[str, ...] | None = None) -> list[Job]:
        streams = streams or (self.keys.stream,)
        reply = self.r.xreadgroup(GROUP, self.name, {s: ">" for s in streams}, count=count, block=block_ms)
        jobs = []
        for stream, entries in reply or []:
            for entry_id, fields in entries:
                jobs.append(self._parse(entry_id, fields, deliveries=1, stream=stream))
        return [j for j in jobs if j is not None]

    def _queue(self, jobs: list[Job], front: bool = False) -> None:
        for job in (reversed(jobs) if front else jobs):
            q = self.waiting_batch if job.batch else self.waiting
            q.appendleft(job) if front else q.append(job)

    def _read_jobs(self) -> None:
        budget = self.scheduler.admission_rows(0) - len(self.waiting)
        if budget <= 0:
            return
        idle = not self.scheduler.active and not self.waiting and not self.waiting_batch
        if idle:  # block on both streams; whichever has work wakes the worker
            jobs = self._read(budget, IDLE_BLOCK_MS, (self.keys.stream, self.keys.batch_stream))
        else:
            jobs = self._read(budget, None)
            if not jobs and not self.waiting and not self.scheduler.interactive_active():
                # nothing interactive waiting or running: sample-set jobs may fill the free rows
                low = self.scheduler.admission_rows(1) - len(self.waiting_batch)
                if low > 0:
                    jobs = self._read(low, None, (self.keys.batch_stream,))
        if idle and jobs and self.s.max_queue_delay_ms > 0 and len(jobs) < budget:
            # Triton's max_queue_delay: give a fuller first batch a moment to form.
            deadline = time.monotonic() + self.s.max_queue_delay_ms / 1000
            while len(jobs) < budget and (left := deadline - time.monotonic()) > 0:
                more = self._read(budget - len(jobs), max(1, int(left * 1000)))
                if not more:
                    break
                jobs += more
        self._queue(jobs)

    def _parse(self, entry_id, fields, deliveries: int, stream: str | bytes | None = None) -> Job | None:
        entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        stream = (stream.decode() if isinstance(stream, bytes) else stream) or self.keys.stream
        try:
            job = Job.from_fields(fields, stream_id=entry_id, deliveries=deliveries)
            job.stream = stream
            return job
        except Exception as err:  # noqa: BLE001 - a malformed entry must not stop the worker
            log.warning("malformed job entry %s: %r", entry_id, err)
            self.r.xadd(self.keys.dead_letters, {"entry": entry_id, "error": f"malformed: {err!r}"}, maxlen=10000)
            self.r.xack(stream, GROUP, entry_id)
            self.r.xdel(stream, entry_id)
            metrics.DEAD_LETTERS.inc()
            return None

    def _reclaim(self) -> None:
        """XAUTOCLAIM jobs idle past the visibility timeout; poison jobs go to the dead-letter stream.

        Each call scans at most COUNT x 10 pending entries and returns where to go on: the
        cursor is kept across passes, so dead workers' entries behind many live ones are reached.
        """
        count = max(1, self.s.max_batch_size)
        for stream in (self.keys.stream, self.keys.batch_stream):
            cursor, claimed = self._claim_cursor.get(stream, "0-0"), []
            for _ in range(RECLAIM_CALLS):
                reply = self.r.xautoclaim(stream, GROUP, self.name, self.s.visibility_timeout_ms,
                                          start_id=cursor, count=count)
                cursor = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
                claimed += [(e, f) for e, f in reply[1] if f is not None]
                if cursor == "0-0" or len(claimed) >= count:
                    break
            self._claim_cursor[stream] = cursor
            reclaimed = []
            for entry_id, fields in claimed:
                eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                info = self.r.xpending_range(stream, GROUP, min=eid, max=eid, count=1)
                deliveries = int(info[0]["times_delivered"]) if info else 1
                job = self._parse(eid, fields, deliveries, stream)
                if job is None:
                    continue
                metrics.RECLAIMED.inc()
                if deliveries > self.s.max_deliveries:
                    self._dead_letter(job, f"delivered {deliveries} times without completing")
                else:
                    log.info("reclaimed job", extra={"request_id": job.id, "deliveries": deliveries})
                    reclaimed.append(job)
            self._queue(reclaimed, front=True)  # they are older than anything read since

    def _expire(self, now: float) -> None:
        for pending in (self.waiting, self.waiting_batch):
            for job in [j for j in pending if j.expired(now)]:
                pending.remove(job)
                self._fail(job, "timeout", "the request's deadline passed before it could start")
        for sample in self.scheduler.drop(lambda s: s.job.expired(now)):
            self._fail(sample.job, "timeout", "the request's deadline passed while it was being generated")

    def _drop_stopped_sets(self) -> None:
        """Samples of a set deleted, expired or stopped by a disk error leave before the next plan."""
        ids = {j.batch for j in self.waiting_batch} | {
            s.job.batch for s in (*self.scheduler.active, *self.decodes.waiting) if s.job.batch}
        gone = batches.stopped(self.r, self.keys, ids) if ids else set()
        if not gone:
            return
        jobs = [j for j in self.waiting_batch if j.batch in gone]
        kept = [j for j in self.waiting_batch if j.batch not in gone]
        self.waiting_batch.clear()
        self.waiting_batch.extend(kept)
        jobs += [s.job for s in self.scheduler.drop(lambda s: s.job.batch in gone)]
        jobs += [s.job for s in self.decodes.drop(lambda s: s.job.batch in gone)]
        batches.acknowledge(self.r, jobs)
        metrics.BATCH_SAMPLES_DROPPED.inc(len(jobs))
        log.info("dropped samples of stopped sets", extra={"count": len(jobs), "sets": sorted(gone)})

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

    def _reconcile(self) -> None:
        """Recount the work in the queue from the stream (it drifts only when entries vanish unended)."""
        self._reconcile_script(keys=[self.keys.stream, self.keys.work], args=[RECONCILE_MAX_ENTRIES])

    # -- compute ------------------------------------------------------------------------
    def _step(self) -> int:
        """One forward for the planned samples, and any decode due; returns the forward's rows (0: none ran)."""
        self._held = [(j.stream, j.stream_id)
                      for j in (*self.waiting, *self.waiting_batch,
                                *(s.job for s in (*self.scheduler.active, *self.decodes.waiting)))]
        plan = self.scheduler.schedule()
        metrics.ACTIVE_SLOTS.set(len(self.scheduler.active))
        if plan is None:
            self._decode_due()
            return 0
        try:
            x_next, seconds = self.runner.step(plan)
        except Exception:  # noqa: BLE001 - leave the jobs pending; XAUTOCLAIM retries them
            log.exception("forward failed; %d jobs left for redelivery", len(plan.samples))
            ids = {id(s) for s in plan.samples}
            self.scheduler.drop(lambda s: id(s) in ids)
            return 0
        with self._lock:
            self._busy_s += seconds
        metrics.EXEC_COUNT.inc()
        metrics.ROWS_PER_FORWARD.observe(plan.rows)
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
        except Exception:  # noqa: BLE001
            log.exception("decode failed; %d jobs left for redelivery", len(samples))
            return
        with self._lock:
            self._busy_s += decoded.enqueue_s
            self.finishing.update((s.job.id, s.job) for s in samples)
        metrics.DECODE_BATCH.observe(len(samples))
        self.pool.submit(self._store_decoded, samples, decoded, self.version)

    def _store_decoded(self, samples: list[Sample], decoded: Decoded, version: str) -> None:
        """In a pool thread: wait until the decode reached the host, then file each image or its failure."""
        start = time.perf_counter()
        try:
            decoded.wait()
            images, finite = decoded.images.numpy(), decoded.finite.tolist()
        except Exception:  # noqa: BLE001 - unacknowledged: another delivery will redo them
            log.exception("decode failed; %d jobs left for redelivery", len(samples))
            with self._lock:
                for s in samples:
                    self.finishing.pop(s.job.id, None)
            return
        decode_s = decoded.enqueue_s + time.perf_counter() - start
        for sample, image, ok in zip(samples, images, finite, strict=True):
            if ok:
                self._store(sample, image, decode_s, version)
                continue
            try:  # a black image must never be stored (and cached) as a result
                self._fail(sample.job, "non_finite", "the sampler produced non-finite values; no image was stored")
            except Exception:  # noqa: BLE001
                log.exception("recording the failure of job %s failed", sample.job.id)
            finally:
                with self._lock:
                    self.finishing.pop(sample.job.id, None)

    def _store(self, sample: Sample, image: np.ndarray, decode_s: float, version: str) -> None:
        if sample.job.batch:
            return self._store_batch_image(sample, image, decode_s)
        job = sample.job
        # The result is filed under the version that really made it: after a hot swap the
        # API may have keyed the request with a version this worker had not switched to yet.
        key = result_key(version, job.class_id, job.seed, job.preset)
        try:
            png = self.s.encode_png(image)
            compute_s = sample.compute_s + decode_s
            meta = ResultMeta(
                queue_ms=round(max(0.0, sample.admitted_at - job.enqueued_at) * 1000, 3),
                compute_ms=round((time.time() - sample.admitted_at) * 1000, 3),
                batch_size=sample.widest_batch,
                model_version=version,
                worker=self.name,
            )
            self._end(job, {"status": "done", "key": key, "meta": meta.to_json()}, (self.keys.result(key), png))
            with self._lock:
                self._images += 1
            metrics.IMAGES.inc()
            metrics.COMPUTE_DURATION.observe(compute_s)
        except Exception:  # noqa: BLE001 - unacknowledged: another delivery will redo it
            log.exception("storing the result of job %s failed", job.id)
        finally:
            with self._lock:
                self.finishing.pop(job.id, None)

    def _store_batch_image(self, sample: Sample, image: np.ndarray, decode_s: float) -> None:
        """A sample-set image: into its set's file at its index, then counted once and acknowledged."""
        job = sample.job
        try:
            found = self._batch_file(job.batch)
            if found is None:
                self._fail(job, "expired", "the sample set is gone")
            elif tuple(image.shape) != found[0]:
                self._fail(job, "shape", f"the model makes {tuple(image.shape)} images; the set wants {found[0]}")
            elif found[1] is None:
                self._stop_set(job, "no_volume", f"worker {self.name} has no volume for this set (LDIT_BATCH_VOLUMES)")
            else:
                try:
                    batches.write_image(found[1], job, image)
                except OSError as err:  # a full or failing disk fails again on redelivery: stop the set
                    if not batch_disk.disk_error(err):
                        raise
                    return self._stop_set(job, batch_disk.disk_error(err),
                                          f"writing image {job.index} failed: {err.strerror} (errno {err.errno}) "
                                          f"on {found[1]}")
                self._record(job, "done")
                with self._lock:
                    self._images += 1
                metrics.IMAGES.inc()
                metrics.BATCH_IMAGES_WRITTEN.inc()
                metrics.COMPUTE_DURATION.observe(sample.compute_s + decode_s)
        except Exception:  # noqa: BLE001 - unacknowledged: another delivery will redo it
            log.exception("storing image %d of sample set %s failed", job.index, job.batch)
        finally:
            with self._lock:
                self.finishing.pop(job.id, None)

    def _batch_file(self, batch_id: str) -> tuple | None:
        """(image shape, the volume dir of its file or None), or None for a set that is gone."""
        if batch_id not in self._batch_shapes:
            found = batches.set_file(self.r, self.keys, batch_id, self.s.batch_volume_dirs())
            if found is None:
                return None
            self._batch_shapes[batch_id] = found
        return self._batch_shapes[batch_id]

    def _stop_set(self, job: Job, reason: str, message: str) -> None:
        """Fail the set of `job` with the reason; the image is counted failed, the set's other samples dropped."""
        batches.stop(self.r, self.keys, job.batch, reason, message)
        self._record(job, "failed")
        metrics.BATCH_WRITE_ERRORS.labels(reason).inc()
        log.error("sample set stopped", extra={"batch": job.batch, "reason": reason, "detail": message})

    def _record(self, job: Job, outcome: str) -> None:
        """Count a sample-set job once (done or failed) and acknowledge it: one Lua call."""

        def commands(pipe):
            self._record_batch(keys=[self.keys.batch(job.batch), self.keys.batch_done(job.batch), job.stream],
                               args=[job.index, GROUP, job.stream_id, repr(time.time()), outcome], client=pipe)

        self._transaction(commands)

    def _transaction(self, commands) -> None:
        """Run `commands(pipe)` in one MULTI/EXEC, riding out a short Redis restart.

        The commands are idempotent, and a failed EXEC leaves nothing half-applied.
        """

        def run():
            pipe = self.r.pipeline(transaction=True)
            commands(pipe)
            pipe.execute()

        self._retrying(run)

    @staticmethod
    def _retrying(call, attempts: int = 20) -> None:
        """`call()`, again after a lost connection (with backoff) until `attempts` are spent."""
        for attempt in range(attempts):
            try:
                call()
                return
            except (redis.ConnectionError, redis.TimeoutError):
                if attempt == attempts - 1:
                    raise
                time.sleep(min(0.1 * 2**attempt, 1.0))

    def _end(self, job: Job, status: dict, result: tuple[str, bytes] | None = None) -> None:
        """Record a job's end (and its followers'), store its `result` (key, PNG), acknowledge and delete
        its entry, release its work, wake its waiters with the result: one script call."""
        if job.batch:
            return self._record(job, status["status"])
        result_key_, png = result or ("", b"")

        # One script is atomic by itself: no MULTI/EXEC around it (nor the SCRIPT EXISTS a pipeline adds).
        self._retrying(lambda: self._end_script(
            keys=[self.keys.job(job.id), self.keys.stream, self.keys.work, self.keys.inflight(job.key), result_key_],
            args=[job.stream_id, GROUP, self.s.result_ttl_s, job.id, job.reply_to, self.keys.prefix,
                  scripts.as_json(status), self.keys.events, png, status.get("meta", "")]))

    # -- endings other than success ------------------------------------------------------
    def _fail(self, job: Job, reason: str, message: str) -> None:
        if reason == "timeout":
            metrics.EXPIRED.inc()
        self._end(job, {"status": "failed", "error": reason, "message": message})
        log.info("job failed", extra={"request_id": job.id, "reason": reason})

    def _dead_letter(self, job: Job, why: str) -> None:
        self.r.xadd(self.keys.dead_letters, {**job.to_fields(), "error": why}, maxlen=10000, approximate=True)
        metrics.DEAD_LETTERS.inc()
        self._fail(job, "dead_letter", why)

    def _release(self, jobs: list[Job]) -> None:
        """Hand jobs back to the queue at once (re-added, same id), instead of waiting for XAUTOCLAIM."""
        for job in jobs:
            if job.batch:  # sample sets have no work counter, single flight or status hash
                pipe = self.r.pipeline(transaction=True)
                pipe.xadd(job.stream, job.to_fields())
                pipe.xack(job.stream, GROUP, job.stream_id)
                pipe.xdel(job.stream, job.stream_id)
                pipe.execute()
            else:
                self._release_script(keys=[self.keys.job(job.id), self.keys.stream, self.keys.work],
                                     args=[job.stream_id, GROUP, scripts.as_json(job.to_fields()), job.cost])
        if jobs:
            log.info("released jobs", extra={"count": len(jobs)})

    # -- heartbeat ------------------------------------------------------------------------
    def held_ids(self) -> dict[str, list[str]]:
        """Stream entry ids of every job this worker holds, by stream."""
        with self._lock:
            finishing = [(j.stream, j.stream_id) for j in self.finishing.values()]
        held: dict[str, list[str]] = {}
        for stream, entry in (*self._held, *finishing):
            if entry:
                held.setdefault(stream or self.keys.stream, []).append(entry)
        return held

    def _heartbeat_loop(self) -> None:
        """Beat at once (readiness), then every interval until stopped and drained, while the loop ticks."""
        last, stalled = time.monotonic(), False
        while True:
            try:
                quiet_s = time.monotonic() - self._last_tick
                if quiet_s > self.s.heartbeat_ttl_s:
                    if not stalled:
                        log.error("worker loop silent for %.1f s; heartbeat withdrawn", quiet_s)
                    stalled = True
                    self.r.hdel(self.keys.workers, self.name)
                else:
                    stalled = False
                    self.heartbeat()
                    self.ready.set()
                now = time.monotonic()
                with self._lock:
                    metrics.BUSY_RATIO.set(min(1.0, self._busy_s / max(1e-9, now - last)))
                    self._busy_s = 0.0
                    rate, self._images = self._images / max(1e-9, now - last), 0
                # Smoothed over about ten beats; an idle beat (no work) keeps the last busy rate.
                if rate > 0 or self.scheduler.active:
                    self.images_per_s = rate if self.images_per_s == 0 else 0.8 * self.images_per_s + 0.2 * rate
                last = now
            except Exception:  # noqa: BLE001 - Redis may be restarting; try again next beat
                log.warning("heartbeat failed", exc_info=True)
            if self.stop_event.wait(self.s.heartbeat_interval_s) and not self.scheduler.active and not self.decodes:
                break

    def done_rows(self) -> int:
        """Row-steps already computed for jobs still counted in the queue's work (active and finishing)."""
        with self._lock:
            finishing = list(self.finishing.values())
        active, decoding = list(self.scheduler.active), list(self.decodes.waiting)
        done = [row_steps(s.job.preset, s.step) for s in active if not s.job.batch]  # sets are not in that work
        return sum(done) + sum(row_steps(j.preset) for j in (*(s.job for s in decoding), *finishing) if not j.batch)

    def heartbeat(self) -> None:
        info = {"name": self.name, "model_version": self.version, "active": len(self.scheduler.active),
                "max_rows": self.s.max_batch_size, "batching": self.s.batching,
                "images_per_s": round(self.images_per_s, 3), "ts": time.time(),
                "loop_age_s": round(time.monotonic() - self._last_tick, 3), "rate": self.ticks.published(),
                "done_rows": self.done_rows(), **self.engine_info}
        self.r.hset(self.keys.workers, self.name, json.dumps(info))
        for stream, held in self.held_ids().items():  # keep our jobs' idle time below the visibility timeout
            self.r.xclaim(stream, GROUP, self.name, 0, held, justid=True)

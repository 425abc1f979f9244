"""The worker's results room: wait for a decode to reach the host, encode, store, acknowledge.

Runs in the store threads (a pool, so the loop never waits on the host, on deflate or on Redis).
A result is stored, its job acknowledged and deleted from the stream, and its waiters woken with the
PNG in one script call (service/store/scripts.py END); a sample-set image goes to its set's file and
is counted in one Lua call (service/batches/sets.py). The other endings live here too: a failure, a
dead letter, a release back to the queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import redis

from engines.device import is_sticky_device_error, use_device_in_this_thread
from service import metrics
from service.batches import disk as batch_disk
from service.batches import files as set_files
from service.batches import sets as batches
from service.batches.scripts import RECORD_LUA
from service.settings import Settings
from service.store import scripts
from service.store.jobs import GROUP, Job, Keys, ResultMeta, result_key
from service.worker.runner import Decoded
from service.worker.scheduler import Sample

log = logging.getLogger("ldit.worker")


class Results:
    def __init__(self, settings: Settings, r: redis.Redis, keys: Keys, name: str, device=None,
                 on_device_error: Callable[[BaseException], None] | None = None):
        """`device`: the engine's; each store thread makes it current before its first CUDA call (an event
        wait). `on_device_error`: called with an error that left the CUDA context unusable."""
        self.s, self.r, self.keys, self.name = settings, r, keys, name
        self.on_device_error = on_device_error
        self.finishing: dict[str, Job] = {}  # handed to the store pool, not yet acknowledged
        self.pool = ThreadPoolExecutor(settings.png_threads, thread_name_prefix="png",
                                       initializer=use_device_in_this_thread, initargs=(device or "cpu",))
        self._lock = threading.Lock()
        self._images = 0  # stored since the last take_images()
        self._batch_shapes: dict[str, tuple] = {}
        self._record_batch = r.register_script(RECORD_LUA)
        self._end_script = r.register_script(scripts.END)
        self._release_script = r.register_script(scripts.RELEASE)

    def submit(self, samples: list[Sample], decoded: Decoded, version: str) -> None:
        """Hand decoded samples to a store thread; they count as held (heartbeat) until acknowledged."""
        with self._lock:
            self.finishing.update((s.job.id, s.job) for s in samples)
        self.pool.submit(self._store_decoded, samples, decoded, version)

    def finishing_jobs(self) -> list[Job]:
        with self._lock:
            return list(self.finishing.values())

    def take_images(self) -> int:
        """Images stored since the last call."""
        with self._lock:
            count, self._images = self._images, 0
        return count

    def shutdown(self, wait: bool = True) -> None:
        """wait=False: drop the stores not yet started (their jobs stay pending, for another worker)."""
        self.pool.shutdown(wait=wait, cancel_futures=not wait)

    def _store_decoded(self, samples: list[Sample], decoded: Decoded, version: str) -> None:
        """In a pool thread: wait until the decode reached the host, then file each image or its failure."""
        start = time.perf_counter()
        try:
            decoded.wait()
            images, finite = decoded.images.numpy(), decoded.finite.tolist()
        except Exception as err:  # noqa: BLE001 - unacknowledged: another delivery will redo them
            log.exception("decode failed; %d jobs left for redelivery", len(samples))
            with self._lock:
                for s in samples:
                    self.finishing.pop(s.job.id, None)
            if self.on_device_error is not None and is_sticky_device_error(err):
                self.on_device_error(err)
            return
        decode_s = decoded.enqueue_s + time.perf_counter() - start
        for sample, image, ok in zip(samples, images, finite, strict=True):
            if ok:
                self._store(sample, image, decode_s, version)
                continue
            try:  # a black image must never be stored (and cached) as a result
                self.fail(sample.job, "non_finite", "the sampler produced non-finite values; no image was stored")
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
            self.end(job, {"status": "done", "key": key, "meta": meta.to_json()}, (self.keys.result(key), png))
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
                self.fail(job, "expired", "the sample set is gone")
            elif tuple(image.shape) != found[0]:
                self.fail(job, "shape", f"the model makes {tuple(image.shape)} images; the set wants {found[0]}")
            elif found[1] is None:
                self._stop_set(job, "no_volume", f"worker {self.name} has no volume for this set (LDIT_BATCH_VOLUMES)")
            else:
                try:
                    set_files.write_image(found[1], job, image)
                except OSError as err:  # a full or failing disk fails again on redelivery: stop the set
                    if not batch_disk.disk_error(err):
                        raise
                    return self._stop_set(job, batch_disk.disk_error(err),
                                          f"writing image {job.index} failed: {err.strerror} (errno {err.errno}) "
                                          f"on {found[1]}")
                self._record(job, "done", started=sample.admitted_at)
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
            found = set_files.set_file(self.r, self.keys, batch_id, self.s.batch_volume_dirs())
            if found is None:
                return None
            self._batch_shapes[batch_id] = found
        return self._batch_shapes[batch_id]

    def _stop_set(self, job: Job, reason: str, message: str) -> None:
        """Fail the set of `job` with the reason; the image is counted failed, the set's other samples dropped."""
        batches.stop(self.r, self.keys, job.batch, reason, message)
        self._record(job, "failed", reason, message)
        metrics.BATCH_WRITE_ERRORS.labels(reason).inc()
        log.error("sample set stopped", extra={"batch": job.batch, "reason": reason, "detail": message})

    def _record(self, job: Job, outcome: str, error: str = "", message: str = "", started: float | None = None) -> None:
        """Count a sample-set job once (done or failed) and acknowledge it: one Lua call. A failure's
        `error` and `message` become the set's if it has none yet; `started`: when a done image's sample
        was admitted (the set's images/s counts from its earliest)."""

        def commands(pipe):
            self._record_batch(keys=[self.keys.batch(job.batch), self.keys.batch_done(job.batch), job.stream],
                               args=[job.index, GROUP, job.stream_id, repr(time.time()), outcome, error, message,
                                     "" if started is None else repr(started)], client=pipe)

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

    def end(self, job: Job, status: dict, result: tuple[str, bytes] | None = None) -> None:
        """Record a job's end (and its followers'), store its `result` (key, PNG), acknowledge and delete
        its entry, release its work, wake its waiters with the result: one script call."""
        if job.batch:
            return self._record(job, status["status"], status.get("error", ""), status.get("message", ""))
        result_key_, png = result or ("", b"")

        # One script is atomic by itself: no MULTI/EXEC around it (nor the SCRIPT EXISTS a pipeline adds).
        self._retrying(lambda: self._end_script(
            keys=[self.keys.job(job.id), self.keys.stream, self.keys.work, self.keys.inflight(job.key), result_key_],
            args=[job.stream_id, GROUP, self.s.result_ttl_s, job.id, job.reply_to, self.keys.prefix,
                  scripts.as_json(status), self.keys.events, png, status.get("meta", "")]))

    def fail(self, job: Job, reason: str, message: str) -> None:
        if reason == "timeout":
            metrics.EXPIRED.inc()
        self.end(job, {"status": "failed", "error": reason, "message": message})
        log.info("job failed", extra={"request_id": job.id, "reason": reason})

    def dead_letter(self, job: Job, why: str) -> None:
        self.r.xadd(self.keys.dead_letters, {**job.to_fields(), "error": why}, maxlen=10000, approximate=True)
        metrics.DEAD_LETTERS.inc()
        self.fail(job, "dead_letter", why)

    def release(self, jobs: list[Job]) -> None:
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


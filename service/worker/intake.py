"""The worker's intake room: jobs from the two streams into its waiting queues.

Reads new entries (blocking on both streams only when idle; sample-set jobs only while nothing
interactive waits or runs), parses them (a malformed entry goes to the dead letters), reclaims the
jobs of silent workers with XAUTOCLAIM (its cursor kept across passes, so a long pending list is
scanned whole; a job delivered too often is dead-lettered), fails what expired before it started,
and drops the samples of sample sets that were deleted or stopped.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import redis

from service import metrics
from service.batches import sets as batches
from service.settings import Settings
from service.store import scripts
from service.store.jobs import GROUP, Job, Keys
from service.worker.results import Results
from service.worker.scheduler import DecodeQueue, Scheduler

log = logging.getLogger("ldit.worker")

IDLE_BLOCK_MS = 500  # how long an idle worker blocks on the stream before checking its stop flag
RECLAIM_CALLS = 16  # most XAUTOCLAIM calls per stream and reclaim pass (each scans at most COUNT x 10 entries)
RECONCILE_MAX_ENTRIES = 10000  # recount the queue's work only while the stream is this short


class Intake:
    def __init__(self, settings: Settings, r: redis.Redis, keys: Keys, name: str, scheduler: Scheduler,
                 decodes: DecodeQueue, results: Results):
        self.s, self.r, self.keys, self.name = settings, r, keys, name
        self.scheduler, self.decodes, self.results = scheduler, decodes, results
        self.waiting: deque[Job] = deque()  # read from the stream, not yet admitted
        self.waiting_batch: deque[Job] = deque()  # the same for sample-set jobs (lower priority)
        self._claim_cursor: dict[str, str] = {}  # per stream: where the next XAUTOCLAIM goes on
        self._reconcile_script = r.register_script(scripts.RECONCILE)

    def pending(self) -> bool:
        return bool(self.waiting or self.waiting_batch)

    def jobs(self) -> list[Job]:
        return [*self.waiting, *self.waiting_batch]

    def release_all(self) -> None:
        """Hand every job not yet started back to the queue (on stop)."""
        self.results.release(self.jobs())
        self.waiting.clear()
        self.waiting_batch.clear()

    def forget_cursors(self) -> None:
        """After the stream or group was deleted: scan from the start again."""
        self._claim_cursor.clear()

    def _read(self, count: int, block_ms: int | None, streams: tuple[str, ...] | None = None) -> list[Job]:
        streams = streams or (self.keys.stream,)
        reply = self.r.xreadgroup(GROUP, self.name, {s: ">" for s in streams}, count=count, block=block_ms)
        jobs = []
        for stream, entries in reply or []:
            for entry_id, fields in entries:
                jobs.append(self._parse(entry_id, fields, deliveries=1, stream=stream))
        return [j for j in jobs if j is not None]

    def queue(self, jobs: list[Job], front: bool = False) -> None:
        for job in (reversed(jobs) if front else jobs):
            q = self.waiting_batch if job.batch else self.waiting
            q.appendleft(job) if front else q.append(job)

    def read_jobs(self) -> None:
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
        self.queue(jobs)

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

    def reclaim(self) -> None:
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
                    self.results.dead_letter(job, f"delivered {deliveries} times without completing")
                else:
                    log.info("reclaimed job", extra={"request_id": job.id, "deliveries": deliveries})
                    reclaimed.append(job)
            self.queue(reclaimed, front=True)  # they are older than anything read since

    def expire(self, now: float) -> None:
        for pending in (self.waiting, self.waiting_batch):
            for job in [j for j in pending if j.expired(now)]:
                pending.remove(job)
                self.results.fail(job, "timeout", timeout_message(job, "before it could start"))
        for sample in self.scheduler.drop(lambda s: s.job.expired(now)):
            self.results.fail(sample.job, "timeout", timeout_message(sample.job, "while it was being generated"))

    def drop_stopped_sets(self) -> None:
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
    def reconcile(self) -> None:
        """Recount the work in the queue from the stream (it drifts only when entries vanish unended)."""
        self._reconcile_script(keys=[self.keys.stream, self.keys.work], args=[RECONCILE_MAX_ENTRIES])


def timeout_message(job: Job, when: str) -> str:
    if job.batch:  # a sample set's images share its deadline
        return (f"the sample set did not finish within its deadline (LDIT_BATCH_TTL_S after it was made): "
                f"image {job.index} timed out {when}")
    return f"the request's deadline passed {when}"

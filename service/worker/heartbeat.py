"""The worker's heartbeat: a thread that says, every interval, that this worker's loop is alive.

It writes the worker's record (model version, engine, measured speed, rows already done of the work
it holds: the API's admission reads them) and re-claims the jobs it holds so their idle time stays
below the visibility timeout. It beats only while the loop ticks: a loop silent for longer than
`heartbeat_ttl_s` withdraws the record (readiness fails, and held jobs are no longer kept from the
other workers).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from service import metrics
from service.store.capacity import row_steps
from service.store.connections import RETRY_ON
from service.store.jobs import GROUP

if TYPE_CHECKING:
    from service.worker.loop import Worker

log = logging.getLogger("ldit.worker")


class Heartbeat:
    def __init__(self, worker: Worker):
        self.w = worker
        self.s, self.r, self.keys = worker.s, worker.r, worker.keys
        self.images_per_s = 0.0  # smoothed, reported in the heartbeat (estimated start times)

    def held_ids(self) -> dict[str, list[str]]:
        """Stream entry ids of every job this worker holds, by stream."""
        w = self.w
        finishing = [(j.stream, j.stream_id) for j in w.results.finishing_jobs()]
        held: dict[str, list[str]] = {}
        for stream, entry in (*w.held, *finishing):
            if entry:
                held.setdefault(stream or self.keys.stream, []).append(entry)
        return held

    def run(self) -> None:
        """Beat at once (readiness), then every interval until stopped and drained, while the loop ticks."""
        w = self.w
        last, stalled = time.monotonic(), False
        while True:
            if w.fatal is not None:  # the device is lost: this worker must look dead at once
                try:
                    self.r.hdel(self.keys.workers, w.name)
                except Exception:  # noqa: BLE001 - the loop removes it again on its way out
                    pass
                return
            try:
                quiet_s = time.monotonic() - w.last_tick
                if quiet_s > self.s.heartbeat_ttl_s:
                    if not stalled:
                        log.error("worker loop silent for %.1f s; heartbeat withdrawn", quiet_s)
                    stalled = True
                    self.r.hdel(self.keys.workers, w.name)
                else:
                    stalled = False
                    self.beat()
                    w.ready.set()
                now = time.monotonic()
                metrics.BUSY_RATIO.set(min(1.0, w.take_busy_s() / max(1e-9, now - last)))
                rate = w.results.take_images() / max(1e-9, now - last)
                # Smoothed over about ten beats; an idle beat (no work) keeps the last busy rate.
                if rate > 0 or w.scheduler.active:
                    self.images_per_s = rate if self.images_per_s == 0 else 0.8 * self.images_per_s + 0.2 * rate
                last = now
            except RETRY_ON:  # Redis restarting or unreachable: try again next beat
                metrics.REDIS_UP.set(0)
                metrics.REDIS_ERRORS.labels("worker").inc()
                log.warning("heartbeat failed: redis unavailable", exc_info=True)
            except Exception:  # noqa: BLE001 - try again next beat
                log.warning("heartbeat failed", exc_info=True)
            if w.stop_event.wait(self.s.heartbeat_interval_s) and not w.scheduler.active and not w.decodes:
                break

    def done_rows(self) -> int:
        """Row-steps already computed for jobs still counted in the queue's work (active and finishing)."""
        w = self.w
        finishing = w.results.finishing_jobs()
        active, decoding = list(w.scheduler.active), list(w.decodes.waiting)
        done = [row_steps(s.job.preset, s.step) for s in active if not s.job.batch]  # sets are not in that work
        return sum(done) + sum(row_steps(j.preset) for j in (*(s.job for s in decoding), *finishing) if not j.batch)

    def beat(self) -> None:
        w = self.w
        info = {"name": w.name, "model_version": w.version, "active": len(w.scheduler.active),
                "max_rows": self.s.max_batch_size, "batching": self.s.batching,
                "images_per_s": round(self.images_per_s, 3), "ts": time.time(),
                "loop_age_s": round(time.monotonic() - w.last_tick, 3), "rate": w.ticks.published(),
                "done_rows": self.done_rows(), **w.engine_info}
        self.r.hset(self.keys.workers, w.name, json.dumps(info))
        held_ids = self.held_ids()
        for stream, held in held_ids.items():  # keep our jobs' idle time below the visibility timeout
            self.r.xclaim(stream, GROUP, w.name, 0, held, justid=True)
        metrics.REDIS_UP.set(1)
        metrics.WORKER_HEARTBEATS.inc()
        metrics.HELD_JOBS.set(sum(len(ids) for ids in held_ids.values()))

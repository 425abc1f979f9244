"""Whether a new job goes into the queue: one atomic check-and-append in Redis (service/store/scripts.py).

Before appending, the API derives from the live workers' heartbeats (service/store/heartbeats.py)
how much work may be ahead of the job for it still to finish within
`admission_headroom` x `request_timeout_s` (service/store/capacity.py). The script then, in one
step: recognises a retry of the same job, answers from a result stored meanwhile,
attaches the job to an identical one in flight (single flight), refuses a full queue
or too much work ahead, or appends the job and adds its cost to the queue's work.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from service import metrics
from service.settings import Settings
from service.store import scripts
from service.store.capacity import admission_limits, retry_after_s
from service.store.heartbeats import FleetView
from service.store.jobs import Job, Keys


@dataclass(frozen=True)
class Verdict:
    outcome: str  # queued | follow | exists | cached | no_worker | full | busy | too_long
    message: str = ""
    retry_after: int = 0

    @property
    def accepted(self) -> bool:
        return self.outcome in ("queued", "follow", "exists")


class Admission:
    def __init__(self, r: aioredis.Redis, settings: Settings, keys: Keys):
        self.s, self.keys = settings, keys
        self.script = r.register_script(scripts.ADMIT)
        self.fleet = FleetView(r, keys, settings.heartbeat_ttl_s)

    def no_worker_retry_s(self) -> int:
        return max(1, math.ceil(self.s.heartbeat_ttl_s / 2))

    async def admit(self, job: Job, hash_fields: dict, need_worker: bool) -> Verdict:
        fleet = await self.fleet.get()
        if need_worker and not fleet.alive:
            return Verdict("no_worker", "no worker is running (no fresh heartbeat); the job was not queued",
                           self.no_worker_retry_s())
        budget_s = self.s.admission_headroom * max(0.0, job.deadline - time.time())
        steps = job.preset.num_steps - 1
        rate = fleet.rate
        limits = admission_limits(rate, steps, budget_s)
        reply = await self.script(
            keys=[self.keys.stream, self.keys.job(job.id), self.keys.work, self.keys.inflight(job.key),
                  self.keys.result(job.key)],
            args=[job.id, self.s.max_queue_length, -1 if limits is None else limits.max_work + fleet.done_rows,
                  int(limits is None or limits.alone_fits), self.s.result_ttl_s,
                  int(self.s.request_timeout_s * 1000) + 5000, self.s.stream_max_length, job.cost,
                  scripts.as_json(hash_fields), scripts.as_json(job.to_fields()), job.reply_to, self.keys.prefix])
        outcome = reply[0].decode()
        if outcome in ("queued", "follow", "exists", "cached"):
            return Verdict(outcome)
        metrics.QUEUE_FULL.inc()
        depth, work = int(reply[1]), float(reply[2]) - fleet.done_rows
        if outcome == "full":
            retry = retry_after_s(rate, work, limits) if limits else math.ceil(depth / self.s.max_batch_size)
            return Verdict("full", f"{depth} jobs are waiting; retry later", max(1, retry))
        if outcome == "too_long":
            return Verdict("too_long", f"{steps} steps take about {steps * rate.alone_tick_s:.0f} s at the "
                                       f"workers' measured speed, more than this request's deadline allows "
                                       f"({budget_s:.0f} s); ask for fewer steps")
        ahead_s = work / rate.rows_per_s
        return Verdict("busy", f"the work ahead (about {ahead_s:.0f} s at the workers' measured speed) would not "
                               f"let this job finish before its deadline; retry later",
                       retry_after_s(rate, work, limits))

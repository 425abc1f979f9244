"""Wakes waiting HTTP requests when their job ends: one pub/sub connection per API process.

Workers publish a job's end on the channel named in the job (`reply_to`): its id, its
status fields and, for a finished job, the PNG itself, so the request answers without
reading the result back from Redis (service/store/scripts.py's END script). A
single listener task resolves the matching future, so no request polls and no
request holds a Redis connection while it waits. If the subscription drops
(Redis restarted), the listener reconnects and checks every waiting job's status
once, so a notification lost in between costs no request; a job whose record is
gone (a Redis that came back without its data) wakes its request at once, which
then answers that the job was lost instead of waiting out its deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis

from service.store.jobs import Keys
from service.store.pubsub import cancel, subscribe_forever

log = logging.getLogger("ldit.api")


@dataclass(frozen=True)
class Reply:
    """A job's end as its worker sent it: the status fields, and the PNG of a finished job."""

    status: dict
    png: bytes | None


class ResultWaiter:
    def __init__(self, r: aioredis.Redis, keys: Keys):
        self.r = r
        self.keys = keys
        self.api_id = uuid.uuid4().hex[:12]
        self.channel = keys.notify(self.api_id)
        self._futures: dict[str, asyncio.Future] = {}
        self._queued: set[str] = set()  # waiting jobs whose admission has returned: their record exists
        self._task: asyncio.Task | None = None
        self._subscribed = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="result-waiter")
        try:
            await asyncio.wait_for(self._subscribed.wait(), timeout=10)
        except TimeoutError:
            log.warning("pub/sub subscription not ready yet; requests will wait for it")

    async def stop(self) -> None:
        await cancel(self._task)

    def register(self, job_id: str) -> asyncio.Future:
        """Call before the job is enqueued, so an early wake-up is not missed."""
        fut = asyncio.get_running_loop().create_future()
        self._futures[job_id] = fut
        return fut

    def queued(self, job_id: str) -> None:
        """Call once the job is in Redis: from then on, a record found missing means the job was lost."""
        if job_id in self._futures:
            self._queued.add(job_id)

    def forget(self, job_id: str) -> None:
        self._futures.pop(job_id, None)
        self._queued.discard(job_id)

    def _wake(self, job_id: str, reply: Reply | None = None) -> None:
        fut = self._futures.pop(job_id, None)
        if fut is not None and not fut.done():
            fut.set_result(reply)

    def _on_message(self, data: bytes | str) -> None:
        data = data if isinstance(data, bytes) else data.encode()
        job_id, sep, rest = data.partition(b"\n")
        if not sep:  # a bare id: the waiter reads the job's end from Redis
            return self._wake(job_id.decode())
        status, _, png = rest.partition(b"\n")
        self._wake(job_id.decode(), Reply(json.loads(status), png or None))

    async def _listen(self) -> None:
        async def subscribed() -> None:
            self._subscribed.set()
            await self._recheck()

        await subscribe_forever(self.r, self.channel, self._on_message, subscribed)

    async def _recheck(self) -> None:
        """After (re)subscribing: wake every waiter whose job already ended, or whose job Redis lost."""
        ids = list(self._futures)
        if not ids:
            return
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(self.keys.job(job_id), "status")
        for job_id, status in zip(ids, await pipe.execute(), strict=True):
            if status in (b"done", b"failed") or (status is None and job_id in self._queued):
                self._wake(job_id)

"""Wakes waiting HTTP requests when their job ends: one pub/sub connection per API process.

Workers publish a job id on the channel named in the job (`reply_to`). A
single listener task resolves the matching future, so no request polls and no
request holds a Redis connection while it waits. If the subscription drops
(Redis restarted), the listener reconnects and checks every waiting job's status
once, so a notification lost in between costs no request.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import redis.asyncio as aioredis

from service.jobs import Keys
from service.pubsub import cancel, subscribe_forever

log = logging.getLogger("ldit.api")


class ResultWaiter:
    def __init__(self, r: aioredis.Redis, keys: Keys):
        self.r = r
        self.keys = keys
        self.api_id = uuid.uuid4().hex[:12]
        self.channel = keys.notify(self.api_id)
        self._futures: dict[str, asyncio.Future] = {}
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

    def forget(self, job_id: str) -> None:
        self._futures.pop(job_id, None)

    def _wake(self, job_id: str) -> None:
        fut = self._futures.pop(job_id, None)
        if fut is not None and not fut.done():
            fut.set_result(job_id)

    async def _listen(self) -> None:
        async def subscribed() -> None:
            self._subscribed.set()
            await self._recheck()

        await subscribe_forever(self.r, self.channel,
                                lambda data: self._wake(data.decode() if isinstance(data, bytes) else data), subscribed)

    async def _recheck(self) -> None:
        """After (re)subscribing: wake every waiter whose job already ended."""
        for job_id in list(self._futures):
            status = await self.r.hget(self.keys.job(job_id), "status")
            if status in (b"done", b"failed"):
                self._wake(job_id)

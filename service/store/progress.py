"""Live job progress for Server-Sent Events: one pub/sub subscription per API process.

Workers publish on `<prefix>:events`: `{"progress": {job_id: [step, steps], ...}}` at most
every `PROGRESS_INTERVAL_S`, and `{"end": {job_id: "done"|"failed"}}` when a job ends. Every API replica
receives them; the hub hands each to the SSE streams of this process that watch that job,
so no client polls Redis. A stream reads the job's hash once when it starts, again when its
job ends or the queue moves (to recompute its position, at most once a second), and after a
reconnect (a message may have been lost while Redis was away, or Redis came back without the job).
"""

from __future__ import annotations

import asyncio
import json
import logging

import redis.asyncio as aioredis

from service import metrics
from service.store.jobs import Keys
from service.store.pubsub import cancel, subscribe_forever

log = logging.getLogger("ldit.api")

PROGRESS_INTERVAL_S = 0.25  # a worker publishes progress at most this often; a stream relays it as often


class Watch:
    """What one SSE stream has been told since it last looked."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self.progress: tuple[int, int] | None = None
        self.ended = False
        self.queue_moved = True  # compute the position once at the start
        self.reread = False  # the subscription was (re)made: read the job again, whatever was missed

    def poke(self) -> None:
        self.changed.set()


class EventHub:
    def __init__(self, r: aioredis.Redis, keys: Keys):
        self.r = r
        self.keys = keys
        self._watches: dict[str, set[Watch]] = {}
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="event-hub")

    async def stop(self) -> None:
        await cancel(self._task)

    def watch(self, job_id: str) -> Watch:
        w = Watch()
        self._watches.setdefault(job_id, set()).add(w)
        metrics.SSE_STREAMS.inc()
        return w

    def unwatch(self, job_id: str, w: Watch) -> None:
        watches = self._watches.get(job_id)
        if watches is not None and w in watches:
            watches.discard(w)
            metrics.SSE_STREAMS.dec()
            if not watches:
                del self._watches[job_id]

    @property
    def watching(self) -> int:
        return sum(len(ws) for ws in self._watches.values())

    def _dispatch(self, message: dict) -> None:
        for job_id, (step, steps) in message.get("progress", {}).items():
            for w in self._watches.get(job_id, ()):
                w.progress = (int(step), int(steps))
                w.poke()
        for job_id in message.get("end", {}):
            for w in self._watches.get(job_id, ()):
                w.ended = True
                w.poke()
        # Any progress or ending means the queue moved: queued streams recompute their position.
        for watches in self._watches.values():
            for w in watches:
                if w.progress is None and not w.ended:
                    w.queue_moved = True
                    w.poke()

    def _poke_all(self) -> None:
        for watches in self._watches.values():
            for w in watches:
                w.queue_moved = w.reread = True
                w.poke()

    async def _listen(self) -> None:
        async def subscribed() -> None:
            self._poke_all()  # (re)subscribed: whatever was missed, every stream looks again

        await subscribe_forever(self.r, self.keys.events, self._on_message, subscribed)

    def _on_message(self, data: bytes) -> None:
        try:
            self._dispatch(json.loads(data))
        except (ValueError, TypeError, AttributeError) as err:
            log.warning("malformed event message: %r", err)


def sse(event: str, data: dict) -> bytes:
    """One Server-Sent Event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

"""GET /jobs/{id}/events: a job's live progress as Server-Sent Events (relayed by service/store/progress.py).

A stream never ends as a cut body: its job's end (`done` or `failed`) goes out as soon as the hub
hears of it; a Redis outage makes it wait (keep-alive comments go on), read the job again once
Redis is back and go on, or, after `SSE_OUTAGE_LIMIT_S` without Redis, end with a `failed` event
saying so; a job whose record Redis no longer has ends with `failed` (`lost`).
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from redis.exceptions import BusyLoadingError, ResponseError

from service.http.errors import ERRORS, error
from service.http.schemas import ErrorBody, JobStatus
from service.settings import Settings
from service.store.capacity import FleetRate
from service.store.heartbeats import live_workers
from service.store.jobs import GROUP, Keys
from service.store.progress import PROGRESS_INTERVAL_S, EventHub, Watch, sse

log = logging.getLogger("ldit.api")

SSE_KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing a quiet stream
SSE_MIN_INTERVAL_S = PROGRESS_INTERVAL_S  # progress reaches a client as often as a worker publishes it, no more
PER_SECOND = round(1 / SSE_MIN_INTERVAL_S)
POSITION_INTERVAL_S = 1.0  # a queued stream recomputes its position at most this often
SSE_OUTAGE_LIMIT_S = 60.0  # Redis unreachable this long: the stream ends with `failed` (`unavailable`)
REDIS_DOWN = (aioredis.ConnectionError, aioredis.TimeoutError, BusyLoadingError)
LOST = ("the job's record is gone from Redis (it expired, or Redis restarted without its data); "
        "it will not finish: submit it again")


def add_event_routes(app: FastAPI, settings: Settings, keys: Keys, guard, job_record) -> None:
    """`job_record(r, job_id, caller)` reads a job's (status, raw fields), None for another key's job,
    as the API's other job routes do."""

    @app.get("/jobs/{job_id}/events", response_class=StreamingResponse, responses={
        200: {"content": {"text/event-stream": {}}, "description": (
            "Server-Sent Events: `queued` {position, estimated_start_s} (both null while unknown, e.g. before "
            f"any worker has run), `progress` {{step, steps}} (at most {PER_SECOND} a second; `steps` is the "
            "request's `steps` less one), then `done` {image_url, ...} or `failed` {error, message}; the stream "
            "then ends. A Redis outage pauses the stream (keep-alive comments go on); one that lasts "
            f"{SSE_OUTAGE_LIMIT_S:g} s ends it with `failed` (`unavailable`), a job Redis lost with `failed` "
            "(`lost`).")},
        **ERRORS, 404: {"model": ErrorBody}})
    async def job_events(job_id: str, request: Request, caller: str = guard):
        """Live progress of a job as Server-Sent Events, relayed from the workers through Redis."""
        job_id = job_id[:64]
        hub: EventHub = request.app.state.events
        watch = hub.watch(job_id)  # before the first read, so an ending published meanwhile is not missed
        try:
            record = await job_record(request.app.state.redis, job_id, caller)
        except BaseException:
            hub.unwatch(job_id, watch)
            raise
        if record is None:
            hub.unwatch(job_id, watch)
            return error(404, "not_found", f"no job {job_id!r} (unknown or expired)")
        return StreamingResponse(event_stream(request.app.state.redis, hub, job_id, watch, record, caller),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def event_stream(r: aioredis.Redis, hub: EventHub, job_id: str, watch: Watch, record, caller: str):
        try:
            async for chunk in events_of(r, job_id, watch, record, caller):
                yield chunk
        except Exception:  # noqa: BLE001 - end with an event that says so, never with a cut body
            log.exception("the event stream of job %s failed", job_id)
            yield sse("failed", {"id": job_id, "error": "internal_error",
                                 "message": f"the progress stream failed; GET /jobs/{job_id} says how the job is"})
        finally:
            hub.unwatch(job_id, watch)

    async def events_of(r: aioredis.Redis, job_id: str, watch: Watch, record, caller: str):
        st, fields = record
        sent: tuple | None = None
        now = time.monotonic()
        last_write, last_progress, last_position = now, -1e9, -1e9
        reread_at: float | None = None  # when to read the job's record again (None: no need)
        down_since: float | None = None  # when Redis was first found unreachable (None: it answers)
        backoff = 0.1
        while True:
            if st.status in ("done", "failed"):
                yield job_end_event(st)
                return
            watch.changed.clear()  # from here on, any message for this stream wakes the wait below
            now = time.monotonic()
            wait_s = SSE_KEEPALIVE_S - (now - last_write)
            if watch.ended or watch.reread:  # the job ended, or the subscription was remade: read it now
                watch.ended = watch.reread = False
                reread_at = now
            if watch.progress is not None:
                if watch.progress != sent:
                    if now - last_progress >= SSE_MIN_INTERVAL_S:
                        sent, last_progress, last_write = watch.progress, now, now
                        yield sse("progress", {"id": job_id, "step": sent[0], "steps": sent[1]})
                    else:  # coalesce: the newest step goes out when the interval has passed
                        wait_s = min(wait_s, SSE_MIN_INTERVAL_S - (now - last_progress))
            elif watch.queue_moved and down_since is None:
                if now - last_position >= POSITION_INTERVAL_S:
                    watch.queue_moved, last_position = False, now
                    try:
                        queued = await queue_position(r, fields)
                    except REDIS_DOWN:
                        watch.queue_moved, reread_at = True, now  # the reread below waits for Redis
                    else:
                        if queued != sent:
                            sent, last_write = queued, time.monotonic()
                            yield sse("queued", {"id": job_id, "position": queued[0], "estimated_start_s": queued[1]})
                else:
                    wait_s = min(wait_s, POSITION_INTERVAL_S - (now - last_position))
            now = time.monotonic()
            if reread_at is not None:
                wait_s = min(wait_s, reread_at - now)
            if wait_s > 0:
                try:
                    await asyncio.wait_for(watch.changed.wait(), wait_s)
                    continue  # a message: look at what it says
                except TimeoutError:
                    pass
            now = time.monotonic()
            if now - last_write >= SSE_KEEPALIVE_S:  # a quiet while: keep proxies from closing the stream, and
                yield b": keep-alive\n\n"  # read the status again in case a message was lost
                last_write = now
                reread_at = now if reread_at is None else reread_at
            if reread_at is None or now < reread_at:
                continue
            try:
                again = await job_record(r, job_id, caller)
            except REDIS_DOWN as err:  # wait for Redis (the hub's resubscription wakes us), then read again
                down_since = down_since or now
                if now - down_since >= SSE_OUTAGE_LIMIT_S:
                    yield sse("failed", {"id": job_id, "error": "unavailable", "message": (
                        f"Redis has been unreachable for {now - down_since:.0f} s ({type(err).__name__}); the job "
                        f"may still finish: GET /jobs/{job_id}")})
                    return
                reread_at, backoff = now + backoff, min(2 * backoff, 2.0)
                continue
            down_since, reread_at, backoff = None, None, 0.1
            if again is None:
                yield sse("failed", {"id": job_id, "error": "lost", "message": LOST})
                return
            st, fields = again

    async def queue_position(r: aioredis.Redis, fields: dict[str, str]) -> tuple[int | None, float | None]:
        """(jobs ahead not yet started, estimated seconds to start) of a queued job: an estimate; (None, None)
        while no worker has made the consumer group (none has run: nothing to estimate from)."""
        if "enqueued_at" not in fields:
            return None, None
        ms = int(float(fields["enqueued_at"]) * 1000)
        pipe = r.pipeline(transaction=False)
        pipe.xrange(keys.stream, "-", str(ms - 1), count=settings.max_queue_length + 1000)
        pipe.xpending(keys.stream, GROUP)
        try:
            older, pending = await pipe.execute()
        except ResponseError as err:
            if "NOGROUP" in str(err):
                return None, None
            raise
        position = max(0, len(older) - int(pending["pending"]))  # entries ahead minus the ones being run
        workers = await live_workers(r, keys, settings.heartbeat_ttl_s)
        return position, estimated_start_s(position, older, workers)

    def job_end_event(st: JobStatus) -> bytes:
        if st.status == "done":
            return sse("done", {"id": st.id, "image_url": f"/jobs/{st.id}/image", "status_url": f"/jobs/{st.id}",
                                "queue_ms": st.queue_ms, "compute_ms": st.compute_ms, "cache": st.cache})
        return sse("failed", {"id": st.id, "error": st.error or "failed", "message": st.message or "generation failed"})


def estimated_start_s(position: int, older: list, workers: list[dict]) -> float | None:
    """Seconds until a job `position` places back starts: from the images/s the workers delivered, or,
    before any has finished an image, from their calibrated speed (row-steps per second, heartbeat `rate`)
    and the mean cost of the entries ahead. None with no live worker."""
    images_per_s = sum(w.get("images_per_s", 0.0) for w in workers)
    if images_per_s > 0:
        return round(position / images_per_s, 2)
    fleet = FleetRate.of([w.get("rate") for w in workers])
    costs = [float(fields.get(b"cost", fields.get("cost", 0)) or 0) for _, fields in older]
    if fleet is None or not costs or sum(costs) <= 0:
        return None
    return round(position * (sum(costs) / len(costs)) / fleet.rows_per_s, 2)

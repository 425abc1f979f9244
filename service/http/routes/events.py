"""GET /jobs/{id}/events: a job's live progress as Server-Sent Events (relayed by service/store/progress.py)."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from service.http.errors import ERRORS, error
from service.http.schemas import ErrorBody, JobStatus
from service.settings import Settings
from service.store.heartbeats import live_workers
from service.store.jobs import GROUP, Keys
from service.store.progress import EventHub, Watch, sse

SSE_KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing a quiet stream
SSE_MIN_INTERVAL_S = 0.2  # progress reaches a client at most 5 times a second


def add_event_routes(app: FastAPI, settings: Settings, keys: Keys, guard, job_record) -> None:
    """`job_record(r, job_id, caller)` reads a job's (status, raw fields), None for another key's job,
    as the API's other job routes do."""

    @app.get("/jobs/{job_id}/events", response_class=StreamingResponse, responses={
        200: {"content": {"text/event-stream": {}}, "description": (
            "Server-Sent Events: `queued` {position, estimated_start_s}, `progress` {step, steps} (at most "
            "4 a second), then `done` {image_url, ...} or `failed` {error, message}; the stream then ends.")},
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
        st, fields = record
        sent: tuple | None = None
        last_position_check = -1e9
        try:
            while True:
                if st.status in ("done", "failed"):
                    yield job_end_event(st)
                    return
                if watch.progress is not None:
                    if watch.progress != sent:
                        sent = watch.progress
                        yield sse("progress", {"id": job_id, "step": sent[0], "steps": sent[1]})
                elif watch.queue_moved and time.monotonic() - last_position_check >= 1.0:
                    watch.queue_moved, last_position_check = False, time.monotonic()
                    queued = await queue_position(r, fields)
                    if queued != sent:
                        sent = queued
                        yield sse("queued", {"id": job_id, "position": queued[0], "estimated_start_s": queued[1]})
                watch.changed.clear()
                # Wake on a message for this job; a queued stream rechecks its position at most once a second.
                recheck = watch.ended
                try:
                    await asyncio.wait_for(watch.changed.wait(), 1.0 if watch.queue_moved else SSE_KEEPALIVE_S)
                    recheck = watch.ended
                except TimeoutError:
                    if not watch.queue_moved:  # a quiet while: keep proxies from closing the stream, and
                        yield b": keep-alive\n\n"  # read the status again in case a message was lost
                        recheck = True
                if recheck:
                    watch.ended = False
                    again = await job_record(r, job_id, caller)
                    if again is None:
                        yield sse("failed", {"id": job_id, "error": "expired", "message": "the job expired"})
                        return
                    st, fields = again
                await asyncio.sleep(SSE_MIN_INTERVAL_S)  # coalesce: at most a few events a second
        finally:
            hub.unwatch(job_id, watch)

    async def queue_position(r: aioredis.Redis, fields: dict[str, str]) -> tuple[int | None, float | None]:
        """(jobs ahead not yet started, estimated seconds to start) of a queued job: an estimate."""
        if "enqueued_at" not in fields:
            return None, None
        ms = int(float(fields["enqueued_at"]) * 1000)
        pipe = r.pipeline(transaction=False)
        pipe.xrange(keys.stream, "-", str(ms - 1), count=settings.max_queue_length + 1000)
        pipe.xpending(keys.stream, GROUP)
        older, pending = await pipe.execute()
        position = max(0, len(older) - int(pending["pending"]))  # entries ahead minus the ones being run
        rate = sum(w.get("images_per_s", 0.0) for w in await live_workers(r, keys, settings.heartbeat_ttl_s))
        return position, (round(position / rate, 2) if rate > 0 else None)

    def job_end_event(st: JobStatus) -> bytes:
        if st.status == "done":
            return sse("done", {"id": st.id, "image_url": f"/jobs/{st.id}/image", "status_url": f"/jobs/{st.id}",
                                "queue_ms": st.queue_ms, "compute_ms": st.compute_ms, "cache": st.cache})
        return sse("failed", {"id": st.id, "error": st.error or "failed", "message": st.message or "generation failed"})

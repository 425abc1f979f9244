"""POST /generate (wait for the PNG), POST /jobs (queue and answer at once), GET /jobs/{id} and its image."""

from __future__ import annotations

import asyncio
import json
import time

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from service import metrics
from service.http.admission import Verdict
from service.http.auth import Guard
from service.http.errors import ERRORS, error
from service.http.schemas import ErrorBody, GenerateRequest, JobAccepted, JobStatus, resolve_class, resolve_preset
from service.http.waiter import ResultWaiter
from service.model_watch import ModelWatcher
from service.settings import Settings
from service.store.capacity import row_steps
from service.store.jobs import Job, Keys, ResultMeta, result_key

PNG = "image/png"
LOST = ("the job's record is gone from Redis (it restarted without its data?); the image was not made: "
        "send the request again")
MAX_ECHO = 64  # longest client-sent id an error message repeats


def echo(text: str) -> str:
    return repr(text) if len(text) <= MAX_ECHO else repr(text[:MAX_ECHO]) + f"... ({len(text)} characters)"


def png_response(png: bytes, meta: ResultMeta, job_id: str, seed: int, cached: bool) -> Response:
    """The PNG with this request's own timings. A cache hit queued and computed nothing
    (0 ms, batch size 0); the timings of the request that made the image go in X-Original-*."""
    headers = {
        "X-Request-Id": job_id,
        "X-Seed": str(seed),
        "X-Queue-Ms": "0.0" if cached else f"{meta.queue_ms:.1f}",
        "X-Compute-Ms": "0.0" if cached else f"{meta.compute_ms:.1f}",
        "X-Batch-Size": "0" if cached else str(meta.batch_size),
        "X-Model-Version": meta.model_version,
        "X-Cache": "hit" if cached else "miss",
    }
    if cached:
        headers.update({"X-Original-Queue-Ms": f"{meta.queue_ms:.1f}", "X-Original-Compute-Ms": f"{meta.compute_ms:.1f}",
                        "X-Original-Batch-Size": str(meta.batch_size)})
    return Response(png, media_type=PNG, headers=headers)


async def read_job(r: aioredis.Redis, keys: Keys, owner: str, job_id: str) -> tuple[JobStatus, dict[str, str]] | None:
    """The job's status and its raw fields (result `key`, `seed`), in one read; None for another key's job."""
    data = await r.hgetall(keys.job(job_id))
    if not data:
        return None
    d = {k.decode(): v.decode() for k, v in data.items()}
    if d.get("owner", "") != owner:
        return None
    meta = json.loads(d["meta"]) if "meta" in d else {}
    if d.get("cache") == "hit":  # answered from the cache: this job queued and computed nothing
        meta = {**meta, "queue_ms": 0.0, "compute_ms": 0.0, "batch_size": 0}
    st = JobStatus(id=job_id, status=d.get("status", "queued"), error=d.get("error"),
                   message=d.get("message"), queue_ms=meta.get("queue_ms"),
                   compute_ms=meta.get("compute_ms"), batch_size=meta.get("batch_size"),
                   model_version=meta.get("model_version"), cache=d.get("cache", "miss"))
    return st, d


def add_job_routes(app: FastAPI, settings: Settings, keys: Keys, model: ModelWatcher, auth: Guard, guard) -> None:
    """`guard`: the dependency that authenticates a caller (its key), `auth`: the Guard behind it."""

    async def make_job(req: GenerateRequest, reply_to: str) -> Job:
        model.poll()
        spec, version = model.spec, model.version
        class_id = resolve_class(spec, req.class_label)
        preset = resolve_preset(spec, req)
        return Job(class_id=class_id, seed=req.seed, preset=preset,
                   key=result_key(version, class_id, req.seed, preset),
                   deadline=time.time() + settings.request_timeout_s, reply_to=reply_to, cost=row_steps(preset))

    async def cached(r: aioredis.Redis, key: str) -> tuple[bytes, ResultMeta] | None:
        png, meta = await r.hmget(keys.result(key), ["png", "meta"])
        if png is None or meta is None:
            return None
        return png, ResultMeta.from_json(meta)

    async def enqueue(request: Request, job: Job, endpoint: str, caller: str) -> Verdict | JSONResponse:
        """Admit the job (service/http/admission.py), or the refusal to answer with."""
        fields = {"status": "queued", "key": job.key, "seed": job.seed, "enqueued_at": repr(job.enqueued_at),
                  "owner": auth.owner(caller)}
        verdict = await request.app.state.admission.admit(job, fields, need_worker=endpoint == "generate")
        if verdict.accepted or verdict.outcome == "cached":
            return verdict
        metrics.REQUEST_FAILURE.labels(endpoint, verdict.outcome).inc()
        if verdict.outcome == "too_long":
            return error(422, "invalid_request", verdict.message,
                         [{"field": "steps", "message": verdict.message, "type": "too_long"}])
        status, code = {"no_worker": (503, "no_worker"), "full": (429, "queue_full")}.get(
            verdict.outcome, (429, "over_capacity"))
        return error(status, code, verdict.message, headers={"Retry-After": str(verdict.retry_after)})

    async def job_record(r: aioredis.Redis, job_id: str, caller: str) -> tuple[JobStatus, dict[str, str]] | None:
        return await read_job(r, keys, auth.owner(caller), job_id)

    def failure_response(st: JobStatus, endpoint: str) -> JSONResponse:
        metrics.REQUEST_FAILURE.labels(endpoint, st.error or "failed").inc()
        if st.error == "timeout":
            return error(504, "timeout", st.message or "the request timed out")
        if st.error == "lost":
            return error(503, "lost", st.message or LOST, headers={"Retry-After": "1"})
        return error(500, st.error or "failed", st.message or "generation failed")

    @app.post("/generate", response_class=Response, responses={
        200: {"content": {PNG: {}}, "description": "The PNG."},
        **ERRORS, 500: {"model": ErrorBody}, 503: {"model": ErrorBody}, 504: {"model": ErrorBody}})
    async def generate(req: GenerateRequest, request: Request, caller: str = guard):
        """Generate one image and answer with the PNG once it is ready."""
        start = time.perf_counter()
        r: aioredis.Redis = request.app.state.redis
        waiter: ResultWaiter = request.app.state.waiter
        job = await make_job(req, waiter.channel)
        hit = await cached(r, job.key)
        if hit:
            metrics.CACHE_HITS.inc()
            metrics.REQUEST_SUCCESS.labels("generate").inc()
            return png_response(hit[0], hit[1], job.id, job.seed, cached=True)
        fut = waiter.register(job.id)
        try:
            verdict = await enqueue(request, job, "generate", caller)
            if isinstance(verdict, JSONResponse):
                return verdict
            waiter.queued(job.id)
            if verdict.outcome == "cached":  # stored between our first look and the admission
                hit = await cached(r, job.key)
                if not hit:
                    return error(503, "unavailable", "the result expired as it was read; retry",
                                 headers={"Retry-After": "1"})
                metrics.CACHE_HITS.inc()
                metrics.REQUEST_SUCCESS.labels("generate").inc()
                return png_response(hit[0], hit[1], job.id, job.seed, cached=True)
            try:
                reply = await asyncio.wait_for(fut, timeout=settings.request_timeout_s + 2.0)
            except asyncio.TimeoutError:
                metrics.REQUEST_FAILURE.labels("generate", "timeout").inc()
                return error(504, "timeout", f"no result within {settings.request_timeout_s:g} s")
        finally:
            waiter.forget(job.id)
        if reply is not None and reply.png is not None:  # the worker sent the image with its wake-up
            metrics.REQUEST_SUCCESS.labels("generate").inc()
            metrics.REQUEST_DURATION.observe(time.perf_counter() - start)
            return png_response(reply.png, ResultMeta.from_json(reply.status["meta"]), job.id, job.seed, cached=False)
        record = await job_record(r, job.id, caller)
        if record is None or record[0].status != "done":
            return failure_response(record[0] if record else JobStatus(id=job.id, status="failed", error="lost"),
                                    "generate")
        hit = await cached(r, record[1]["key"])  # the worker's key: the version that really made it
        if not hit:
            return error(500, "lost", "the result expired before it could be read")
        metrics.REQUEST_SUCCESS.labels("generate").inc()
        metrics.REQUEST_DURATION.observe(time.perf_counter() - start)
        return png_response(hit[0], hit[1], job.id, job.seed, cached=False)

    @app.post("/jobs", status_code=202, response_model=JobAccepted,
              responses={**ERRORS, 503: {"model": ErrorBody}})
    async def submit(req: GenerateRequest, request: Request, caller: str = guard):
        """Queue a job and answer at once; poll /jobs/{id}, fetch /jobs/{id}/image."""
        r: aioredis.Redis = request.app.state.redis
        job = await make_job(req, reply_to="")
        hit = await cached(r, job.key)
        if not hit:
            verdict = await enqueue(request, job, "jobs", caller)
            if isinstance(verdict, JSONResponse):
                return verdict
            if verdict.outcome == "cached":  # stored between our first look and the admission
                hit = await cached(r, job.key)
        if hit:
            metrics.CACHE_HITS.inc()
            pipe = r.pipeline(transaction=True)
            pipe.hset(keys.job(job.id), mapping={"status": "done", "key": job.key, "seed": job.seed, "cache": "hit",
                                                 "meta": hit[1].to_json(), "owner": auth.owner(caller)})
            pipe.expire(keys.job(job.id), settings.result_ttl_s)
            await pipe.execute()
            status = "done"
        else:
            status = "queued"
        return JobAccepted(id=job.id, status=status, status_url=f"/jobs/{job.id}", image_url=f"/jobs/{job.id}/image")

    @app.get("/jobs/{job_id}", response_model=JobStatus, responses={**ERRORS, 404: {"model": ErrorBody}})
    async def get_job(job_id: str, request: Request, caller: str = guard):
        record = await job_record(request.app.state.redis, job_id[:MAX_ECHO], caller)
        if record is None:
            return error(404, "not_found", f"no job {echo(job_id)} (unknown or expired)")
        return record[0]

    @app.get("/jobs/{job_id}/image", response_class=Response,
             responses={200: {"content": {PNG: {}}}, **ERRORS, 404: {"model": ErrorBody}, 409: {"model": ErrorBody},
                        500: {"model": ErrorBody}, 504: {"model": ErrorBody}})
    async def get_job_image(job_id: str, request: Request, caller: str = guard):
        r = request.app.state.redis
        record = await job_record(r, job_id[:MAX_ECHO], caller)
        if record is None:
            return error(404, "not_found", f"no job {echo(job_id)} (unknown or expired)")
        st, fields = record
        if st.status == "failed":
            return failure_response(st, "jobs")
        if st.status != "done":
            return error(409, "not_ready", f"job is {st.status}", headers={"Retry-After": "1"})
        hit = await cached(r, fields["key"])
        if not hit:
            return error(404, "expired", "the image expired")
        return png_response(hit[0], hit[1], job_id, int(fields.get("seed", 0)), cached=fields.get("cache") == "hit")

"""POST /generate (wait for the image), POST /jobs (queue and answer at once), GET /jobs/{id} and its image.

The image comes as PNG, WebP or JPEG: the body's `output_format`, else the Accept header's favourite
(q-values honoured); 406 when the header accepts none of them (service/http/generation.py).
"""

from __future__ import annotations

import json
import time

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from service import metrics
from service.http.auth import Guard
from service.http.errors import ERRORS, error
from service.http.generation import Generator, Refusal, choose_format, failure, format_fields
from service.http.schemas import ErrorBody, GenerateRequest, JobAccepted, JobStatus
from service.image_formats import MEDIA_TYPES, OutputFormat
from service.model_watch import ModelWatcher
from service.settings import Settings
from service.store.jobs import Keys, ResultMeta

PNG = "image/png"
IMAGE_CONTENT = {media: {} for media in MEDIA_TYPES.values()}  # what an image answer's OpenAPI lists
MAX_ECHO = 64  # longest client-sent id an error message repeats


def echo(text: str) -> str:
    return repr(text) if len(text) <= MAX_ECHO else repr(text[:MAX_ECHO]) + f"... ({len(text)} characters)"


def image_response(blob: bytes, media_type: str, meta: ResultMeta, job_id: str, seed: int, cached: bool) -> Response:
    """The image with this request's own timings. A cache hit queued and computed nothing
    (0 ms, batch size 0); the timings of the request that made the image go in X-Original-*.
    `Vary: Accept`: the same URL answers other formats to other Accept headers."""
    headers = {
        "X-Request-Id": job_id,
        "X-Seed": str(seed),
        "X-Queue-Ms": "0.0" if cached else f"{meta.queue_ms:.1f}",
        "X-Compute-Ms": "0.0" if cached else f"{meta.compute_ms:.1f}",
        "X-Batch-Size": "0" if cached else str(meta.batch_size),
        "X-Model-Version": meta.model_version,
        "X-Cache": "hit" if cached else "miss",
        "Vary": "Accept",
    }
    if cached:
        headers.update({"X-Original-Queue-Ms": f"{meta.queue_ms:.1f}", "X-Original-Compute-Ms": f"{meta.compute_ms:.1f}",
                        "X-Original-Batch-Size": str(meta.batch_size)})
    return Response(blob, media_type=media_type, headers=headers)


def refused(ref: Refusal) -> JSONResponse:
    """A Refusal in this API's own error shape (the OpenAI route has its own)."""
    detail = [{"field": ref.field, "message": ref.message, "type": ref.kind or ref.code}] if ref.field else None
    return error(ref.status, ref.code, ref.message, detail, headers=ref.headers or None)


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


def add_job_routes(app: FastAPI, settings: Settings, keys: Keys, model: ModelWatcher, auth: Guard, guard) -> Generator:
    """`guard`: the dependency that authenticates a caller (its key), `auth`: the Guard behind it.
    Returns the Generator the routes use (the OpenAI route shares it)."""
    gen = Generator(settings, keys, model, auth)

    async def job_record(r: aioredis.Redis, job_id: str, caller: str) -> tuple[JobStatus, dict[str, str]] | None:
        return await read_job(r, keys, auth.owner(caller), job_id)

    async def answer(r: aioredis.Redis, key: str, png: bytes, fmt: OutputFormat, meta: ResultMeta, job_id: str,
                     seed: int, cached: bool) -> Response:
        blob = await gen.encoded(r, key, png, fmt)
        return image_response(blob, fmt.media_type, meta, job_id, seed, cached)

    image_responses = {200: {"content": IMAGE_CONTENT, "description": (
        "The image: PNG, WebP (lossless unless output_compression < 100) or JPEG, by `output_format` or the "
        "Accept header.")}, 406: {"model": ErrorBody, "description": "The Accept header accepts no format we make."}}

    @app.post("/generate", response_class=Response, responses={
        **image_responses, **ERRORS, 500: {"model": ErrorBody}, 503: {"model": ErrorBody}, 504: {"model": ErrorBody}})
    async def generate(req: GenerateRequest, request: Request, caller: str = guard):
        """Generate one image and answer with it once it is ready (PNG unless asked otherwise)."""
        start = time.perf_counter()
        fmt = choose_format(request.headers.get("accept"), req.output_format, req.output_compression, strict=True)
        if isinstance(fmt, Refusal):
            return refused(fmt)
        job = gen.make_job(req.class_label, req.seed, req, request.app.state.waiter.channel)
        made = await gen.run(request, job, "generate", caller, job_record)
        if isinstance(made, Refusal):
            return refused(made)
        if not made.cached:
            metrics.REQUEST_DURATION.observe(time.perf_counter() - start)
        return await answer(request.app.state.redis, made.key, made.png, fmt, made.meta, job.id, job.seed, made.cached)

    @app.post("/jobs", status_code=202, response_model=JobAccepted,
              responses={**ERRORS, 503: {"model": ErrorBody}})
    async def submit(req: GenerateRequest, request: Request, caller: str = guard):
        """Queue a job and answer at once; poll /jobs/{id}, fetch /jobs/{id}/image (in `output_format` unless
        its Accept header says otherwise)."""
        r: aioredis.Redis = request.app.state.redis
        job = gen.make_job(req.class_label, req.seed, req, reply_to="")
        extra = format_fields(req.output_format, req.output_compression)
        hit = await gen.cached(r, job.key)
        if not hit:
            outcome = await gen.enqueue(request, job, "jobs", caller, extra)
            if isinstance(outcome, Refusal):
                return refused(outcome)
            if outcome == "cached":  # stored between our first look and the admission
                hit = await gen.cached(r, job.key)
        if hit:
            metrics.CACHE_HITS.inc()
            await gen.record_hit(r, job, hit[1], caller, extra)
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
             responses={**image_responses, **ERRORS, 404: {"model": ErrorBody}, 409: {"model": ErrorBody},
                        500: {"model": ErrorBody}, 504: {"model": ErrorBody}})
    async def get_job_image(job_id: str, request: Request, caller: str = guard):
        """The job's image: in the format its request asked for, unless the Accept header prefers another."""
        r = request.app.state.redis
        record = await job_record(r, job_id[:MAX_ECHO], caller)
        if record is None:
            return error(404, "not_found", f"no job {echo(job_id)} (unknown or expired)")
        st, fields = record
        if st.status == "failed":
            return refused(failure(st, "jobs"))
        if st.status != "done":
            return error(409, "not_ready", f"job is {st.status}", headers={"Retry-After": "1"})
        quality = fields.get("output_compression")
        fmt = choose_format(request.headers.get("accept"), fields.get("output_format"),
                            int(quality) if quality else None, strict=False)
        if isinstance(fmt, Refusal):
            return refused(fmt)
        hit = await gen.cached(r, fields["key"])
        if not hit:
            return error(404, "expired", "the image expired")
        return await answer(r, fields["key"], hit[0], fmt, hit[1], job_id, int(fields.get("seed", 0)),
                            cached=fields.get("cache") == "hit")

    return gen

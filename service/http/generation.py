"""One image from request to bytes, shared by /generate, /jobs and /v1/images/generations.

A request becomes a job (class, seed, sampler, content-addressed result key), is answered from the
result cache or admitted into the queue (service/http/admission.py), and waited for; a refusal is a
`Refusal` that each route writes in its own error shape. `encoded` turns the cached PNG into the
format asked for (service/image_formats.py), keeping the encoded bytes in the cache under a key
that names the format.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import redis.asyncio as aioredis
from fastapi import Request

from service import image_formats, metrics
from service.http.auth import Guard
from service.http.schemas import JobStatus, SamplerChoice, resolve_class, resolve_preset
from service.http.waiter import ResultWaiter
from service.image_formats import OutputFormat
from service.model_watch import ModelWatcher
from service.settings import Settings
from service.store.capacity import row_steps
from service.store.jobs import Job, Keys, ResultMeta, result_key


@dataclass
class Refusal:
    """Why a request gets no image: its HTTP status, error code, message, the field at fault."""

    status: int
    code: str
    message: str
    field: str | None = None
    headers: dict[str, str] = dataclass_field(default_factory=dict)
    kind: str = ""  # the detail's `type` (default: the code)


@dataclass
class Made:
    """A finished image: the PNG, how it was made, and whether the cache answered."""

    job: Job
    png: bytes
    meta: ResultMeta
    cached: bool
    key: str  # the result key that really holds it (the worker's: the model version that made it)


class Generator:
    def __init__(self, settings: Settings, keys: Keys, model: ModelWatcher, auth: Guard):
        self.s, self.keys, self.model, self.auth = settings, keys, model, auth

    def make_job(self, label: int | str, seed: int, sampler: SamplerChoice, reply_to: str) -> Job:
        """FieldError (class_label, preset, ...) for what the model does not have."""
        self.model.poll()
        spec, version = self.model.spec, self.model.version
        class_id = resolve_class(spec, label)
        preset = resolve_preset(spec, sampler)
        return Job(class_id=class_id, seed=seed, preset=preset, key=result_key(version, class_id, seed, preset),
                   deadline=time.time() + self.s.request_timeout_s, reply_to=reply_to, cost=row_steps(preset))

    async def cached(self, r: aioredis.Redis, key: str) -> tuple[bytes, ResultMeta] | None:
        png, meta = await r.hmget(self.keys.result(key), ["png", "meta"])
        if png is None or meta is None:
            return None
        return png, ResultMeta.from_json(meta)

    async def enqueue(self, request: Request, job: Job, endpoint: str, caller: str,
                      extra: dict | None = None) -> Refusal | str:
        """Admit the job: its outcome (queued, follow, exists, cached), or the Refusal.
        `extra`: more fields of the job's record (its output format)."""
        fields = {"status": "queued", "key": job.key, "seed": job.seed, "enqueued_at": repr(job.enqueued_at),
                  "owner": self.auth.owner(caller), **(extra or {})}
        verdict = await request.app.state.admission.admit(job, fields, need_worker=endpoint != "jobs")
        if verdict.accepted or verdict.outcome == "cached":
            return verdict.outcome
        metrics.REQUEST_FAILURE.labels(endpoint, verdict.outcome).inc()
        if verdict.outcome == "too_long":
            return Refusal(422, "invalid_request", verdict.message, field="steps", kind="too_long")
        status, code = {"no_worker": (503, "no_worker"), "full": (429, "queue_full")}.get(
            verdict.outcome, (429, "over_capacity"))
        return Refusal(status, code, verdict.message, headers={"Retry-After": str(verdict.retry_after)})

    async def record_hit(self, r: aioredis.Redis, job: Job, meta: ResultMeta, caller: str,
                         extra: dict | None = None) -> None:
        """A job answered from the cache gets a record too, so /jobs/{id} and its image work for it."""
        pipe = r.pipeline(transaction=True)
        pipe.hset(self.keys.job(job.id), mapping={
            "status": "done", "key": job.key, "seed": job.seed, "cache": "hit", "meta": meta.to_json(),
            "owner": self.auth.owner(caller), **(extra or {})})
        pipe.expire(self.keys.job(job.id), self.s.result_ttl_s)
        await pipe.execute()

    async def run(self, request: Request, job: Job, endpoint: str, caller: str, read_job,
                  extra: dict | None = None, keep_record: bool = False) -> Made | Refusal:
        """Answer from the cache, or queue the job and wait for its end. `read_job(r, job_id, caller)`
        reads a job's record; `keep_record`: a cache hit writes one too (for /jobs/{id}/image)."""
        r: aioredis.Redis = request.app.state.redis
        waiter: ResultWaiter = request.app.state.waiter
        hit = await self.cached(r, job.key)
        if hit:
            return await self._hit(r, job, hit, endpoint, caller, extra, keep_record)
        fut = waiter.register(job.id)
        try:
            outcome = await self.enqueue(request, job, endpoint, caller, extra)
            if isinstance(outcome, Refusal):
                return outcome
            waiter.queued(job.id)  # in Redis now: a record found gone later means Redis lost the job
            if outcome == "cached":  # stored between our first look and the admission
                hit = await self.cached(r, job.key)
                if not hit:
                    return Refusal(503, "unavailable", "the result expired as it was read; retry",
                                   headers={"Retry-After": "1"})
                return await self._hit(r, job, hit, endpoint, caller, extra, keep_record)
            try:
                reply = await asyncio.wait_for(fut, timeout=self.s.request_timeout_s + 2.0)
            except asyncio.TimeoutError:
                metrics.REQUEST_FAILURE.labels(endpoint, "timeout").inc()
                return Refusal(504, "timeout", f"no result within {self.s.request_timeout_s:g} s")
        finally:
            waiter.forget(job.id)
        if reply is not None and reply.png is not None:  # the worker sent the image with its wake-up
            metrics.REQUEST_SUCCESS.labels(endpoint).inc()
            return Made(job, reply.png, ResultMeta.from_json(reply.status["meta"]), cached=False,
                        key=reply.status.get("key") or job.key)
        record = await read_job(r, job.id, caller)
        if record is None or record[0].status != "done":
            return failure(record[0] if record else JobStatus(id=job.id, status="failed", error="lost"), endpoint)
        hit = await self.cached(r, record[1]["key"])  # the worker's key: the version that really made it
        if not hit:
            return Refusal(500, "lost", "the result expired before it could be read")
        metrics.REQUEST_SUCCESS.labels(endpoint).inc()
        return Made(job, hit[0], hit[1], cached=False, key=record[1]["key"])

    async def _hit(self, r, job, hit, endpoint, caller, extra, keep_record) -> Made:
        metrics.CACHE_HITS.inc()
        metrics.REQUEST_SUCCESS.labels(endpoint).inc()
        if keep_record:
            await self.record_hit(r, job, hit[1], caller, extra)
        return Made(job, hit[0], hit[1], cached=True, key=job.key)

    async def encoded(self, r: aioredis.Redis, key: str, png: bytes, fmt: OutputFormat) -> bytes:
        """The result `key` (whose PNG is `png`) in `fmt`: from the cache, else encoded and cached."""
        if fmt.name == "png":
            return png
        cache_key = self.keys.result_format(key, fmt.tag)
        blob = await r.get(cache_key)
        if blob is not None:
            metrics.IMAGE_ENCODES.labels(fmt.name, "hit").inc()
            return blob
        blob = await asyncio.to_thread(image_formats.transcode, png, fmt)  # ms of CPU: off the event loop
        await r.set(cache_key, blob, ex=self.s.result_ttl_s)
        metrics.IMAGE_ENCODES.labels(fmt.name, "miss").inc()
        return blob


LOST = ("the job's record is gone from Redis (it restarted without its data?); the image was not made: "
        "send the request again")


def failure(st: JobStatus, endpoint: str) -> Refusal:
    metrics.REQUEST_FAILURE.labels(endpoint, st.error or "failed").inc()
    if st.error == "timeout":
        return Refusal(504, "timeout", st.message or "the request timed out")
    if st.error == "lost":
        return Refusal(503, "lost", st.message or LOST, headers={"Retry-After": "1"})
    return Refusal(500, st.error or "failed", st.message or "generation failed")


def choose_format(accept: str | None, wanted: str | None, quality: int | None, strict: bool) -> OutputFormat | Refusal:
    """The format of an image answer: the body's (or the job's) `wanted` if the Accept header allows it,
    else (`strict` False, or nothing wanted) the one the header likes most; 406 when it likes none we make."""
    try:
        name = image_formats.negotiate(accept, wanted)
    except image_formats.NotAcceptable as err:
        if strict or wanted is None:
            return Refusal(406, "not_acceptable", str(err), field="accept")
        try:
            name = image_formats.negotiate(accept, None)
        except image_formats.NotAcceptable as err2:
            return Refusal(406, "not_acceptable", str(err2), field="accept")
    return OutputFormat(name, quality if wanted is None or name == wanted else None)


def format_fields(fmt_name: str | None, quality: int | None) -> dict[str, str]:
    """What a job's record keeps of the format its request asked for (the default of its image URL)."""
    out = {}
    if fmt_name:
        out["output_format"] = fmt_name
    if quality is not None:
        out["output_compression"] = str(quality)
    return out

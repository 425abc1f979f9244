"""The HTTP API: validate, enqueue, wait for the wake-up, answer. Nothing else runs here."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import BusyLoadingError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service import batches, metrics
from service.auth import AuthError, Guard
from service.batches_api import add_batch_routes, background
from service.docs_ui import mount_docs
from service.errors import ERRORS, error
from service.events import EventHub
from service.events_api import add_event_routes
from service.heartbeats import live_workers
from service.jobs import Job, Keys, ResultMeta, result_key
from service.limits import BodySizeLimit
from service.model_watch import ModelWatcher
from service.schemas import (
    ApiView,
    ErrorBody,
    FieldError,
    GenerateRequest,
    JobAccepted,
    JobStatus,
    ModelInfo,
    WorkerInfo,
    resolve_class,
    resolve_preset,
)
from service.settings import Settings
from service.waiter import ResultWaiter

log = logging.getLogger("ldit.api")

PNG = "image/png"
REDIS_CONNECTIONS = 64  # per API process: commands are short, so a request waits a moment for one at most
REDIS_POOL_WAIT_S = 10.0  # longer than that: Redis is down or stuck, answered like an outage (503)
STATIC = Path(__file__).resolve().parent / "static"

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


def create_app(settings: Settings, model: ModelWatcher, redis_url: str) -> FastAPI:
    """The app; `model` gives the current bundle spec and version (hot-swapped checkpoints included)."""
    keys = Keys(settings.key_prefix)
    guard = Depends(Guard(settings, settings.key_prefix))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # A bounded pool where a request waits for a free connection: redis-py's default asyncio pool
        # refuses the 101st concurrent command ("Too many connections"), a 503 under a burst.
        pool = aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=REDIS_CONNECTIONS,
                                                        timeout=REDIS_POOL_WAIT_S, **redis_kwargs(settings))
        app.state.redis = aioredis.Redis(connection_pool=pool)
        app.state.waiter = ResultWaiter(app.state.redis, keys)
        app.state.events = EventHub(app.state.redis, keys)
        app.state.tasks = set()  # background work of this process (appending sample-set jobs)
        await app.state.waiter.start()
        await app.state.events.start()
        background(app, batches.resume_all(app.state.redis, keys, settings.batch_ttl_s))
        yield
        for task in list(app.state.tasks):
            task.cancel()
        await app.state.events.stop()
        await app.state.waiter.stop()
        await app.state.redis.aclose()
        await pool.aclose()

    app = FastAPI(title="LightningDiT service", version="0.1.0", lifespan=lifespan,
                  description="Class-conditional image generation with LightningDiT + VA-VAE.",
                  docs_url=None, redoc_url=None)  # served below from local assets (service/docs_ui.py)
    mount_docs(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origins.strip():
        app.add_middleware(CORSMiddleware, allow_origins=[o.strip() for o in settings.cors_origins.split(",")],
                           allow_methods=["GET", "POST"], allow_headers=["*"])

    @app.middleware("http")
    async def access_log(request: Request, call_next):
        """One structured line per request (info level: off by default), keyed by the request id,
        and the request counted by route and status class (4xx included)."""
        start = time.perf_counter()
        endpoint = route_of(app, request.scope)
        try:
            response = await call_next(request)
        except Exception:
            metrics.HTTP_REQUESTS.labels(endpoint, "5xx").inc()
            raise
        metrics.HTTP_REQUESTS.labels(endpoint, f"{response.status_code // 100}xx").inc()
        if not response.headers.get("X-Request-Id"):
            response.headers["X-Request-Id"] = uuid.uuid4().hex
        log.info("request", extra={
            "request_id": response.headers["X-Request-Id"], "method": request.method, "path": request.url.path,
            "status": response.status_code, "ms": round(1000 * (time.perf_counter() - start), 1)})
        return response

    # -- errors: always JSON, never a stack trace ---------------------------------------
    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        detail = []
        for e in exc.errors():
            loc = [str(p) for p in e.get("loc", ()) if p != "body"]
            # loc[0] is the top-level field; further parts are union-member tags.
            field = loc[0] if loc and e.get("type") != "json_invalid" else "body"
            detail.append({"field": field, "message": e.get("msg", "invalid"), "type": e.get("type", "")})
        fields = ", ".join(sorted({d["field"] for d in detail}))
        return error(422, "invalid_request", f"invalid value for: {fields}", detail)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:  # FastAPI's "error parsing the body" (e.g. not UTF-8): bad input like any other
            return error(422, "invalid_request", "the body is not valid JSON",
                         [{"field": "body", "message": str(exc.detail), "type": "json_invalid"}])
        return error(exc.status_code, "http_error", str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(AuthError)
    async def on_auth(request: Request, exc: AuthError):
        metrics.REQUEST_FAILURE.labels(request.url.path.split("/")[1] or "root", exc.code).inc()
        return error(exc.status, exc.code, str(exc), headers=exc.headers)

    @app.exception_handler(FieldError)
    async def on_field(request: Request, exc: FieldError):
        return error(422, "invalid_request", str(exc), [{"field": exc.field, "message": str(exc), **exc.extra}])

    @app.exception_handler(aioredis.ConnectionError)
    @app.exception_handler(aioredis.TimeoutError)
    @app.exception_handler(BusyLoadingError)
    async def on_redis_down(request: Request, exc: Exception):
        log.warning("redis unavailable: %r", exc)
        return error(503, "unavailable", "the job queue is unreachable; retry shortly", headers={"Retry-After": "2"})

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error(500, "internal_error", "internal error")

    # -- helpers ------------------------------------------------------------------------
    async def make_job(req: GenerateRequest, reply_to: str) -> Job:
        model.poll()
        spec, version = model.spec, model.version
        class_id = resolve_class(spec, req.class_label)
        preset = resolve_preset(spec, req)
        return Job(class_id=class_id, seed=req.seed, preset=preset,
                   key=result_key(version, class_id, req.seed, preset),
                   deadline=time.time() + settings.request_timeout_s, reply_to=reply_to)

    async def cached(r: aioredis.Redis, key: str) -> tuple[bytes, ResultMeta] | None:
        png, meta = await r.hmget(keys.result(key), ["png", "meta"])
        if png is None or meta is None:
            return None
        return png, ResultMeta.from_json(meta)

    async def enqueue(r: aioredis.Redis, job: Job, endpoint: str) -> JSONResponse | None:
        """Append the job, or answer 429 when the queue is full."""
        depth = await r.xlen(keys.stream)
        metrics.PENDING_REQUESTS.set(depth)
        if depth >= settings.max_queue_length:
            metrics.QUEUE_FULL.inc()
            metrics.REQUEST_FAILURE.labels(endpoint, "queue_full").inc()
            retry = max(1, math.ceil(depth / max(1, settings.max_batch_size)))
            return error(429, "queue_full", f"{depth} jobs are waiting; retry later",
                         headers={"Retry-After": str(retry)})
        pipe = r.pipeline(transaction=True)
        pipe.hset(keys.job(job.id), mapping={"status": "queued", "key": job.key, "seed": job.seed,
                                             "enqueued_at": repr(job.enqueued_at)})
        pipe.expire(keys.job(job.id), settings.result_ttl_s)
        pipe.xadd(keys.stream, job.to_fields(), maxlen=settings.stream_max_length, approximate=True)
        await pipe.execute()
        return None

    async def job_record(r: aioredis.Redis, job_id: str) -> tuple[JobStatus, dict[str, str]] | None:
        """The job's status and its raw fields (result `key`, `seed`), in one read."""
        data = await r.hgetall(keys.job(job_id))
        if not data:
            return None
        d = {k.decode(): v.decode() for k, v in data.items()}
        meta = json.loads(d["meta"]) if "meta" in d else {}
        if d.get("cache") == "hit":  # answered from the cache: this job queued and computed nothing
            meta = {**meta, "queue_ms": 0.0, "compute_ms": 0.0, "batch_size": 0}
        st = JobStatus(id=job_id, status=d.get("status", "queued"), error=d.get("error"),
                       message=d.get("message"), queue_ms=meta.get("queue_ms"),
                       compute_ms=meta.get("compute_ms"), batch_size=meta.get("batch_size"),
                       model_version=meta.get("model_version"), cache=d.get("cache", "miss"))
        return st, d

    def failure_response(st: JobStatus, endpoint: str) -> JSONResponse:
        metrics.REQUEST_FAILURE.labels(endpoint, st.error or "failed").inc()
        if st.error == "timeout":
            return error(504, "timeout", st.message or "the request timed out")
        return error(500, st.error or "failed", st.message or "generation failed")

    # -- routes -------------------------------------------------------------------------
    @app.post("/generate", response_class=Response, responses={
        200: {"content": {PNG: {}}, "description": "The PNG."},
        **ERRORS, 500: {"model": ErrorBody}, 503: {"model": ErrorBody}, 504: {"model": ErrorBody}})
    async def generate(req: GenerateRequest, request: Request, _caller: str = guard):
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
            refused = await enqueue(r, job, "generate")
            if refused:
                return refused
            try:
                await asyncio.wait_for(fut, timeout=settings.request_timeout_s + 2.0)
            except TimeoutError:
                metrics.REQUEST_FAILURE.labels("generate", "timeout").inc()
                return error(504, "timeout", f"no result within {settings.request_timeout_s:g} s")
        finally:
            waiter.forget(job.id)
        record = await job_record(r, job.id)
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
    async def submit(req: GenerateRequest, request: Request, _caller: str = guard):
        """Queue a job and answer at once; poll /jobs/{id}, fetch /jobs/{id}/image."""
        r: aioredis.Redis = request.app.state.redis
        job = await make_job(req, reply_to="")
        if hit := await cached(r, job.key):
            metrics.CACHE_HITS.inc()
            pipe = r.pipeline(transaction=True)
            pipe.hset(keys.job(job.id), mapping={"status": "done", "key": job.key, "seed": job.seed, "cache": "hit",
                                                 "meta": hit[1].to_json()})
            pipe.expire(keys.job(job.id), settings.result_ttl_s)
            await pipe.execute()
            status = "done"
        else:
            refused = await enqueue(r, job, "jobs")
            if refused:
                return refused
            status = "queued"
        return JobAccepted(id=job.id, status=status, status_url=f"/jobs/{job.id}", image_url=f"/jobs/{job.id}/image")

    @app.get("/jobs/{job_id}", response_model=JobStatus, responses={**ERRORS, 404: {"model": ErrorBody}})
    async def get_job(job_id: str, request: Request, _caller: str = guard):
        record = await job_record(request.app.state.redis, job_id[:64])
        if record is None:
            return error(404, "not_found", f"no job {job_id!r} (unknown or expired)")
        return record[0]

    @app.get("/jobs/{job_id}/image", response_class=Response,
             responses={200: {"content": {PNG: {}}}, **ERRORS, 404: {"model": ErrorBody}, 409: {"model": ErrorBody},
                        500: {"model": ErrorBody}, 504: {"model": ErrorBody}})
    async def get_job_image(job_id: str, request: Request, _caller: str = guard):
        r = request.app.state.redis
        record = await job_record(r, job_id[:64])
        if record is None:
            return error(404, "not_found", f"no job {job_id!r} (unknown or expired)")
        st, fields = record
        if st.status == "failed":
            return failure_response(st, "jobs")
        if st.status != "done":
            return error(409, "not_ready", f"job is {st.status}", headers={"Retry-After": "1"})
        hit = await cached(r, fields["key"])
        if not hit:
            return error(404, "expired", "the image expired")
        return png_response(hit[0], hit[1], job_id, int(fields.get("seed", 0)), cached=fields.get("cache") == "hit")

    add_event_routes(app, settings, keys, guard, job_record)
    add_batch_routes(app, settings, keys, model, guard)

    @app.get("/", include_in_schema=False)
    async def playground():
        """A small page to try the API from a browser."""
        page = STATIC / "index.html"
        if not page.is_file():
            return error(404, "not_found", "no playground page in this build")
        return FileResponse(page, media_type="text/html")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorBody}})
    async def readyz(request: Request):
        r: aioredis.Redis = request.app.state.redis
        try:
            await r.ping()
        except Exception:  # noqa: BLE001
            return error(503, "not_ready", "redis unreachable")
        fresh = await live_workers(r, keys, settings.heartbeat_ttl_s)
        if not fresh:
            return error(503, "not_ready", "no worker with a fresh heartbeat and a loaded engine")
        return {"status": "ready", "workers": len(fresh), "model_versions": sorted({w["model_version"] for w in fresh})}

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}})
    async def prometheus(request: Request):
        try:
            metrics.PENDING_REQUESTS.set(await request.app.state.redis.xlen(keys.stream))
        except Exception:  # noqa: BLE001 - still serve the other metrics
            pass
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model", response_model=ModelInfo)
    async def model_info(request: Request):
        """The model card: the bundle as this API reads it, and what each live worker really runs."""
        model.poll()
        spec, version = model.spec, model.version
        workers = await live_workers(request.app.state.redis, keys, settings.heartbeat_ttl_s)
        return ModelInfo(
            name=spec.name, version=version, num_classes=spec.num_classes, class_names=spec.class_names,
            resolution=served_resolution(settings, spec.image_size, workers), latent_shape=list(spec.latent_shape),
            presets={k: p.to_dict() for k, p in spec.presets.items()}, default_preset=spec.default_preset,
            api=ApiView(model_version=version, backend=settings.backend, precision=settings.precision),
            workers=[WorkerInfo(**{k: w[k] for k in WorkerInfo.model_fields if k in w}) for w in workers],
        )

    return app


def route_of(app: FastAPI, scope) -> str:
    """The route template a request matches ("/jobs/{job_id}"), a bounded metric label."""
    for route in app.router.routes:
        if route.matches(scope)[0] == Match.FULL:
            return getattr(route, "path", "other")
    return "other"


def served_resolution(settings: Settings, bundle_size: int, workers: list[dict]) -> int:
    """The images' size: what the live workers say they make (a simulated engine may make larger
    images than its bundle), else a simulated profile's `image_size` when this API is configured
    with one, else the bundle's."""
    sizes = {int(w["image_size"]) for w in workers if w.get("image_size")}
    if len(sizes) == 1:
        return sizes.pop()
    if settings.backend == "simulated":
        from engines.timing_profile import ProfileError, load_profile

        try:
            return load_profile(settings.simulated_profile).image_size or bundle_size
        except ProfileError:  # the worker refuses it loudly; the model card keeps the bundle's size
            return bundle_size
    return bundle_size


def redis_kwargs(settings: Settings) -> dict:
    kw: dict = {"socket_connect_timeout": 5, "health_check_interval": 10}
    if settings.redis_password_file:
        kw["password"] = settings.redis_password_file.read_text().strip()
    return kw

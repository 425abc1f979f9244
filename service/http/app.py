"""The HTTP API: validate, admit, wait for the wake-up, answer. Nothing else runs here."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import BusyLoadingError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service import metrics
from service.batches import sets as batches
from service.batches import upkeep as batch_upkeep
from service.http.access_log import AccessLog
from service.http.admission import Admission, Verdict
from service.http.auth import AuthError, DocsGuard, Guard
from service.http.docs_ui import mount_docs
from service.http.errors import ERRORS, error
from service.http.limits import BodySizeLimit
from service.http.routes.batches import add_batch_routes, background
from service.http.routes.events import add_event_routes
from service.http.schemas import (
    ApiView,
    ErrorBody,
    FieldError,
    GenerateRequest,
    JobAccepted,
    JobStatus,
    ModelInfo,
    WorkerInfo,
    parse_json_int,
    resolve_class,
    resolve_preset,
)
from service.http.waiter import ResultWaiter
from service.model_watch import ModelWatcher
from service.settings import Settings
from service.store.capacity import row_steps
from service.store.connections import async_client
from service.store.heartbeats import live_workers, read_fleet
from service.store.jobs import Job, Keys, ResultMeta, result_key
from service.store.progress import EventHub

log = logging.getLogger("ldit.api")

PNG = "image/png"
STATIC = Path(__file__).resolve().parent / "static"
MAX_ECHO = 64  # longest client-sent id an error message repeats


class JsonRequest(Request):
    async def json(self):
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), parse_int=parse_json_int)
        return self._json


class JsonRoute(APIRoute):
    """Bodies parsed so that an integer too long for int() is the field's error, not "invalid JSON"."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(JsonRequest(request.scope, request.receive))

        return route


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


def create_app(settings: Settings, model: ModelWatcher, redis_url: str) -> FastAPI:
    """The app; `model` gives the current bundle spec and version (hot-swapped checkpoints included)."""
    keys = Keys(settings.key_prefix)
    auth = Guard(settings, settings.key_prefix)
    guard = Depends(auth)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.redis = async_client(settings, redis_url)
        app.state.admission = Admission(app.state.redis, settings, keys)
        app.state.waiter = ResultWaiter(app.state.redis, keys)
        app.state.events = EventHub(app.state.redis, keys)
        app.state.tasks = set()  # background work of this process (appending sample-set jobs)
        await app.state.waiter.start()
        await app.state.events.start()
        background(app, batches.resume_all(app.state.redis, keys, settings.batch_ttl_s))
        background(app, batch_upkeep.run(app.state.redis, keys, settings))
        yield
        for task in list(app.state.tasks):
            task.cancel()
        await app.state.events.stop()
        await app.state.waiter.stop()
        await app.state.redis.aclose()

    app = FastAPI(title="LightningDiT service", version="0.1.0", lifespan=lifespan,
                  description="Class-conditional image generation with LightningDiT + VA-VAE.",
                  docs_url=None, redoc_url=None)  # served below from local assets (service/http/docs_ui.py)
    app.router.route_class = JsonRoute
    mount_docs(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, read_timeout_s=settings.header_timeout_s)
    if settings.cors_origins.strip():
        app.add_middleware(CORSMiddleware, allow_origins=[o.strip() for o in settings.cors_origins.split(",")],
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["*"])
    if settings.protect_docs:
        app.add_middleware(DocsGuard, guard=auth)
    app.add_middleware(AccessLog, route_of=lambda scope: route_of(app, scope))

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
        if fields == "body" and isinstance(exc.body, bytes | None) and not is_json(request):
            # The body was never parsed: it was not declared as JSON.
            sent = request.headers.get("content-type") or "no content-type"
            message = f"send the body as JSON with the header content-type: application/json (got {sent})"
            return error(422, "invalid_request", message,
                         [{"field": "body", "message": message, "type": "content_type"}])
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
        """The job's status and its raw fields (result `key`, `seed`), in one read; None for another key's job."""
        data = await r.hgetall(keys.job(job_id))
        if not data:
            return None
        d = {k.decode(): v.decode() for k, v in data.items()}
        if d.get("owner", "") != auth.owner(caller):
            return None
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

    add_event_routes(app, settings, keys, guard, job_record)
    add_batch_routes(app, settings, keys, model, guard, auth.owner)

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
        try:
            fleet = await read_fleet(request.app.state.redis, keys, settings.heartbeat_ttl_s)
        except Exception:  # noqa: BLE001
            return error(503, "not_ready", "redis unreachable")
        if not fleet.alive:
            return error(503, "not_ready", "no worker with a fresh heartbeat (a live loop and a loaded engine)")
        return {"status": "ready", "workers": len(fleet.workers), "model_versions": fleet.model_versions}

    metrics_guard = [Depends(auth.authenticate)] if settings.protect_metrics else []

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=metrics_guard,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}})
    async def prometheus(request: Request):
        try:
            metrics.PENDING_REQUESTS.set(await request.app.state.redis.xlen(keys.stream))
            await batch_upkeep.observe(request.app.state.redis, keys)
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
    matched = scope.get("route")  # set by the router once it matched: no second pass over every route
    if matched is not None and hasattr(matched, "path"):
        return matched.path
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


def is_json(request: Request) -> bool:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))

"""Sample-set routes: POST /batches, GET /batches/{id}, its .npz and .tar (service/batches.py)."""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from service import batches
from service.errors import ERRORS, error
from service.jobs import Keys
from service.model_watch import ModelWatcher
from service.schemas import (
    MAX_SEED,
    BatchAccepted,
    BatchRequest,
    BatchStatus,
    ErrorBody,
    FieldError,
    resolve_class,
    resolve_preset,
)
from service.settings import Settings

log = logging.getLogger("ldit.api")


def add_batch_routes(app: FastAPI, settings: Settings, keys: Keys, model: ModelWatcher, guard) -> None:
    @app.post("/batches", status_code=202, response_model=BatchAccepted, responses={**ERRORS, 503: {"model": ErrorBody}})
    async def create_batch(req: BatchRequest, request: Request, _caller: str = guard):
        """A sample set for FID: `per_class` images of each class, through the queue at a lower priority."""
        model.poll()
        spec, version = model.spec, model.version
        try:
            classes = list(range(spec.num_classes)) if req.classes == "all" else [
                resolve_class(spec, c) for c in req.classes]
        except FieldError as err:
            raise FieldError("classes", str(err), **err.extra) from None
        total = len(classes) * req.per_class
        if total > settings.max_batch_images:
            raise FieldError("per_class", f"{len(classes)} classes x {req.per_class} = {total} images; "
                                          f"at most {settings.max_batch_images} (LDIT_MAX_BATCH_IMAGES)")
        if req.seed_start + req.per_class > MAX_SEED:
            raise FieldError("seed_start", f"seeds would pass {MAX_SEED - 1}")
        b = batches.BatchSpec(
            id=batches.new_batch_id(), classes=classes, per_class=req.per_class, seed_start=req.seed_start,
            preset_name=req.preset or spec.default_preset, preset=resolve_preset(spec, req),
            shape=(spec.image_size, spec.image_size, 3), model_version=version, created_at=time.time())
        r: aioredis.Redis = request.app.state.redis
        await batches.create(r, keys, b, settings.batch_dir, settings.batch_ttl_s)
        background(request.app, batches.append_jobs(r, keys, b.id, settings.batch_ttl_s))
        return BatchAccepted(id=b.id, status="running", total=b.total, **batch_urls(b.id))

    @app.get("/batches/{batch_id}", response_model=BatchStatus, responses={**ERRORS, 404: {"model": ErrorBody}})
    async def get_batch(batch_id: str, request: Request, _caller: str = guard):
        r: aioredis.Redis = request.app.state.redis
        found = await batches.read(r, keys, batch_id[:64])
        if found is None:
            return error(404, "not_found", f"no sample set {batch_id[:64]!r} (unknown or expired)")
        b, fields = found
        if int(fields.get("enqueued", 0)) < b.total:  # its appender may have died: take over (lease permitting)
            background(request.app, batches.append_jobs(r, keys, b.id, settings.batch_ttl_s))
        return BatchStatus(
            id=b.id, status=fields.get("status", "running"), **batches.progress(b, fields, time.time()),
            num_classes=len(b.classes), per_class=b.per_class, seed_start=b.seed_start, preset=b.preset_name,
            sampler=b.preset.to_dict(), model_version=b.model_version, created_at=b.created_at, **batch_urls(b.id))

    @app.get("/batches/{batch_id}/samples.npz", response_class=StreamingResponse, responses={
        200: {"content": {"application/octet-stream": {}}, "description": (
            "The ADM evaluator's .npz: arr_0 uint8 [N, H, W, 3] (class-major), arr_1 int64 labels [N]; streamed.")},
        **ERRORS, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}})
    async def batch_samples(batch_id: str, request: Request, _caller: str = guard):
        found = await finished_batch(request, batch_id[:64])
        if isinstance(found, Response):
            return found
        b, path = found
        return StreamingResponse(batches.npz_stream(b, path), media_type="application/octet-stream",
                                 headers={"Content-Disposition": f'attachment; filename="{b.id}.npz"'})

    @app.get("/batches/{batch_id}/images.tar", response_class=StreamingResponse, responses={
        200: {"content": {"application/x-tar": {}}, "description": "The PNGs, class{K}_seed{S}.png; streamed."},
        **ERRORS, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}})
    async def batch_images(batch_id: str, request: Request, _caller: str = guard):
        found = await finished_batch(request, batch_id[:64])
        if isinstance(found, Response):
            return found
        b, path = found
        return StreamingResponse(batches.tar_chunks(b, path, settings.png_compress_level),
                                 media_type="application/x-tar",
                                 headers={"Content-Disposition": f'attachment; filename="{b.id}.tar"'})

    async def finished_batch(request: Request, batch_id: str):
        """(spec, file) of a finished set, or the error to answer."""
        found = await batches.read(request.app.state.redis, keys, batch_id)
        if found is None:
            return error(404, "not_found", f"no sample set {batch_id!r} (unknown or expired)")
        b, fields = found
        status, done = fields.get("status", "running"), int(fields.get("done", 0))
        if status == "running":
            return error(409, "not_ready", f"{done} of {b.total} images done", headers={"Retry-After": "5"})
        if status == "failed":
            return error(409, "failed", f"{fields.get('failed')} of {b.total} images failed")
        path = batches.images_file(settings.batch_dir, b.id)
        if not path.is_file():
            return error(503, "unavailable", "the set's file is not in this API's LDIT_BATCH_DIR; "
                                             "the API and the workers must share that directory")
        return b, path


def batch_urls(batch_id: str) -> dict[str, str]:
    return {"status_url": f"/batches/{batch_id}", "samples_url": f"/batches/{batch_id}/samples.npz",
            "images_url": f"/batches/{batch_id}/images.tar"}


def background(app: FastAPI, coro) -> None:
    """Run `coro` in this process's background, logging (not losing) its failure."""

    def done(task: asyncio.Task) -> None:
        app.state.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background task failed: %r", task.exception())

    task = asyncio.create_task(coro)
    app.state.tasks.add(task)
    task.add_done_callback(done)

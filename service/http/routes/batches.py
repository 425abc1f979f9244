"""Sample-set routes: POST /batches, GET and DELETE /batches/{id}, its .npz and .tar (service/batches/sets.py).

With API keys on, a set belongs to the key that made it, like a job: any other key gets 404.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from service.batches import disk as batch_disk
from service.batches import files as set_files
from service.batches import sets as batches
from service.http.errors import ERRORS, error
from service.http.schemas import (
    MAX_SEED,
    BatchAccepted,
    BatchDeleted,
    BatchRequest,
    BatchStatus,
    ErrorBody,
    FieldError,
    resolve_class,
    resolve_preset,
)
from service.model_watch import ModelWatcher
from service.settings import Settings
from service.store.jobs import Keys

log = logging.getLogger("ldit.api")


def add_batch_routes(app: FastAPI, settings: Settings, keys: Keys, model: ModelWatcher, guard, owner_of) -> None:
    """`owner_of(caller)`: what a set records as its owner (service/http/auth.py, Guard.owner)."""
    volumes = settings.batch_volume_dirs()

    @app.post("/batches", status_code=202, response_model=BatchAccepted,
              responses={**ERRORS, 503: {"model": ErrorBody}, 507: {"model": ErrorBody}})
    async def create_batch(req: BatchRequest, request: Request, caller: str = guard):
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
        if req.volume not in volumes:
            raise FieldError("volume", f"no volume {req.volume[:64]!r}; this service has {', '.join(volumes)} "
                                       "(LDIT_BATCH_VOLUMES)")
        b = batches.BatchSpec(
            id=batches.new_batch_id(), classes=classes, per_class=req.per_class, seed_start=req.seed_start,
            preset_name=req.preset or spec.default_preset, preset=resolve_preset(spec, req),
            shape=(spec.image_size, spec.image_size, 3), model_version=version, created_at=time.time(),
            volume=req.volume, owner=owner_of(caller))
        r: aioredis.Redis = request.app.state.redis
        try:
            await check_volume(r, b)
            await batches.create(r, keys, b, volumes[b.volume], settings.batch_ttl_s, settings.batch_max_bytes)
        except batches.NoRoom as err:
            return no_room(err)
        background(request.app, batches.append_jobs(r, keys, b.id, settings.batch_ttl_s))
        return BatchAccepted(id=b.id, status="running", total=b.total, **batch_urls(b.id))

    @app.get("/batches/{batch_id}", response_model=BatchStatus, responses={**ERRORS, 404: {"model": ErrorBody}})
    async def get_batch(batch_id: str, request: Request, caller: str = guard):
        r: aioredis.Redis = request.app.state.redis
        found = await read_own(r, batch_id[:64], caller)
        if found is None:
            return error(404, "not_found", f"no sample set {batch_id[:64]!r} (unknown, expired or deleted)")
        b, fields = found
        if int(fields.get("enqueued", 0)) < b.total:  # its appender may have died: take over (lease permitting)
            background(request.app, batches.append_jobs(r, keys, b.id, settings.batch_ttl_s))
        return BatchStatus(
            id=b.id, status=fields.get("status", "running"), **batches.progress(b, fields, time.time()),
            num_classes=len(b.classes), per_class=b.per_class, seed_start=b.seed_start, preset=b.preset_name,
            sampler=b.preset.to_dict(), model_version=b.model_version, created_at=b.created_at, **batch_urls(b.id))

    @app.delete("/batches/{batch_id}", response_model=BatchDeleted, responses={**ERRORS, 404: {"model": ErrorBody}})
    async def delete_batch(batch_id: str, request: Request, caller: str = guard):
        """Cancel a set (its queued jobs are dropped, workers drop its samples) and remove its file and records."""
        gone = await batches.delete(request.app.state.redis, keys, batch_id[:64], owner_of(caller), volumes)
        if gone is None:
            return error(404, "not_found", f"no sample set {batch_id[:64]!r} (unknown, expired or deleted)")
        return BatchDeleted(**gone)

    @app.get("/batches/{batch_id}/samples.npz", response_class=StreamingResponse, responses={
        200: {"content": {"application/octet-stream": {}}, "description": (
            "The ADM evaluator's .npz: arr_0 uint8 [N, H, W, 3] (class-major), arr_1 int64 labels [N]; streamed.")},
        **ERRORS, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}})
    async def batch_samples(batch_id: str, request: Request, caller: str = guard):
        found = await finished_batch(request, batch_id[:64], caller)
        if isinstance(found, Response):
            return found
        b, path = found
        return StreamingResponse(set_files.npz_stream(b, path), media_type="application/octet-stream",
                                 headers={"Content-Disposition": f'attachment; filename="{b.id}.npz"'})

    @app.get("/batches/{batch_id}/images.tar", response_class=StreamingResponse, responses={
        200: {"content": {"application/x-tar": {}}, "description": "The PNGs, class{K}_seed{S}.png; streamed."},
        **ERRORS, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}})
    async def batch_images(batch_id: str, request: Request, caller: str = guard):
        found = await finished_batch(request, batch_id[:64], caller)
        if isinstance(found, Response):
            return found
        b, path = found
        return StreamingResponse(set_files.tar_chunks(b, path, settings.encode_png),
                                 media_type="application/x-tar",
                                 headers={"Content-Disposition": f'attachment; filename="{b.id}.tar"'})

    async def read_own(r: aioredis.Redis, batch_id: str, caller: str):
        found = await batches.read(r, keys, batch_id)
        return found if found is not None and found[0].owner == owner_of(caller) else None

    async def check_volume(r: aioredis.Redis, b: batches.BatchSpec) -> None:
        """NoRoom if the set's volume lacks the room for it (its free space less what running sets will write)."""
        held = {i: n for i, (n, v) in (await batches.running(r, keys)).items() if v == b.volume}
        try:
            room = await asyncio.to_thread(batch_disk.room, volumes[b.volume], held)
        except OSError as err:  # not mounted, not writable: no room either
            raise batches.NoRoom("volume", b.nbytes, 0, f"volume {b.volume!r} is not usable: {err}") from err
        if b.nbytes > room.left:
            raise batches.NoRoom("volume", b.nbytes, room.left, (
                f"this set needs {b.nbytes:,} bytes; volume {b.volume!r} has room for {room.left:,} "
                f"({room.free:,} free, less {room.unwritten:,} that its running sets will still write)"))

    async def finished_batch(request: Request, batch_id: str, caller: str):
        """(spec, file) of a finished set, or the error to answer."""
        found = await read_own(request.app.state.redis, batch_id, caller)
        if found is None:
            return error(404, "not_found", f"no sample set {batch_id!r} (unknown, expired or deleted)")
        b, fields = found
        status, done = fields.get("status", "running"), int(fields.get("done", 0))
        if status == "running":
            return error(409, "not_ready", f"{done} of {b.total} images done", headers={"Retry-After": "5"})
        if status == "failed":
            why = fields.get("message") or f"{fields.get('failed')} of {b.total} images failed"
            return error(409, "failed", why)
        path = batches.images_file(volumes[b.volume], b.id) if b.volume in volumes else None
        if path is None or not path.is_file():
            return error(503, "unavailable", f"the set's file is not on this API's volume {b.volume!r} "
                                             "(LDIT_BATCH_DIR, LDIT_BATCH_VOLUMES); the API and the workers "
                                             "must share that directory")
        return b, path


def no_room(err: batches.NoRoom):
    """507: the set does not fit, saying how much room there is."""
    return error(507, "insufficient_storage", str(err), [{
        "field": "per_class", "message": str(err), "type": f"no_room_{err.what}", "need_bytes": err.need,
        "room_bytes": err.left}])


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

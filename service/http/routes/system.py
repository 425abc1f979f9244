"""The playground page, liveness, readiness, Prometheus metrics and the model card."""

from __future__ import annotations

from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import metrics
from service.batches import upkeep as batch_upkeep
from service.http.auth import Guard
from service.http.errors import error
from service.http.schemas import ApiView, ErrorBody, ModelInfo, WorkerInfo
from service.model_watch import ModelWatcher
from service.settings import Settings
from service.store.heartbeats import live_workers, read_fleet
from service.store.jobs import Keys

STATIC = Path(__file__).resolve().parents[1] / "static"


def add_system_routes(app: FastAPI, settings: Settings, keys: Keys, model: ModelWatcher, auth: Guard) -> None:
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

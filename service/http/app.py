"""The app factory: middleware, error handlers and the route modules (service/http/routes/). The API
process only validates, admits, waits for the wake-up and answers; the work runs in the workers."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.routing import Match

from service import metrics
from service.batches import sets as batches
from service.batches import upkeep as batch_upkeep
from service.http.access_log import AccessLog
from service.http.admission import Admission
from service.http.auth import DocsGuard, Guard
from service.http.docs_ui import mount_docs
from service.http.errors import add_error_handlers
from service.http.limits import BodySizeLimit
from service.http.routes.batches import add_batch_routes, background
from service.http.routes.events import add_event_routes
from service.http.routes.jobs import add_job_routes, read_job
from service.http.routes.openai_images import add_openai_routes
from service.http.routes.system import add_system_routes
from service.http.schemas import parse_json_int
from service.http.waiter import ResultWaiter
from service.model_watch import ModelWatcher
from service.settings import Settings
from service.store.connections import async_client
from service.store.jobs import Keys
from service.store.progress import EventHub


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



def create_app(settings: Settings, model: ModelWatcher, redis_url: str) -> FastAPI:
    """The app; `model` gives the current bundle spec and version (hot-swapped checkpoints included)."""
    keys = Keys(settings.key_prefix)
    metrics.init_role("api", settings.request_timeout_s)
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
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, read_timeout_s=settings.header_timeout_s,
                       body_timeout_s=settings.body_timeout_s)
    if settings.cors_origins.strip():
        app.add_middleware(CORSMiddleware, allow_origins=[o.strip() for o in settings.cors_origins.split(",")],
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["*"])
    if settings.protect_docs:
        app.add_middleware(DocsGuard, guard=auth)
    app.add_middleware(AccessLog, route_of=lambda scope: route_of(app, scope))

    add_error_handlers(app)

    def job_of(r, job_id, caller):
        return read_job(r, keys, auth.owner(caller), job_id)

    generator = add_job_routes(app, settings, keys, model, auth, guard)
    add_openai_routes(app, settings, keys, model, generator, guard, job_of)
    add_event_routes(app, settings, keys, guard, job_of)
    add_batch_routes(app, settings, keys, model, guard, auth.owner)
    add_system_routes(app, settings, keys, model, auth)
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


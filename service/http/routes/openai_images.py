"""POST /v1/images/generations: the OpenAI Images API's create-image call, for a class-conditional model.

The OpenAI SDKs (and the tools built on them) work against it with `base_url=<service>/v1` and an
API key of this service. `prompt` is a class (name, synonym or id), `n` images are seeds seed, seed+1, ...
queued together (the workers batch them per step), and each image is the same as /generate's for the
same class, seed and sampler (one result cache). Errors come in the OpenAI shape
(service/http/errors.py). docs/clients.md says which OpenAI fields are used, ignored or refused.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service.http.errors import openai_error
from service.http.generation import Generator, Made, Refusal, format_fields
from service.http.openai_schemas import ImageData, ImagesRequest, ImagesResponse, OpenAIError
from service.http.routes.system import served_resolution
from service.http.schemas import MAX_SEED, FieldError, resolve_class
from service.image_formats import OutputFormat
from service.model_watch import ModelWatcher
from service.settings import Settings
from service.store.heartbeats import live_workers
from service.store.jobs import Keys

OPENAI_ERRORS = {code: {"model": OpenAIError} for code in (400, 401, 413, 429, 500, 503, 504)}
ENDPOINT = "images"  # the metrics' endpoint label


def add_openai_routes(app: FastAPI, settings: Settings, keys: Keys, model: ModelWatcher, gen: Generator,
                      guard, read_job) -> None:
    """`gen`: the Generator of /generate (service/http/routes/jobs.py); `read_job(r, job_id, caller)`."""

    @app.post("/v1/images/generations", response_model=ImagesResponse, responses=OPENAI_ERRORS,
              tags=["OpenAI-compatible"])
    async def create_image(req: ImagesRequest, request: Request, caller: str = guard):
        """Create images of a class, as the OpenAI Images API's `images.generate` does.

        `prompt`: a class name, synonym or id; `n` seeds (`seed`, `seed` + 1, ...) in one batch;
        `response_format` b64_json or url (/jobs/{id}/image); `output_format` png, webp or jpeg.
        Errors: `{"error": {"message", "type", "param", "code"}}` (400 for bad input)."""
        model.poll()
        spec = model.spec
        try:
            class_id = resolve_class(spec, req.prompt.strip())
        except FieldError as err:
            closest = err.extra.get("closest") or []
            message = str(err)
            if closest and "classes are" not in message:
                message += f"; closest: {', '.join(closest)}"
            return openai_error(400, f"{message} (the prompt is a class of this model: a name, synonym or id)",
                                "prompt", "invalid_prompt")
        if req.size not in (None, "auto"):
            workers = await live_workers(request.app.state.redis, keys, settings.heartbeat_ttl_s)
            r = served_resolution(settings, spec.image_size, workers)
            if req.size.strip().lower() != f"{r}x{r}":
                return openai_error(400, f"size {req.size[:32]!r} is not supported: this model makes {r}x{r} "
                                         f"images (use \"{r}x{r}\" or \"auto\")", "size", "invalid_value")
        n = req.n or 1
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        if seed + n > MAX_SEED:
            return openai_error(400, f"seeds would pass {MAX_SEED - 1}", "seed", "invalid_value")
        fmt_name = req.output_format or "png"
        fmt = OutputFormat(fmt_name, req.output_compression if fmt_name != "png" else None)
        url = req.response_format == "url"
        extra = format_fields(fmt_name, fmt.quality)
        waiter = request.app.state.waiter
        jobs = [gen.make_job(class_id, seed + i, req, waiter.channel) for i in range(n)]
        made = await asyncio.gather(*(gen.run(request, job, ENDPOINT, caller, read_job, extra, keep_record=url)
                                      for job in jobs))
        for m in made:
            if isinstance(m, Refusal):
                return openai_error(m.status, m.message, m.field, m.code, m.headers or None)
        name = spec.class_names[class_id]
        base = str(request.base_url).rstrip("/")
        data = []
        for m in made:
            assert isinstance(m, Made)
            if url:
                data.append(ImageData(url=f"{base}/jobs/{m.job.id}/image", revised_prompt=name, seed=m.job.seed))
            else:
                blob = await gen.encoded(request.app.state.redis, m.key, m.png, fmt)
                data.append(ImageData(b64_json=base64.b64encode(blob).decode(), revised_prompt=name,
                                      seed=m.job.seed))
        size = png_side(made[0].png) or spec.image_size
        return JSONResponse(ImagesResponse(created=int(time.time()), data=data, output_format=fmt_name,
                                           size=f"{size}x{size}").model_dump(exclude_none=True))


def png_side(png: bytes) -> int:
    """A PNG's width in pixels (from IHDR), 0 if it is not a PNG."""
    if png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) >= 24:
        return int.from_bytes(png[16:20], "big")
    return 0

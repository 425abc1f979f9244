"""The JSON error answer every route gives, the errors any protected route may answer, and the
app-wide handlers that turn every exception into such an answer (never a stack trace)."""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import BusyLoadingError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import metrics
from service.http.auth import AuthError
from service.http.schemas import ErrorBody, FieldError

log = logging.getLogger("ldit.api")

# Errors any protected route may answer: auth, rate limit / full queue, bad input, too large.
ERRORS = {code: {"model": ErrorBody} for code in (401, 413, 422, 429)}


def error(status: int, code: str, message: str, detail: list | None = None, headers: dict | None = None):
    body = ErrorBody(error=code, message=message, detail=detail).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status, headers=headers)


# -- the OpenAI-compatible route's errors: {"error": {"message", "type", "param", "code"}}, which the
# OpenAI SDKs turn into their exceptions (400 BadRequestError, 401 AuthenticationError, ...).
OPENAI_PREFIX = "/v1/images/"
OPENAI_PARAMS = {"class_label": "prompt"}  # our field names where the OpenAI body names them otherwise


def is_openai(request: Request) -> bool:
    return request.url.path.startswith(OPENAI_PREFIX)


def openai_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None) -> JSONResponse:
    """Our 422s are the OpenAI API's 400s."""
    status = 400 if status == 422 else status
    body = {"error": {"message": message, "type": openai_type(status),
                      "param": OPENAI_PARAMS.get(param, param) if param else None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def openai_invalid(exc: RequestValidationError) -> JSONResponse:
    """A body the schema refuses, as the OpenAI API words it: the first field at fault."""
    errors = exc.errors() or [{}]
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    param = loc[0] if loc and e.get("type") != "json_invalid" else None
    kind = e.get("type", "")
    if kind == "json_invalid" or param is None:
        return openai_error(400, "the body is not valid JSON (send it with content-type: application/json)",
                            None, "invalid_json")
    if kind == "extra_forbidden":
        return openai_error(400, f"Unknown parameter: '{param}'.", param, "unknown_parameter")
    if kind == "missing":
        return openai_error(400, f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    message = str(e.get("msg", "invalid")).removeprefix("Value error, ")
    return openai_error(400, f"Invalid value for '{param}': {message}.", param, "invalid_value")


def add_error_handlers(app: FastAPI) -> None:
    """Always JSON, never a stack trace; Redis down is a 503 with Retry-After."""
    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        if is_openai(request):
            return openai_invalid(exc)
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
        if is_openai(request):
            return openai_error(exc.status_code, str(exc.detail), None,
                                "invalid_json" if exc.status_code == 400 else None, getattr(exc, "headers", None))
        if exc.status_code == 400:  # FastAPI's "error parsing the body" (e.g. not UTF-8): bad input like any other
            return error(422, "invalid_request", "the body is not valid JSON",
                         [{"field": "body", "message": str(exc.detail), "type": "json_invalid"}])
        return error(exc.status_code, "http_error", str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(AuthError)
    async def on_auth(request: Request, exc: AuthError):
        metrics.REQUEST_FAILURE.labels(request.url.path.split("/")[1] or "root", exc.code).inc()
        if is_openai(request):
            code = {"unauthorized": "invalid_api_key", "rate_limited": "rate_limit_exceeded"}.get(exc.code, exc.code)
            return openai_error(exc.status, str(exc), None, code, exc.headers)
        return error(exc.status, exc.code, str(exc), headers=exc.headers)

    @app.exception_handler(FieldError)
    async def on_field(request: Request, exc: FieldError):
        if is_openai(request):
            return openai_error(400, str(exc), exc.field, "invalid_value")
        return error(422, "invalid_request", str(exc), [{"field": exc.field, "message": str(exc), **exc.extra}])

    @app.exception_handler(aioredis.ConnectionError)
    @app.exception_handler(aioredis.TimeoutError)
    @app.exception_handler(BusyLoadingError)
    async def on_redis_down(request: Request, exc: Exception):
        log.warning("redis unavailable: %r", exc)
        if is_openai(request):
            return openai_error(503, "the job queue is unreachable; retry shortly", None, "unavailable",
                                {"Retry-After": "2"})
        return error(503, "unavailable", "the job queue is unreachable; retry shortly", headers={"Retry-After": "2"})

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        if is_openai(request):
            return openai_error(500, "internal error", None, "internal_error")
        return error(500, "internal_error", "internal error")


def is_json(request: Request) -> bool:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))

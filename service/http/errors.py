"""The JSON error answer every route gives, and the errors any protected route may answer."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from service.http.schemas import ErrorBody

# Errors any protected route may answer: auth, rate limit / full queue, bad input, too large.
ERRORS = {code: {"model": ErrorBody} for code in (401, 413, 422, 429)}


def error(status: int, code: str, message: str, detail: list | None = None, headers: dict | None = None):
    body = ErrorBody(error=code, message=message, detail=detail).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status, headers=headers)

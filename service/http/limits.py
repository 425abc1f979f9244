"""Request-body size and pace limits as plain ASGI middleware: 413 (408) before anything parses the body.

The body is read here (it is small by construction) and replayed to the app, so
the limit holds for chunked uploads that carry no Content-Length as well. A client
that stops sending for `read_timeout_s` in the middle of its body gets 408.
A client that goes away mid-upload ends the request quietly (nothing to answer).
"""

from __future__ import annotations

import asyncio
import json


class BodySizeLimit:
    def __init__(self, app, max_bytes: int, read_timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    async def _reject(self, send, status: int = 413) -> None:
        if status == 408:
            code, message = "request_timeout", f"no body data for {self.read_timeout_s:g} s"
        else:
            code, message = "payload_too_large", f"request body exceeds {self.max_bytes} bytes"
        body = json.dumps({"error": code, "message": message,
                           "detail": [{"field": "body", "message": message}]}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._reject(send)
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except asyncio.TimeoutError:
                return await self._reject(send, 408)
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._reject(send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

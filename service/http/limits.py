"""Request-body size and pace limits as plain ASGI middleware: 413 (408) before anything parses the body.

The body is read here (it is small by construction) and replayed to the app, so
the limit holds for chunked uploads that carry no Content-Length as well. Two
clocks bound a slow body, both answered with 408: a pause of `read_timeout_s`
between two of its pieces, and `body_timeout_s` for the whole body from the end
of the request head, so a client that sends a byte now and then cannot hold a
connection (and a place under the connection cap) for longer than that.
A client that goes away mid-upload ends the request quietly (nothing to answer).
"""

from __future__ import annotations

import asyncio
import json


class BodySizeLimit:
    def __init__(self, app, max_bytes: int, read_timeout_s: float, body_timeout_s: float | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s
        self.body_timeout_s = body_timeout_s if body_timeout_s is not None else read_timeout_s

    async def _reject(self, send, status: int = 413, message: str = "") -> None:
        if status == 408:
            code = "request_timeout"
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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        chunks, size = [], 0
        while True:
            left = deadline - loop.time()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(self.read_timeout_s, left)))
            except asyncio.TimeoutError:
                if left <= self.read_timeout_s:
                    return await self._reject(send, 408, f"the request body did not arrive within "
                                                         f"{self.body_timeout_s:g} s (LDIT_BODY_TIMEOUT_S)")
                return await self._reject(send, 408, f"no body data for {self.read_timeout_s:g} s")
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

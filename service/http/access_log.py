"""One structured log line per request (info level: off by default), and the request counted by
route and status class (`ldit_http_requests_total`, 4xx included), as plain ASGI middleware.

Plain ASGI rather than Starlette's BaseHTTPMiddleware: a client that goes away before
the answer is then an info line ("client went away"), not an ERROR with a traceback
("No response returned.") for every aborted upload.
"""

from __future__ import annotations

import logging
import time
import uuid

from service import metrics

log = logging.getLogger("ldit.api")


class AccessLog:
    def __init__(self, app, route_of):
        """`route_of(scope)`: the route template a request matches (a bounded metric label)."""
        self.app = app
        self.route_of = route_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        state = {"status": 0, "request_id": ""}

        async def send_logged(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                rid = next((v for k, v in headers if k.lower() == b"x-request-id"), b"")
                if not rid:
                    rid = uuid.uuid4().hex.encode()
                    headers.append((b"x-request-id", rid))
                    message = {**message, "headers": headers}
                state["status"], state["request_id"] = message["status"], rid.decode()
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        except Exception:
            state["status"] = state["status"] or 500  # answered by the outermost error handler
            raise
        finally:
            if state["status"]:
                metrics.HTTP_REQUESTS.labels(self.route_of(scope), f"{state['status'] // 100}xx").inc()
            extra = {"request_id": state["request_id"], "method": scope.get("method"), "path": scope.get("path"),
                     "status": state["status"], "ms": round(1000 * (time.perf_counter() - start), 1)}
            log.info("request" if state["status"] else "client went away", extra=extra)

"""uvicorn as the API runs it: bounded connections, timed-out slow clients, trusted proxies only.

* `keep_alive_timeout_s`: an idle keep-alive connection is closed (uvicorn's own timer).
* `header_timeout_s`: a connection must deliver a whole request head within this, from
  its opening or from the first byte of its next request; a silent or trickling client
  (slowloris) is dropped. uvicorn has no such timer, hence the protocol subclass below.
  Slow bodies are bounded by service/http/limits.py (a pause between body chunks: the same
  setting; the whole body: `body_timeout_s`).
* `max_http_connections`: a connection beyond it gets a 503 JSON answer with Retry-After at
  once, so idle sockets cannot use up the process's file descriptors. It is not closed
  outright: the server half-closes it (its answer and a FIN go out) and reads and drops
  what the client sends until the client closes, or `REFUSED_LINGER_S` passes. Closing
  with a request unread makes the kernel answer with a reset, and a client that was
  still sending its request then loses the 503 it had not read yet.
* `trusted_proxies`: X-Forwarded-For / X-Forwarded-Proto are believed only from these
  peers (uvicorn believes 127.0.0.1 by default, which let any local client pick its own
  address and escape the per-client rate limit). Empty: the client is the TCP peer.
"""

from __future__ import annotations

import asyncio
import json
import logging

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import metrics
from service.settings import Settings

log = logging.getLogger("ldit.api")


def _canned_503() -> bytes:
    body = json.dumps({"error": "overloaded", "message": "too many open connections; retry shortly"}).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n")
    return head.encode() + body


OVERLOADED = _canned_503()
REFUSED_LINGER_S = 2.0  # the longest a refused connection is read (and dropped) before it is closed


def protocol_class(settings: Settings) -> type[asyncio.Protocol]:
    header_timeout = settings.header_timeout_s
    max_connections = settings.max_http_connections

    class GuardedHttpProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _refused: asyncio.TimerHandle | None = None  # set on a connection beyond the cap: when to close it

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.info("connection refused: %d open", len(self.connections))
                metrics.HTTP_CONNECTIONS_REFUSED.inc()
                transport.write(OVERLOADED)
                if transport.can_write_eof():
                    transport.write_eof()  # the answer, then FIN; the request is still read (and dropped)
                    self._refused = self.loop.call_later(REFUSED_LINGER_S, transport.close)
                else:
                    transport.close()
                return
            self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            if self._refused is not None:
                self._refused.cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused is not None:
                return  # a refused connection's request: read, so that closing it sends no reset
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm_header_timer()  # the first byte of the next request on a kept-alive connection
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._cancel_header_timer()
            super().on_headers_complete()

        def _arm_header_timer(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout, self._header_timed_out)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timed_out(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                log.info("connection dropped: no complete request head within %.1f s", header_timeout)
                self.transport.close()

    return GuardedHttpProtocol


def server_config(settings: Settings, app) -> uvicorn.Config:
    trusted = settings.trusted_proxies.strip()
    return uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, log_level=settings.log_level,
        access_log=settings.log_level == "debug", timeout_graceful_shutdown=5,
        http=protocol_class(settings), timeout_keep_alive=settings.keep_alive_timeout_s,
        proxy_headers=bool(trusted), forwarded_allow_ips=trusted or None,
    )

"""A small synchronous client of the service's HTTP API (httpx), used by the `ldit` command.

It imports nothing of the service: it speaks HTTP only, so it works against any deployment.
Every HTTP error becomes an `ApiError` whose text is one line: the status, the service's error
code and its message (both error shapes: ours `{"error", "message"}` and the OpenAI route's
`{"error": {"message", "type", "code"}}`).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class ApiError(Exception):
    """An HTTP error answer, or a service that cannot be reached; str() is one line."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None,
                 retry_after: str | None = None):
        super().__init__(message)
        self.status, self.code, self.retry_after = status, code, retry_after


def error_of(response: httpx.Response) -> ApiError:
    """The one-line ApiError of an error answer (the body read if it is not yet)."""
    try:
        response.read()
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, httpx.HTTPError, ValueError):
        body = None
    code, message = None, None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):  # the OpenAI shape
            code, message = err.get("code") or err.get("type"), err.get("message")
        else:
            code, message = err, body.get("message")
            for d in body.get("detail") or []:
                if isinstance(d, dict) and d.get("closest"):
                    message = f"{message} (closest: {', '.join(map(str, d['closest'][:10]))})"
    if message is None:
        message = (response.text or response.reason_phrase or "").strip().splitlines()[0:1]
        message = message[0][:200] if message else ""
    retry = response.headers.get("retry-after")
    text = f"HTTP {response.status_code}" + (f" {code}" if code else "") + (f": {message}" if message else "")
    if retry:
        text += f" (retry after {retry} s)"
    return ApiError(" ".join(text.split()), response.status_code, code, retry)


class Client:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0):
        self.url = (url or os.environ.get("LDIT_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("LDIT_API_KEY")
        self._headers = {"User-Agent": "ldit-cli"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._timeout = httpx.Timeout(timeout, connect=10.0)
        self.http = self._new_pool()

    def _new_pool(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self._headers, timeout=self._timeout)

    def _forget_pool(self) -> None:
        """Start a new connection pool after Ctrl-C, without closing (or waiting for) the old one.

        A KeyboardInterrupt raised inside httpcore can leave a thread lock of its pool taken (one that
        arrives just as a `with lock:` has acquired it), and every later request on that pool, and its
        close(), then waits forever: that hung `ldit sample --on-interrupt cancel` in CI. The old sockets
        close with the process.
        """
        self.http = self._new_pool()

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        # Sent from a helper thread: Python raises Ctrl-C's KeyboardInterrupt in the main thread only,
        # so it stops the wait here and never lands inside httpcore (see _forget_pool).
        http, outcome = self.http, []

        def send() -> None:
            try:
                outcome.append(http.request(method, path, **kw))
            except BaseException as err:  # handed to the main thread as it is
                outcome.append(err)

        sender = threading.Thread(target=send, name="ldit-request", daemon=True)
        sender.start()
        try:
            sender.join()
        except KeyboardInterrupt:
            self._forget_pool()  # the abandoned request may still hold a connection of the old one
            raise
        response = outcome[0]
        if isinstance(response, httpx.TransportError):
            raise ApiError(f"cannot reach {self.url}: {response or type(response).__name__}") from None
        if isinstance(response, BaseException):
            raise response
        if response.status_code >= 400:
            raise error_of(response)
        return response

    def json(self, method: str, path: str, **kw) -> dict:
        return self.request(method, path, **kw).json()

    @contextmanager
    def stream(self, method: str, path: str, **kw) -> Iterator[httpx.Response]:
        """A streamed answer (its body not yet read); ApiError for an error answer."""
        try:
            with self.http.stream(method, path, **kw) as response:
                if response.status_code >= 400:
                    raise error_of(response)
                yield response
        except httpx.TransportError as err:
            raise ApiError(f"cannot reach {self.url}: {err or type(err).__name__}") from None
        except KeyboardInterrupt:  # while connecting, or while the caller read the stream
            self._forget_pool()
            raise


def sse_events(response: httpx.Response) -> Iterator[tuple[str, dict]]:
    """(event, data) of a Server-Sent Events stream; comments (keep-alives) skipped."""
    event, data = "message", []
    for line in response.iter_lines():
        if not line:
            if data:
                try:
                    payload = json.loads("\n".join(data))
                except json.JSONDecodeError:
                    payload = {"raw": "\n".join(data)}
                yield event, payload
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)

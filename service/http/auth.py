"""Optional API keys (stored as SHA-256 digests) and a per-key rate limit kept in Redis.

Keys file: one hex SHA-256 digest of an accepted key a line (`#` comments
allowed), so the file (a Kubernetes Secret, say) never holds a usable key.
Make a line with `printf %s "$KEY" | sha256sum`. Clients send
`Authorization: Bearer <key>`. The rate limit is a fixed one-minute window per
key (per client address when no keys are configured), shared by every API replica.
With keys on, a job (and a sample set) belongs to the key that submitted it: its status and image
answer 404 to any other key. `/metrics` and the API docs can require a key too
(`protect_metrics`, `protect_docs`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path

import redis.asyncio as aioredis
from fastapi import Request

from service.settings import Settings


class AuthError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


def load_key_digests(path: Path | None) -> frozenset[str]:
    if path is None:
        return frozenset()
    digests = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip().lower()
        if not line:
            continue
        if len(line) != 64 or any(c not in "0123456789abcdef" for c in line):
            raise ValueError(f"{path}: every line must be a SHA-256 hex digest of a key")
        digests.add(line)
    if not digests:
        raise ValueError(f"{path}: no key digests (remove the setting to turn authentication off)")
    return frozenset(digests)


class Guard:
    """The FastAPI dependency of protected routes."""

    def __init__(self, settings: Settings, keys_prefix: str):
        self.digests = load_key_digests(settings.api_keys_file)
        self.limit = settings.rate_limit_per_minute
        self.prefix = keys_prefix

    @property
    def keys_on(self) -> bool:
        return bool(self.digests)

    def owner(self, caller: str) -> str:
        """What a job records as its owner: the key's digest prefix ("" with keys off: jobs are shared)."""
        return caller if self.keys_on else ""

    async def authenticate(self, request: Request) -> str:
        """A dependency that checks the key only (no rate limit): /metrics."""
        return self.identify(request)

    def identify(self, request: Request) -> str:
        """The caller's identity for rate limiting: its key digest, or its address."""
        if not self.digests:
            return "addr:" + (request.client.host if request.client else "unknown")
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(401, "unauthorized", "missing API key (Authorization: Bearer <key>)",
                            {"WWW-Authenticate": "Bearer"})
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        if not any(hmac.compare_digest(digest, d) for d in self.digests):
            raise AuthError(401, "unauthorized", "invalid API key", {"WWW-Authenticate": "Bearer"})
        return "key:" + digest[:16]

    async def __call__(self, request: Request) -> str:
        who = self.identify(request)
        if self.limit:
            r: aioredis.Redis = request.app.state.redis
            window = int(time.time() // 60)
            key = f"{self.prefix}:rate:{who}:{window}"
            pipe = r.pipeline(transaction=True)
            pipe.incr(key)
            pipe.expire(key, 61)
            count, _ = await pipe.execute()
            if count > self.limit:
                retry = 60 - int(time.time() % 60)
                raise AuthError(429, "rate_limited", f"more than {self.limit} requests a minute",
                                {"Retry-After": str(max(1, retry))})
        return who


class DocsGuard:
    """ASGI wrapper: the OpenAPI document and its viewers need an API key (protect_docs)."""

    PATHS = ("/docs", "/redoc", "/openapi.json")

    def __init__(self, app, guard: Guard):
        self.app, self.guard = app, guard

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(self.PATHS):
            try:
                self.guard.identify(Request(scope))
            except AuthError as err:
                body = json.dumps({"error": err.code, "message": str(err)}).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
                await send({"type": "http.response.start", "status": err.status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

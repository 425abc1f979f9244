"""Optional API keys (stored as SHA-256 digests) and a per-key rate limit kept in Redis.

Keys file: one hex SHA-256 digest of an accepted key a line (`#` comments
allowed), so the file (a Kubernetes Secret, say) never holds a usable key.
Make a line with `printf %s "$KEY" | sha256sum`. Clients send
`Authorization: Bearer <key>`. The rate limit is a fixed one-minute window per
key (per client address when no keys are configured), shared by every API replica.
"""

from __future__ import annotations

import hashlib
import hmac
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

"""Redis clients as every process makes them.

* A blocking pool of `redis_max_connections`: a caller that finds every connection busy
  waits up to `redis_pool_timeout_s` for one instead of failing at once.
* Retries with exponential backoff (and jitter) after a lost connection or a timeout, so a
  pooled connection gone stale while Redis restarted costs one reconnect, not a failed
  request. Every command the service sends is safe to repeat: reads, writes of fixed
  values, and Lua scripts that recognise their own earlier run (service/store/scripts.py).
* Connections idle longer than `redis_health_check_interval_s` are PINGed before use.
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from service.settings import Settings

RETRY_ON = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


def _kwargs(settings: Settings) -> dict:
    kw: dict = {"socket_connect_timeout": 5, "health_check_interval": settings.redis_health_check_interval_s,
                "max_connections": settings.redis_max_connections, "timeout": settings.redis_pool_timeout_s}
    if settings.redis_password_file:
        kw["password"] = settings.redis_password_file.read_text().strip()
    return kw


def _backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(base=0.05, cap=1.0)


def sync_client(settings: Settings, url: str) -> redis.Redis:
    pool = redis.BlockingConnectionPool.from_url(
        url, retry=Retry(_backoff(), settings.redis_retries, supported_errors=RETRY_ON), **_kwargs(settings))
    return redis.Redis.from_pool(pool)


def async_client(settings: Settings, url: str) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url, retry=AsyncRetry(_backoff(), settings.redis_retries, supported_errors=RETRY_ON), **_kwargs(settings))
    return aioredis.Redis.from_pool(pool)

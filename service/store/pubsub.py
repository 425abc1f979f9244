"""One pub/sub subscription that outlives Redis restarts: the API's wake-ups and its SSE relay use it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

log = logging.getLogger("ldit.api")


async def _push_as_is(response):
    # redis-py's default RESP3 push handler formats every message for a debug log line, even with
    # debug off: 1.6 ms of CPU per reply that carries a PNG (bench/one_worker.py --cprofile).
    return response


async def subscribe_forever(r: aioredis.Redis, channel: str, on_message: Callable[[bytes], None],
                            on_subscribed: Callable[[], Awaitable[None]]) -> None:
    """Deliver every message of `channel` to `on_message`; reconnect with backoff on any trouble.

    `on_subscribed` runs after each (re)subscription: messages published while the connection
    was down are lost, so it is where a caller looks again at what it was waiting for. It runs
    on Redis's confirmation of the subscription, not after sending SUBSCRIBE: a retrying
    client (service/store/connections.py) reconnects and re-subscribes inside redis-py when
    Redis comes back quickly, and no error reaches this loop then; the confirmation still does."""
    backoff = 0.1
    while True:
        pubsub = r.pubsub(ignore_subscribe_messages=False, push_handler_func=_push_as_is)
        try:
            await pubsub.subscribe(channel)
            while True:
                msg = await pubsub.get_message(timeout=5.0)
                if not msg:
                    continue
                if msg.get("type") == "message":
                    on_message(msg["data"])
                elif msg.get("type") == "subscribe":
                    backoff = 0.1
                    await on_subscribed()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - reconnect on any connection trouble
            log.warning("pub/sub connection to %s lost (%r); reconnecting", channel, err)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
        finally:
            try:
                await pubsub.aclose()
            except Exception:  # noqa: BLE001
                pass


async def cancel(task: asyncio.Task | None) -> None:
    """Cancel a listener task and wait until it is gone."""
    if task:
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001
            pass

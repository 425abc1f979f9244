"""service/store/pubsub.py's subscription against a real Redis: messages arrive whole, and cheaply."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.asyncio as aioredis

from service.store.pubsub import cancel, subscribe_forever
from tests.service_harness import have_redis_server, start_redis


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_a_large_message_arrives_whole_without_being_formatted_for_a_debug_log():
    """Regression (issue 20): redis-py's default RESP3 push handler builds "Push response: " + str(message)
    for a debug line on every message, debug on or off: 1.6 ms of the API's CPU per PNG-carrying reply.
    The subscription installs its own handler, so no such line is ever built."""
    if not have_redis_server():
        pytest.skip("Debian redis-server is not installed (scripts/test.sh installs it)")
    server = start_redis("debian")
    handler, logger = Records(), logging.getLogger("push_response")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)  # make the default handler's line visible, were it built
    payload = b"job\n{}\n" + bytes(range(256)) * 512  # 128 kB, binary, like a reply with a PNG

    async def run() -> list[bytes]:
        r = aioredis.Redis.from_url(server.url, protocol=3)
        got: list[bytes] = []
        ready = asyncio.Event()

        async def subscribed() -> None:
            ready.set()

        task = asyncio.create_task(subscribe_forever(r, "chan", got.append, subscribed))
        await asyncio.wait_for(ready.wait(), 10)
        for _ in range(3):
            await r.publish("chan", payload)
        for _ in range(100):
            if len(got) == 3:
                break
            await asyncio.sleep(0.05)
        await cancel(task)
        await r.aclose()
        return got

    try:
        got = asyncio.run(run())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        server.stop()
    assert got == [payload] * 3
    assert not [r for r in handler.records if "Push response" in r.getMessage()]


def test_a_reconnect_redis_py_makes_by_itself_still_looks_again():
    """Regression (CI of stop 29, test_pooled_connections_survive_a_redis_restart timed out): with the
    service's retrying pool, a subscription whose Redis restarted quickly is reconnected and re-subscribed
    inside redis-py, so no error reached subscribe_forever and `on_subscribed` never ran again. A job
    that ended while the subscription was down then kept its request waiting until its deadline.

    The restart here blocks the event loop, so Redis is back before the subscription notices: the
    reconnect that follows is redis-py's own."""
    if not have_redis_server():
        pytest.skip("Debian redis-server is not installed (scripts/test.sh installs it)")
    from service.http.waiter import ResultWaiter
    from service.settings import Settings
    from service.store.connections import async_client
    from service.store.jobs import Keys

    server = start_redis("debian")
    keys = Keys()

    async def run() -> bool:
        r = async_client(Settings(redis_url=server.url), server.url)
        waiter = ResultWaiter(r, keys)
        await waiter.start()
        fut = waiter.register("j1")
        await r.hset(keys.job("j1"), mapping={"status": "queued"})
        waiter.queued("j1")
        await asyncio.sleep(0.2)  # the listener is blocked reading its subscription
        # The job ends while the subscription is down: its notification is lost (never published here).
        await r.hset(keys.job("j1"), "status", "done")
        server.restart()  # synchronous: the loop sees the closed socket only once Redis is back
        try:
            await asyncio.wait_for(asyncio.shield(fut), 15)
            woke = True
        except TimeoutError:
            woke = False
        await waiter.stop()
        await r.aclose()
        return woke

    try:
        woke = asyncio.run(run())
    finally:
        server.stop()
    assert woke, "the waiter never looked again after redis-py re-subscribed on its own"

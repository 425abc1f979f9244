"""What the live workers say about themselves: their heartbeats, read by the API.

A worker writes its heartbeat (name, model version, backend, precision, device,
max rows, ...) every `heartbeat_interval_s`; readiness and the model card read
them back, so `/v1/model` reports what the workers really run.
"""

from __future__ import annotations

import json
import time

import redis.asyncio as aioredis

from service.jobs import Keys


async def live_workers(r: aioredis.Redis, keys: Keys, ttl_s: float) -> list[dict]:
    """Heartbeats younger than `ttl_s`, sorted by worker name, each with its `age_s`."""
    workers = []
    async for k in r.scan_iter(match=keys.heartbeat_pattern, count=100):
        raw = await r.get(k)
        if raw:
            beat = json.loads(raw)
            beat["age_s"] = round(max(0.0, time.time() - beat.get("ts", 0)), 3)
            if beat["age_s"] < ttl_s:
                workers.append(beat)
    return sorted(workers, key=lambda w: w.get("name", ""))

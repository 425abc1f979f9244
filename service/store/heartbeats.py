"""What the live workers say about themselves: their heartbeats, all in one Redis hash.

Each worker writes one field of `<prefix>:workers` (its name -> a JSON object: model
version, backend, precision, device, max rows, measured speed, ...) every heartbeat
interval, but only while its loop keeps ticking: a stuck or dead loop stops the beats,
so a fresh heartbeat means a live loop with a loaded engine. Readiness, admission and
the model card read them with one HGETALL, O(workers) whatever else the keyspace
holds; fields of workers silent for several TTLs are pruned by whoever reads them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from service.store.capacity import FleetRate
from service.store.jobs import Keys

PRUNE_AFTER_TTLS = 3


@dataclass(frozen=True)
class Fleet:
    workers: list[dict]  # fresh heartbeats, sorted by worker name, each with its `age_s`

    @property
    def alive(self) -> bool:
        return bool(self.workers)

    @property
    def rate(self) -> FleetRate | None:
        return FleetRate.of([w.get("rate") for w in self.workers])

    @property
    def done_rows(self) -> int:
        """Row-steps already computed by the workers' active samples (still counted as work ahead)."""
        return sum(int(w.get("done_rows", 0)) for w in self.workers)

    @property
    def model_versions(self) -> list[str]:
        return sorted({w["model_version"] for w in self.workers})


async def read_fleet(r: aioredis.Redis, keys: Keys, ttl_s: float) -> Fleet:
    raw = await r.hgetall(keys.workers)
    now = time.time()
    fresh, gone = [], []
    for name, blob in raw.items():
        try:
            beat = json.loads(blob)
            beat["age_s"] = round(max(0.0, now - float(beat["ts"])), 3)
        except (ValueError, KeyError, TypeError):
            gone.append(name)
            continue
        if beat["age_s"] < ttl_s:
            fresh.append(beat)
        elif beat["age_s"] > PRUNE_AFTER_TTLS * ttl_s:
            gone.append(name)
    if gone:
        await r.hdel(keys.workers, *gone)
    return Fleet(sorted(fresh, key=lambda w: w.get("name", "")))


async def live_workers(r: aioredis.Redis, keys: Keys, ttl_s: float) -> list[dict]:
    """Heartbeats younger than `ttl_s`, sorted by worker name, each with its `age_s`."""
    return (await read_fleet(r, keys, ttl_s)).workers


class FleetView:
    """read_fleet, remembered for a moment: the admission path asks on every request."""

    def __init__(self, r: aioredis.Redis, keys: Keys, ttl_s: float, max_age_s: float = 0.25):
        self.r, self.keys, self.ttl_s, self.max_age_s = r, keys, ttl_s, max_age_s
        self._fleet: Fleet | None = None
        self._at = 0.0

    async def get(self) -> Fleet:
        now = time.monotonic()
        if self._fleet is None or now - self._at > self.max_age_s:
            self._fleet = await read_fleet(self.r, self.keys, self.ttl_s)
            self._at = now
        return self._fleet

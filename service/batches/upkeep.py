"""Upkeep of sample sets: the sweeper that removes files no set owns, and the sets' gauges.

A set's records expire in Redis (service/batches/sets.py) but nothing there can remove a file, so
every API process runs the sweeper; one at a time sweeps, under a lease, as with the appender.
A pass removes, on every volume, each set directory whose record is gone (expired, deleted by
a process that died before removing it, or made by one that died before recording it: the
record is written first, so a file without one is never a set being created), then releases
the reserved bytes of sets whose file is gone, and removes the file of each failed set (it
cannot be downloaded) and its reservation, keeping its record (its `error` and `message`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

import redis.asyncio as aioredis

from service import metrics
from service.batches import disk as batch_disk
from service.batches import sets as batches
from service.settings import Settings
from service.store.jobs import Keys

log = logging.getLogger("ldit.batches")

STATES = ("running", "done", "failed")


async def sweep(r: aioredis.Redis, keys: Keys, volumes: dict[str, Path], lease_ms: int = 60000) -> int | None:
    """One pass; the number of set directories removed, or None when another process holds the lease."""
    owner = uuid.uuid4().hex
    if not await r.set(keys.batch_sweeper, owner, nx=True, px=lease_ms):
        return None
    try:
        removed = 0
        for root in volumes.values():
            ids = await asyncio.to_thread(batch_disk.set_ids_on, root)
            for batch_id, alive in zip(ids, await exist(r, keys, ids), strict=True):
                if not alive and await asyncio.to_thread(batch_disk.remove_set, root, batch_id):
                    removed += 1
                    log.info("swept the file of sample set %s", batch_id)
        held = await batches.held(r, keys)
        ids = list(held)
        for batch_id, status in zip(ids, await batches.statuses(r, keys, ids), strict=True):
            root = volumes.get(held[batch_id][1])
            if status == "failed" and root is not None:  # useless (no download): its bytes go now, its record stays
                if await asyncio.to_thread(batch_disk.remove_set, root, batch_id):
                    await r.hdel(keys.batch_held, batch_id)
                    removed += 1
                    log.info("removed the file of failed sample set %s", batch_id)
            elif status is None and (root is None or not batch_disk.set_dir(root, batch_id).exists()):
                await r.hdel(keys.batch_held, batch_id)
                await r.zrem(keys.batches, batch_id)
        metrics.BATCH_FILES_SWEPT.inc(removed)
        return removed
    finally:
        if await r.get(keys.batch_sweeper) == owner.encode():
            await r.delete(keys.batch_sweeper)


async def exist(r: aioredis.Redis, keys: Keys, ids: list[str]) -> list[bool]:
    pipe = r.pipeline(transaction=False)
    for batch_id in ids:
        pipe.exists(keys.batch(batch_id))
    return [bool(n) for n in await pipe.execute()] if ids else []


async def run(r: aioredis.Redis, keys: Keys, settings: Settings) -> None:
    """Sweep every `batch_sweep_interval_s` until cancelled (the API's lifespan ends)."""
    volumes = settings.batch_volume_dirs()
    lease_ms = int(max(60.0, 3 * settings.batch_sweep_interval_s) * 1000)
    while True:
        try:
            await sweep(r, keys, volumes, lease_ms)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - Redis restarting, a volume unmounted: the next pass retries
            log.warning("sweeping sample-set files failed: %r", err)
        await asyncio.sleep(settings.batch_sweep_interval_s)


async def observe(r: aioredis.Redis, keys: Keys) -> None:
    """Set the gauges of every set (bytes held, sets by state), as every API replica sees them."""
    held = await batches.held(r, keys)
    metrics.BATCH_BYTES.set(sum(n for n, _ in held.values()))
    pipe = r.pipeline(transaction=False)
    for batch_id in held:
        pipe.hget(keys.batch(batch_id), "status")
    counts = dict.fromkeys(STATES, 0)
    for status in await pipe.execute() if held else []:
        if status is not None and status.decode() in counts:
            counts[status.decode()] += 1
    for state, n in counts.items():
        metrics.BATCH_SETS.labels(state).set(n)

"""Sample sets (POST /batches): many images through the same queue, at a lower priority.

A set is one Redis hash `<p>:batch:<id>` (what was asked, total, done, failed, times), a
bitmap of finished images, and one raw file `<batch_dir>/<id>/images.u8`: N x H x W x 3
uint8 in class-major order, exactly the `arr_0` payload of the ADM .npz. The API creates
the file (sparse, full size) and appends one job per image to the low-priority stream
`<p>:jobs:batch` in the background, holding a lease; if it dies, the next API process that
starts or is asked about the set takes the lease and appends the rest. A worker writes each
finished image at its offset in the file, then, in one Lua call, sets its bit, counts it
once (a redelivered job does not count twice) and acknowledges the job. Workers crash, API
processes restart: the set goes on, and nothing finished is lost (it is on disk, counted in
Redis). Downloads stream the file (`.npz`) or PNGs encoded from it (`.tar`) chunk by chunk.

Cleaning up: a set reserves its full size in `<p>:batches:held` (checked against the budget,
atomically with its record) before its file exists, and keeps it until the file is removed.
A failed set reserves nothing from the moment it fails (it cannot be downloaded): the budget
and the volumes' room leave it out, and the sweeper (service/batches/upkeep.py) removes its
file and reservation, keeping its record (and so its `error` and `message`) until it expires.
Its records expire `ttl_s` after it completes or fails (2 x `ttl_s` after creation while
it runs, a bound for a set no worker finishes; images not made by then fail with `timeout`),
and the sweeper removes files whose records are gone. DELETE removes the records first, then its queued
jobs and its file; workers drop the samples of a set that is gone or stopped. A write that
fails with ENOSPC or EIO stops the set with that reason; other sets are not touched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis

from model.sample_sets import sample_index
from model.sampling import SamplerPreset
from service.batches import disk as batch_disk
from service.batches.scripts import APPEND_LUA, CREATE_LUA, DELETE_LUA, STOP_LUA
from service.store.jobs import GROUP, Job, Keys, result_key

log = logging.getLogger("ldit.batches")

ENQUEUE_CHUNK = 500  # jobs appended per round trip
LEASE_MS = 15000

class NoRoom(Exception):
    """A set that does not fit: in the budget (`what` = "budget") or on its volume ("volume")."""

    def __init__(self, what: str, need: int, left: int, message: str):
        super().__init__(message)
        self.what, self.need, self.left = what, need, left


@dataclass
class BatchSpec:
    id: str
    classes: list[int]
    per_class: int
    seed_start: int
    preset_name: str
    preset: SamplerPreset
    shape: tuple[int, int, int]  # one image: H, W, 3
    model_version: str
    created_at: float
    volume: str = "default"  # which of LDIT_BATCH_VOLUMES holds its file
    owner: str = ""  # the API key that made it (service/http/auth.py); "" with keys off

    @property
    def total(self) -> int:
        return len(self.classes) * self.per_class

    @property
    def nbytes(self) -> int:
        return self.total * int(np.prod(self.shape))

    def to_fields(self) -> dict[str, str]:
        return {"classes": json.dumps(self.classes), "per_class": str(self.per_class),
                "seed_start": str(self.seed_start), "preset_name": self.preset_name,
                "preset": json.dumps(self.preset.to_dict()), "shape": json.dumps(list(self.shape)),
                "model_version": self.model_version, "created_at": repr(self.created_at), "total": str(self.total),
                "volume": self.volume, "owner": self.owner, "bytes": str(self.nbytes)}

    @classmethod
    def from_fields(cls, batch_id: str, f: dict[str, str]) -> BatchSpec:
        return cls(id=batch_id, classes=json.loads(f["classes"]), per_class=int(f["per_class"]),
                   seed_start=int(f["seed_start"]), preset_name=f["preset_name"],
                   preset=SamplerPreset(**json.loads(f["preset"])), shape=tuple(json.loads(f["shape"])),
                   model_version=f["model_version"], created_at=float(f["created_at"]),
                   volume=f.get("volume", "default"), owner=f.get("owner", ""))

    def job(self, index: int, deadline: float) -> Job:
        cls, seed = self.classes[index // self.per_class], self.seed_start + index % self.per_class
        return Job(class_id=cls, seed=seed, preset=self.preset, key=result_key(self.model_version, cls, seed, self.preset),
                   deadline=deadline, batch=self.id, index=index, id=f"{self.id}-{index}")

    def labels_seeds(self) -> tuple[np.ndarray, np.ndarray]:
        return sample_index(self.classes, self.per_class, self.seed_start)


images_file = batch_disk.images_file


def new_batch_id() -> str:
    return "b" + uuid.uuid4().hex[:23]


# -- API side ------------------------------------------------------------------------------
async def held(r: aioredis.Redis, keys: Keys) -> dict[str, tuple[int, str]]:
    """Every set file on disk or reserved: id -> (bytes, volume)."""
    out = {}
    for k, v in (await r.hgetall(keys.batch_held)).items():
        d = json.loads(v)
        out[k.decode()] = (int(d["bytes"]), d["volume"])
    return out


async def statuses(r: aioredis.Redis, keys: Keys, ids: list[str]) -> list[str | None]:
    """Each set's status (running, done, failed), None for a set whose record is gone: one round trip."""
    if not ids:
        return []
    pipe = r.pipeline(transaction=False)
    for batch_id in ids:
        pipe.hget(keys.batch(batch_id), "status")
    return [s.decode() if s is not None else None for s in await pipe.execute()]


async def running(r: aioredis.Redis, keys: Keys) -> dict[str, tuple[int, str]]:
    """The sets still running: id -> (bytes, volume). Only they will write more into their files."""
    found = await held(r, keys)
    ids = list(found)
    return {i: found[i] for i, st in zip(ids, await statuses(r, keys, ids), strict=True) if st == "running"}


async def create(r: aioredis.Redis, keys: Keys, spec: BatchSpec, batch_dir: Path, ttl_s: int,
                 max_bytes: int = 0) -> None:
    """Reserve the set's bytes and record it (one atomic step), then make its file on `batch_dir`
    (its volume); the jobs follow (`append_jobs`). NoRoom when the budget or the volume cannot hold it."""
    fields = {**spec.to_fields(), "status": "running", "done": "0", "failed": "0", "enqueued": "0",
              "ttl_s": str(ttl_s)}
    flat = [x for kv in fields.items() for x in kv]
    script = r.register_script(CREATE_LUA)
    ok, before = await script(keys=[keys.batch_held, keys.batch(spec.id), keys.batches],
                              args=[spec.id, spec.nbytes, spec.volume, max_bytes, 2 * ttl_s, spec.created_at,
                                    json.dumps(flat), keys.prefix])
    if not ok:
        left = max(0, max_bytes - int(before))
        raise NoRoom("budget", spec.nbytes, left,
                     f"this set needs {spec.nbytes:,} bytes; the sample sets' budget (LDIT_BATCH_MAX_BYTES) is "
                     f"{max_bytes:,} bytes, of which {int(before):,} are held: room for {left:,}. Delete finished "
                     f"sets (DELETE /batches/{{id}}) or ask for fewer images")
    try:
        await asyncio.to_thread(batch_disk.make_file, batch_dir, spec.id, spec.nbytes)
    except OSError as err:  # the record must not outlive a file that was never made
        await forget(r, keys, spec.id)
        await asyncio.to_thread(batch_disk.remove_set, batch_dir, spec.id)
        await r.hdel(keys.batch_held, spec.id)
        raise NoRoom("volume", spec.nbytes, 0, f"the set's file could not be made on volume "
                                               f"{spec.volume!r}: {err.strerror or err}") from err


async def forget(r: aioredis.Redis, keys: Keys, batch_id: str) -> None:
    pipe = r.pipeline(transaction=True)
    pipe.delete(keys.batch(batch_id), keys.batch_done(batch_id), keys.batch_lease(batch_id))
    pipe.zrem(keys.batches, batch_id)
    await pipe.execute()


async def delete(r: aioredis.Redis, keys: Keys, batch_id: str, owner: str,
                 volumes: dict[str, Path]) -> dict | None:
    """Cancel and remove a set: records first (workers drop its samples from then on, its appender
    stops), then its queued jobs, then its file. None: no such set (or another key's).

    A crash after the records went leaves a file the sweeper removes."""
    found = await r.register_script(DELETE_LUA)(
        keys=[keys.batch(batch_id), keys.batch_done(batch_id), keys.batch_lease(batch_id), keys.batches],
        args=[batch_id, owner])
    if found is None:
        return None
    volume, nbytes = found[0].decode(), int(found[1])
    dropped = await drop_queued(r, keys, batch_id)
    volume_dir = volumes.get(volume)
    removed = volume_dir is not None and await asyncio.to_thread(batch_disk.remove_set, volume_dir, batch_id)
    if removed:  # else (a volume this process lacks) the sweeper of a process that has it removes the file
        await r.hdel(keys.batch_held, batch_id)
    return {"id": batch_id, "status": "deleted", "dropped_jobs": dropped, "freed_bytes": nbytes if removed else 0}


async def drop_queued(r: aioredis.Redis, keys: Keys, batch_id: str, chunk: int = 1000) -> int:
    """Delete (and acknowledge) every entry of the set still in the low-priority stream."""
    dropped, start = 0, "-"
    while True:
        entries = await r.xrange(keys.batch_stream, min=start, max="+", count=chunk)
        if not entries:
            return dropped
        mine = [eid for eid, f in entries if f.get(b"batch") == batch_id.encode()]
        if mine:
            pipe = r.pipeline(transaction=True)
            pipe.xack(keys.batch_stream, GROUP, *mine)
            pipe.xdel(keys.batch_stream, *mine)
            await pipe.execute()
            dropped += len(mine)
        if len(entries) < chunk:
            return dropped
        start = "(" + entries[-1][0].decode()


async def append_jobs(r: aioredis.Redis, keys: Keys, batch_id: str, ttl_s: int) -> bool:
    """Append the set's remaining jobs to the low-priority stream, under a lease.

    Returns False when another process holds the lease (it is appending them), or the set was
    deleted meanwhile. Resumable: `enqueued` advances with each chunk in the same script as its entries.
    """
    owner = uuid.uuid4().hex
    lease = keys.batch_lease(batch_id)
    if not await r.set(lease, owner, nx=True, px=LEASE_MS):
        return False
    script = r.register_script(APPEND_LUA)
    try:
        fields = {k.decode(): v.decode() for k, v in (await r.hgetall(keys.batch(batch_id))).items()}
        if not fields:
            return True
        spec = BatchSpec.from_fields(batch_id, fields)
        deadline = spec.created_at + int(fields.get("ttl_s", ttl_s))
        start = int(fields.get("enqueued", 0))
        while start < spec.total:
            end = min(spec.total, start + ENQUEUE_CHUNK)
            jobs = [json.dumps([x for kv in spec.job(i, deadline).to_fields().items() for x in kv])
                    for i in range(start, end)]
            if not await script(keys=[keys.batch_stream, keys.batch(batch_id), lease],
                                args=[owner, LEASE_MS, end, *jobs]):
                log.warning("stopped appending batch %s at %d (lease lost or set deleted)", batch_id, start)
                return False
            start = end
        return True
    finally:
        if await r.get(lease) == owner.encode():
            await r.delete(lease)


async def resume_all(r: aioredis.Redis, keys: Keys, ttl_s: int) -> int:
    """After an API restart: finish appending the jobs of every set left half-appended."""
    resumed = 0
    for raw in await r.zrangebyscore(keys.batches, time.time() - ttl_s, "+inf"):
        batch_id = raw.decode()
        enqueued, total = await r.hmget(keys.batch(batch_id), ["enqueued", "total"])
        if total is not None and int(enqueued or 0) < int(total):
            if await append_jobs(r, keys, batch_id, ttl_s):
                resumed += 1
    return resumed


async def read(r: aioredis.Redis, keys: Keys, batch_id: str) -> tuple[BatchSpec, dict[str, str]] | None:
    data = await r.hgetall(keys.batch(batch_id))
    if not data:
        return None
    fields = {k.decode(): v.decode() for k, v in data.items()}
    return BatchSpec.from_fields(batch_id, fields), fields


def progress(spec: BatchSpec, f: dict[str, str], now: float) -> dict:
    """done / total, images per second over the time the set has run (from the start of its first
    finished image to its last, or to now while it runs), and the time left at that rate."""
    done, failed = int(f.get("done", 0)), int(f.get("failed", 0))
    first, last = float(f.get("first_done_at", 0) or 0), float(f.get("last_done_at", 0) or 0)
    started = float(f.get("started_at", 0) or 0)
    finished = f.get("status") in ("done", "failed")
    end = last if finished else now
    if started and done and end > started:
        rate = done / (end - started)
    else:  # a record from before `started_at` was kept: the images after the first, over their span
        rate = (done - 1) / (end - first) if first and done > 1 and end > first else None
    left = spec.total - done - failed
    return {"done": done, "failed": failed, "total": spec.total, "enqueued": int(f.get("enqueued", 0)),
            "error": f.get("error"), "message": f.get("message"), "bytes": spec.nbytes, "volume": spec.volume,
            "images_per_s": round(rate, 3) if rate else None,
            "eta_s": 0.0 if finished else (round(left / rate, 1) if rate else None)}


# -- worker side ---------------------------------------------------------------------------
def stopped(r, keys: Keys, batch_ids: set[str]) -> set[str]:
    """The sets among `batch_ids` that are gone (deleted, expired) or stopped (failed): one round trip."""
    ids = sorted(batch_ids)
    pipe = r.pipeline(transaction=False)
    for batch_id in ids:
        pipe.hget(keys.batch(batch_id), "status")
    return {i for i, status in zip(ids, pipe.execute(), strict=True) if status in (None, b"failed")}


def stop(r, keys: Keys, batch_id: str, error: str, message: str) -> bool:
    """Fail a running set with a reason (a disk error): its other samples are dropped, not retried."""
    return bool(r.register_script(STOP_LUA)(keys=[keys.batch(batch_id), keys.batch_done(batch_id)],
                                            args=[error, message, repr(time.time())]))


def acknowledge(r, jobs: list[Job]) -> None:
    """Acknowledge and delete dropped jobs' entries (DELETE may have done so already: that is harmless)."""
    if not jobs:
        return
    pipe = r.pipeline(transaction=True)
    for job in jobs:
        pipe.xack(job.stream, GROUP, job.stream_id)
        pipe.xdel(job.stream, job.stream_id)
    pipe.execute()

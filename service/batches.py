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
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis
from PIL import Image

from model.sample_sets import ChunkSink, npz_chunks, raw_chunks, sample_index
from model.sampling import SamplerPreset
from service.jobs import Job, Keys, result_key

log = logging.getLogger("ldit.batches")

ENQUEUE_CHUNK = 500  # jobs appended per round trip
LEASE_MS = 15000

# KEYS: batch hash, done bitmap, stream. ARGV: index, group, entry id, now, outcome ("done"|"failed").
RECORD_LUA = """
local counted = 0
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('SETBIT', KEYS[2], ARGV[1], 1) == 0 then
  counted = 1
  local field = ARGV[5] == 'done' and 'done' or 'failed'
  redis.call('HINCRBY', KEYS[1], field, 1)
  if field == 'done' then
    redis.call('HSETNX', KEYS[1], 'first_done_at', ARGV[4])
    redis.call('HSET', KEYS[1], 'last_done_at', ARGV[4])
  end
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
  local h = redis.call('HMGET', KEYS[1], 'done', 'failed', 'total')
  if tonumber(h[1] or 0) + tonumber(h[2] or 0) >= tonumber(h[3]) then
    redis.call('HSET', KEYS[1], 'status', tonumber(h[2] or 0) > 0 and 'failed' or 'done', 'finished_at', ARGV[4])
  end
end
redis.call('XACK', KEYS[3], ARGV[2], ARGV[3])
redis.call('XDEL', KEYS[3], ARGV[3])
return counted
"""


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

    @property
    def total(self) -> int:
        return len(self.classes) * self.per_class

    def to_fields(self) -> dict[str, str]:
        return {"classes": json.dumps(self.classes), "per_class": str(self.per_class),
                "seed_start": str(self.seed_start), "preset_name": self.preset_name,
                "preset": json.dumps(self.preset.to_dict()), "shape": json.dumps(list(self.shape)),
                "model_version": self.model_version, "created_at": repr(self.created_at), "total": str(self.total)}

    @classmethod
    def from_fields(cls, batch_id: str, f: dict[str, str]) -> BatchSpec:
        return cls(id=batch_id, classes=json.loads(f["classes"]), per_class=int(f["per_class"]),
                   seed_start=int(f["seed_start"]), preset_name=f["preset_name"],
                   preset=SamplerPreset(**json.loads(f["preset"])), shape=tuple(json.loads(f["shape"])),
                   model_version=f["model_version"], created_at=float(f["created_at"]))

    def job(self, index: int, deadline: float) -> Job:
        cls, seed = self.classes[index // self.per_class], self.seed_start + index % self.per_class
        return Job(class_id=cls, seed=seed, preset=self.preset, key=result_key(self.model_version, cls, seed, self.preset),
                   deadline=deadline, batch=self.id, index=index, id=f"{self.id}-{index}")

    def labels_seeds(self) -> tuple[np.ndarray, np.ndarray]:
        return sample_index(self.classes, self.per_class, self.seed_start)


def images_file(batch_dir: Path, batch_id: str) -> Path:
    return Path(batch_dir) / batch_id / "images.u8"


def new_batch_id() -> str:
    return "b" + uuid.uuid4().hex[:23]


# -- API side ------------------------------------------------------------------------------
async def create(r: aioredis.Redis, keys: Keys, spec: BatchSpec, batch_dir: Path, ttl_s: int) -> None:
    """Make the set's file (sparse, full size) and its record; the jobs follow (`append_jobs`)."""
    path = images_file(batch_dir, spec.id)
    nbytes = spec.total * int(np.prod(spec.shape))

    def make_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(nbytes)

    await asyncio.to_thread(make_file)
    pipe = r.pipeline(transaction=True)
    pipe.hset(keys.batch(spec.id), mapping={**spec.to_fields(), "status": "running", "done": 0, "failed": 0,
                                            "enqueued": 0})
    pipe.expire(keys.batch(spec.id), ttl_s)
    pipe.zadd(keys.batches, {spec.id: spec.created_at})
    await pipe.execute()


async def append_jobs(r: aioredis.Redis, keys: Keys, batch_id: str, ttl_s: int) -> bool:
    """Append the set's remaining jobs to the low-priority stream, under a lease.

    Returns False when another process holds the lease (it is appending them). Resumable:
    `enqueued` advances with each chunk in the same transaction as its entries.
    """
    owner = uuid.uuid4().hex
    lease = keys.batch_lease(batch_id)
    if not await r.set(lease, owner, nx=True, px=LEASE_MS):
        return False
    try:
        fields = {k.decode(): v.decode() for k, v in (await r.hgetall(keys.batch(batch_id))).items()}
        if not fields:
            return True
        spec = BatchSpec.from_fields(batch_id, fields)
        deadline = spec.created_at + ttl_s
        start = int(fields.get("enqueued", 0))
        while start < spec.total:
            if await r.get(lease) != owner.encode():
                log.warning("lost the lease of batch %s at %d", batch_id, start)
                return False
            end = min(spec.total, start + ENQUEUE_CHUNK)
            pipe = r.pipeline(transaction=True)
            for index in range(start, end):
                pipe.xadd(keys.batch_stream, spec.job(index, deadline).to_fields())
            pipe.hset(keys.batch(batch_id), "enqueued", end)
            pipe.pexpire(lease, LEASE_MS)
            await pipe.execute()
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
    """done / total, images per second since the first image, and the time left at that rate."""
    done, failed = int(f.get("done", 0)), int(f.get("failed", 0))
    first, last = float(f.get("first_done_at", 0) or 0), float(f.get("last_done_at", 0) or 0)
    finished = f.get("status") in ("done", "failed")
    span = (last if finished else now) - first
    rate = (done - 1) / span if first and done > 1 and span > 0 else None
    left = spec.total - done - failed
    return {"done": done, "failed": failed, "total": spec.total, "enqueued": int(f.get("enqueued", 0)),
            "images_per_s": round(rate, 3) if rate else None,
            "eta_s": 0.0 if finished else (round(left / rate, 1) if rate else None)}


def tar_chunks(spec: BatchSpec, path: Path, png_level: int) -> Iterator[bytes]:
    """A tar of class{K}_seed{S}.png, each PNG encoded from the raw file as the stream goes."""
    labels, seeds = spec.labels_seeds()
    sink = ChunkSink()
    nbytes = int(np.prod(spec.shape))
    with open(path, "rb") as f, tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for i in range(spec.total):
            image = np.frombuffer(f.read(nbytes), dtype=np.uint8).reshape(spec.shape)
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG", compress_level=png_level)
            info = tarfile.TarInfo(f"class{labels[i]}_seed{seeds[i]}.png")
            info.size, info.mtime, info.mode = buf.tell(), int(spec.created_at), 0o644
            buf.seek(0)
            tar.addfile(info, buf)
            yield sink.take()
    yield sink.take()


def npz_stream(spec: BatchSpec, path: Path) -> Iterator[bytes]:
    labels, _ = spec.labels_seeds()
    nbytes = spec.total * int(np.prod(spec.shape))
    return npz_chunks(raw_chunks(path, nbytes), (spec.total, *spec.shape), labels)


# -- worker side ---------------------------------------------------------------------------
def write_image(batch_dir: Path, job: Job, image: np.ndarray) -> None:
    """Write one finished image at its offset, on disk before Redis counts it."""
    path = images_file(batch_dir, job.batch)
    data = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    fd = os.open(path, os.O_WRONLY)  # FileNotFoundError: batch_dir is not shared with the API
    try:
        if os.fstat(fd).st_size < (job.index + 1) * len(data):
            raise ValueError(f"{path} is too small for image {job.index} of {image.shape}")
        os.pwrite(fd, data, job.index * len(data))
        os.fdatasync(fd)
    finally:
        os.close(fd)

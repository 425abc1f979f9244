"""A sample set's file: one raw array of N x H x W x 3 uint8 images, class-major (the ADM .npz's
`arr_0` payload). Workers write each finished image at its offset; downloads stream it as an .npz,
or as a tar of PNGs encoded from it chunk by chunk."""

from __future__ import annotations

import errno
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from model.sample_sets import ChunkSink, npz_chunks, raw_chunks
from service.batches.disk import images_file
from service.batches.sets import BatchSpec
from service.store.jobs import Job, Keys


def tar_chunks(spec: BatchSpec, path: Path, encode: Callable[[np.ndarray], bytes]) -> Iterator[bytes]:
    """A tar of class{K}_seed{S}.png, each PNG encoded (`encode`) from the raw file as the stream goes."""
    labels, seeds = spec.labels_seeds()
    sink = ChunkSink()
    nbytes = int(np.prod(spec.shape))
    with open(path, "rb") as f, tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for i in range(spec.total):
            blob = encode(np.frombuffer(f.read(nbytes), dtype=np.uint8).reshape(spec.shape))
            info = tarfile.TarInfo(f"class{labels[i]}_seed{seeds[i]}.png")
            info.size, info.mtime, info.mode = len(blob), int(spec.created_at), 0o644
            tar.addfile(info, io.BytesIO(blob))
            yield sink.take()
    yield sink.take()


def npz_stream(spec: BatchSpec, path: Path) -> Iterator[bytes]:
    labels, _ = spec.labels_seeds()
    nbytes = spec.total * int(np.prod(spec.shape))
    return npz_chunks(raw_chunks(path, nbytes), (spec.total, *spec.shape), labels)


def set_file(r, keys: Keys, batch_id: str, volumes: dict[str, Path]) -> tuple[tuple, Path | None] | None:
    """(image shape, volume dir or None when this process lacks the set's volume), or None: no such set."""
    shape, volume = r.hmget(keys.batch(batch_id), ["shape", "volume"])
    if shape is None:
        return None
    return tuple(json.loads(shape)), volumes.get((volume or b"default").decode())


def write_image(batch_dir: Path, job: Job, image: np.ndarray) -> None:
    """Write one finished image at its offset (batch_dir: its set's volume), on disk before Redis counts it."""
    path = images_file(batch_dir, job.batch)
    data = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    fd = os.open(path, os.O_WRONLY)  # FileNotFoundError: batch_dir is not shared with the API
    try:
        if os.fstat(fd).st_size < (job.index + 1) * len(data):
            raise ValueError(f"{path} is too small for image {job.index} of {image.shape}")
        view, offset = memoryview(data), job.index * len(data)
        while view:  # a filling disk may take part of a write: the rest then fails with ENOSPC
            n = os.pwrite(fd, view, offset)
            if n <= 0:
                raise OSError(errno.EIO, f"pwrite wrote nothing at {offset} of {path}")
            view, offset = view[n:], offset + n
        os.fdatasync(fd)
    finally:
        os.close(fd)

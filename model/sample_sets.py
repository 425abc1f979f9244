"""Sample sets for FID: which (class, seed) each image is, and the ADM evaluator's .npz, streamed.

Order is class-major: image `i` is class `classes[i // per_class]` with seed
`seed_start + i % per_class`, so a set equals the same images requested one by one.

The .npz (`arr_0`: uint8 [N, H, W, 3], `arr_1`: int64 labels [N]) is written as a
stored (uncompressed) zip from an iterator of raw image bytes, never holding more than
one chunk: the same writer serves `python -m model.generate --npz` and the service's
`GET /batches/{id}/samples.npz`.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

CHUNK = 4 << 20  # bytes read from the raw image file at a time


def sample_index(classes: list[int], per_class: int, seed_start: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels [N], seeds [N]) of a set, class-major."""
    labels = np.repeat(np.asarray(classes, dtype=np.int64), per_class)
    seeds = np.tile(np.arange(seed_start, seed_start + per_class, dtype=np.int64), len(classes))
    return labels, seeds


class ChunkSink:
    """A write-only, unseekable file that hands back what was written since the last `take()`.

    zipfile, given one, writes each member's sizes after its data (data descriptors);
    tarfile's stream mode ("w|") needs nothing more."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


def npz_chunks(images: Iterable[bytes], shape: tuple[int, int, int, int], labels: np.ndarray) -> Iterator[bytes]:
    """The bytes of an .npz holding `arr_0` (uint8 `shape`, from the raw `images` bytes) and `arr_1`."""
    sink = ChunkSink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(
                member, {"descr": "|u1", "fortran_order": False, "shape": tuple(int(d) for d in shape)})
            written, expected = 0, int(np.prod(shape))
            for chunk in images:
                member.write(chunk)
                written += len(chunk)
                yield sink.take()
            if written != expected:
                raise ValueError(f"arr_0: {written} bytes of images for shape {shape} ({expected} bytes)")
        with zf.open("arr_1.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, np.ascontiguousarray(labels, dtype=np.int64))
        yield sink.take()
    yield sink.take()


def raw_chunks(path: Path, size: int | None = None) -> Iterator[bytes]:
    """The bytes of a raw image file, CHUNK at a time."""
    left = size if size is not None else path.stat().st_size
    with open(path, "rb") as f:
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise ValueError(f"{path} ends {left} bytes early")
            left -= len(chunk)
            yield chunk

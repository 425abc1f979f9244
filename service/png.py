"""A small PNG writer for 8-bit RGB: row filters in numpy, deflate by a fast library.

Why not Pillow: its encoder picks a filter per row by trying all five in C and then
deflates with zlib, 16.6 ms of CPU for a 256x256 photo at level 6 and still 4.4 ms at
level 0 (docs/benchmarks.md). Filtering the whole image at once in numpy costs a
fraction of a millisecond, and libdeflate (`deflate`) or ISA-L (`isal`) compress the
filtered rows several times faster than zlib at a similar size.
`bench/png_formats.py` measures every filter x compressor x level on the
service's own images; the defaults below are the best trade in that table.

Output is a standard PNG (IHDR, one IDAT, IEND), decoded by any reader; tests
decode it with Pillow and compare the pixels.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

import deflate
import numpy as np
from isal import isal_zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
FILTERS = ("none", "sub", "up", "average", "paeth")


# zlib-format (RFC 1950) compressors by name; isal and libdeflate are the fast ones.
COMPRESSORS: dict[str, Callable[[bytes, int], bytes]] = {
    "isal": isal_zlib.compress,
    "libdeflate": deflate.zlib_compress,
    "zlib": zlib.compress,
}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def filter_rows(image: np.ndarray, method: str) -> np.ndarray:
    """The filtered scanlines [H, 1 + W*3]: each row's filter-type byte, then its filtered bytes."""
    if method not in FILTERS:
        raise ValueError(f"unknown PNG filter {method!r} ({' | '.join(FILTERS)})")
    h, w, c = image.shape
    raw = image.reshape(h, w * c)
    out = np.empty((h, 1 + w * c), np.uint8)
    out[:, 0] = FILTERS.index(method)
    body = out[:, 1:]
    if method == "none":
        body[:] = raw
        return out
    left = np.zeros_like(raw)
    left[:, c:] = raw[:, :-c]
    up = np.zeros_like(raw)
    up[1:] = raw[:-1]
    if method == "sub":
        np.subtract(raw, left, out=body)  # uint8 arithmetic wraps mod 256, as PNG wants
    elif method == "up":
        np.subtract(raw, up, out=body)
    elif method == "average":
        np.subtract(raw, ((left.astype(np.uint16) + up) >> 1).astype(np.uint8), out=body)
    else:  # paeth
        corner = np.zeros_like(raw)
        corner[1:, c:] = raw[:-1, :-c]
        a, b, cc = left.astype(np.int16), up.astype(np.int16), corner.astype(np.int16)
        pa, pb, pc = np.abs(b - cc), np.abs(a - cc), np.abs(a + b - 2 * cc)
        pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, cc)).astype(np.uint8)
        np.subtract(raw, pred, out=body)
    return out


def encode(image: np.ndarray, level: int = 1, method: str = "up", compressor: str = "isal") -> bytes:
    """PNG bytes of a uint8 RGB image [H, W, 3]."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    if compressor not in COMPRESSORS:
        raise ValueError(f"PNG compressor {compressor!r} is not installed (have: {', '.join(COMPRESSORS)})")
    h, w, _ = image.shape
    idat = COMPRESSORS[compressor](filter_rows(image, method).tobytes(), level)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit truecolour, deflate, no interlace
    return b"".join((SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", idat), _chunk(b"IEND", b"")))


# The service's default, chosen from bench/png_formats.py's table (docs/benchmarks.md).
DEFAULTS = {"compressor": "isal", "level": 1, "method": "up"}

#!/usr/bin/env python
"""PNG bytes against CPU ms per image: Pillow's encoder, and service/png.py by filter x compressor x level.

Encodes the simulated engine's photo crops (256x256 crops of real photographs, the images the
one-worker benchmark serves) one after another in this process and reports, per setting, the
CPU time per image (`time.process_time`, so the numbers hold on a loaded machine) and the mean
PNG size, side by side in one run. Every PNG is decoded back with Pillow and compared with the
source pixels, so a setting that wrote a broken file fails the run. The default that
service/png.py ships is the point of this table where few ms buy few bytes.

    python bench/png_formats.py
    python bench/png_formats.py --images 64 --json bench/out/png_formats.json --markdown

`--placement` also measures where the encoder could run, with the default writer: in a thread of
the process that holds the pixels (the worker's store pool), or in a process pool the pixels are
sent to (pickled through a pipe, the PNG sent back). CPU per image of the parent and the children
together, and the bytes each placement moves: a process pool moves the raw pixels once more, and
encoding in the API would send raw pixels (not the PNG) through Redis.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import log, machine  # noqa: E402
from engines.simulated import crop_pool, photo_paths  # noqa: E402
from service import png  # noqa: E402

# (compressor, levels, filters) measured by default: the grid that decides the service's default.
GRID = [
    ("zlib", (1, 6), ("none", "sub", "up", "paeth")),
    ("libdeflate", (1, 3, 6), ("none", "sub", "up", "average", "paeth")),
    ("isal", (0, 1, 2), ("none", "sub", "up", "paeth")),
]


def pillow_png(image: np.ndarray, level: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def measure(encode, images: np.ndarray, repeats: int) -> dict:
    best = float("inf")
    for _ in range(repeats):  # best of the repeats: least disturbed by other processes
        t0 = time.process_time()
        blobs = [encode(im) for im in images]
        best = min(best, time.process_time() - t0)
    for im, blob in zip(images, blobs, strict=True):
        decoded = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
        if not np.array_equal(decoded, im):
            raise AssertionError("a PNG did not decode to its source pixels")
    return {"cpu_ms": 1000 * best / len(images), "kb": sum(map(len, blobs)) / len(images) / 1000}


def _encode_in_child(image: np.ndarray) -> tuple[bytes, float]:
    t0 = time.process_time()
    blob = png.encode(image)
    return blob, time.process_time() - t0


def placement(images: np.ndarray, repeats: int) -> list[dict]:
    """CPU per image (parent + children) of encoding in a thread pool against a process pool of 2."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    rows = []
    with ThreadPoolExecutor(2) as threads:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.process_time()
            list(threads.map(png.encode, images))
            best = min(best, time.process_time() - t0)
        rows.append({"placement": "thread pool (2) in the worker", "cpu_ms": 1000 * best / len(images),
                     "extra_bytes": 0})
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as procs:
        list(procs.map(_encode_in_child, images[:2]))  # start the children before timing
        best = float("inf")
        for _ in range(repeats):
            t0 = time.process_time()
            child = sum(c for _, c in procs.map(_encode_in_child, images))
            best = min(best, time.process_time() - t0 + child)
        rows.append({"placement": "process pool (2, spawn) beside the worker", "cpu_ms": 1000 * best / len(images),
                     "extra_bytes": images[0].nbytes + len(png.encode(images[0]))})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--placement", action="store_true", help="also: thread pool against process pool")
    a = p.parse_args()
    images = crop_pool(photo_paths(), a.size, count=a.images)
    raw_kb = images[0].nbytes / 1000
    rows = []
    for level in (1, 6):
        rows.append({"encoder": "Pillow", "level": level, "filter": "adaptive",
                     **measure(lambda im, lv=level: pillow_png(im, lv), images, a.repeats)})
        log(f"Pillow level {level}: {rows[-1]}")
    for name, levels, filters in GRID:
        for level in levels:
            for method in filters:
                enc = lambda im, lv=level, m=method, c=name: png.encode(im, lv, m, c)  # noqa: E731
                rows.append({"encoder": name, "level": level, "filter": method, **measure(enc, images, a.repeats)})
                log(f"{name} level {level} {method}: {rows[-1]['cpu_ms']:.2f} ms, {rows[-1]['kb']:.1f} kB")
    d = png.DEFAULTS
    default = {"encoder": d["compressor"], "level": d["level"], "filter": d["method"]}
    out = {"machine": machine(), "images": a.images, "size": a.size, "raw_kb": raw_kb, "default": default,
           "rows": rows}
    if a.placement:
        out["placement"] = placement(images, a.repeats)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2))
    print(f"{a.images} photo crops {a.size}x{a.size} (raw {raw_kb:.0f} kB), CPU ms per image, best of {a.repeats}")
    if a.markdown:
        print("| encoder | level | filter | CPU ms per image | kB per image |\n|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["cpu_ms"]):
        mark = " (default)" if all(r[k] == v for k, v in default.items()) else ""
        if a.markdown:
            print(f"| {r['encoder']}{mark} | {r['level']} | {r['filter']} | {r['cpu_ms']:.2f} | {r['kb']:.1f} |")
        else:
            print(f"{r['encoder']:>10} {r['level']:>2} {r['filter']:>8}  {r['cpu_ms']:6.2f} ms  {r['kb']:6.1f} kB{mark}")
    for r in out.get("placement", []):
        print(f"placement: {r['placement']}: {r['cpu_ms']:.2f} CPU ms per image (parent + children), "
              f"{r['extra_bytes'] / 1000:.0f} kB more copied per image")


if __name__ == "__main__":
    main()

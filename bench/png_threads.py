#!/usr/bin/env python
"""Does PNG encoding hold the GIL? CPU per image by zlib level, and one thread against several.

The worker encoded PNGs with Pillow on a thread pool (before service/png.py) (`LDIT_PNG_THREADS`) next to its compute thread; if
Pillow held the GIL while compressing, those threads would stall the compute loop. Encodes the
simulated engine's photo crops (256x256, the size the service makes) with the worker's own
Pillow encoder (bench/png_formats.py's `pillow_png`), serially and then split over `--threads` threads, and prints the speedup (close to
the thread count: the compression runs without the GIL).

    python bench/png_threads.py
    python bench/png_threads.py --images 240 --threads 2 --levels 1,6
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.png_formats import pillow_png as encode_png  # noqa: E402
from engines.simulated import crop_pool, photo_paths  # noqa: E402


def encode_all(images, level: int) -> None:
    for image in images:
        encode_png(image, level)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=120)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--levels", default="1,6", help="zlib levels, comma-separated")
    p.add_argument("--size", type=int, default=256)
    args = p.parse_args()
    pool = crop_pool(photo_paths(), args.size, count=args.images)
    for level in (int(x) for x in args.levels.split(",")):
        cpu, start = time.process_time(), time.perf_counter()
        encode_all(pool, level)
        serial, cpu = time.perf_counter() - start, time.process_time() - cpu
        parts = [pool[k::args.threads] for k in range(args.threads)]
        threads = [threading.Thread(target=encode_all, args=(part, level)) for part in parts]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        parallel = time.perf_counter() - start
        print(f"level {level}: {cpu / args.images * 1e3:.1f} ms CPU per image; serial {serial:.2f} s, "
              f"{args.threads} threads {parallel:.2f} s, speedup {serial / parallel:.2f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Capacity plan (issue 14, part 5): what serving R images/s of XL/1 800ep takes.

Pure arithmetic on measured per-image costs and stated assumptions; every input is an option
whose default names where it comes from. docs/capacity.md shows this command's output and
explains the design choices behind it.

    python bench/capacity.py
    python bench/capacity.py --gpu-price 2.5 --gpu-images-per-s 3.88    # a fused engine, a cheaper card
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass

# Defaults: (value, source). Measured values name the run; the rest are assumptions.
INPUTS = {
    "gpu_images_per_s": (1.50, "measured: XL/1 800ep recipe on one H200, bf16 + CUDA graphs (docs/benchmarks.md, 'GPU: NVIDIA H200')"),
    "utilisation": (0.70, "assumption: run GPUs at 70% of capacity (the batching model gives p50 4.2 s, p99 10.7 s there)"),
    "gpu_price": (4.00, "assumption: $ per H200-hour (on-demand cloud; reserved capacity is cheaper)"),
    "api_cpu_ms": (3.0, "measured: API CPU ms per image, 2.4-2.9 in the bench/one_worker.py runs of issue 20 (docs/benchmarks.md, 'Image path'); 5.1-8.6 before"),
    "worker_cpu_ms": (4.0, "measured: worker CPU ms per image incl. the PNG (service/png.py), 3.1-3.7 in the bench/one_worker.py runs of issue 20; 26-41 with Pillow level 6 before"),
    "api_core_share": (0.5, "assumption: one API replica = one uvicorn process (one core), run at 50%"),
    "redis_cpu_ms": (2.1, "measured: Redis command-thread CPU ms per image (INFO), PNG stored in Redis and published to the API, 1.7-2.1 (bench/one_worker.py, issue 20)"),
    "redis_cpu_ms_no_png": (0.65, "measured: Redis CPU ms per image with small PNGs (bench/one_worker.py --images bundle)"),
    "redis_core_share": (0.5, "assumption: Redis's main thread at 50% of a core"),
    "png_kb": (110.0, "measured: mean PNG size of a 256x256 photo-like image, up filter + ISA-L level 1 (bench/one_worker.py)"),
    "redis_kb_per_image": (225.0, "measured: Redis network in + out per image, 113 + 112 kB (bench/one_worker.py, issue 20)"),
    "result_ttl_s": (3600.0, "setting: LDIT_RESULT_TTL_S default (results double as the cache)"),
    "redis_memory_gb": (25.0, "assumption: memory for results per Redis instance"),
    "redis_net_mb_s": (600.0, "assumption: usable network per Redis instance (10 Gbit/s NIC at ~50%)"),
}


@dataclass
class Plan:
    images_per_s: int
    gpus: int
    workers: int
    api_replicas: int
    redis_png_inside: int  # instances if results stay in Redis
    redis_png_outside: int  # instances if results go to object storage / straight to the API
    redis_result_memory_gb: float
    redis_net_mb_s: float
    cpu_cores: float  # API + workers + Redis
    gpu_hours_per_million: float
    dollars_per_million: float


def plan(rate: float, v: dict) -> Plan:
    per_gpu = v["gpu_images_per_s"] * v["utilisation"]
    gpus = math.ceil(rate / per_gpu)
    api = max(2, math.ceil(rate * v["api_cpu_ms"] / 1000 / v["api_core_share"]))  # two for availability
    memory_gb = rate * v["result_ttl_s"] * v["png_kb"] / 1e6
    net = rate * v["redis_kb_per_image"] / 1000
    inside = max(math.ceil(rate * v["redis_cpu_ms"] / 1000 / v["redis_core_share"]),
                 math.ceil(memory_gb / v["redis_memory_gb"]), math.ceil(net / v["redis_net_mb_s"]))
    outside = math.ceil(rate * v["redis_cpu_ms_no_png"] / 1000 / v["redis_core_share"])
    cores = rate * (v["api_cpu_ms"] + v["worker_cpu_ms"] + v["redis_cpu_ms"]) / 1000
    gpu_hours = 1e6 / per_gpu / 3600
    return Plan(int(rate), gpus, gpus, api, inside, max(1, outside), round(memory_gb, 1), round(net, 1),
                round(cores, 2), round(gpu_hours, 1), round(gpu_hours * v["gpu_price"], 0))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="10,1000,100000", help="images/s to plan for")
    for name, (value, source) in INPUTS.items():
        p.add_argument("--" + name.replace("_", "-"), type=float, default=value, help=source)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.parse_args(argv)
    v = {name: getattr(a, name) for name in INPUTS}
    plans = [plan(float(r), v) for r in a.rates.split(",")]
    if a.json:
        print(json.dumps({"inputs": v, "plans": [asdict(x) for x in plans]}, indent=2))
        return 0
    cols = list(asdict(plans[0]))
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for x in plans:
        print("| " + " | ".join(f"{val:,}" if isinstance(val, (int, float)) else str(val)
                                for val in asdict(x).values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

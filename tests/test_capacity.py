"""bench/capacity.py: the capacity plan's arithmetic (docs/capacity.md shows its output)."""

import json
import math
import subprocess
import sys
from pathlib import Path

from bench.capacity import INPUTS, plan

REPO = Path(__file__).resolve().parent.parent
DEFAULTS = {name: value for name, (value, _source) in INPUTS.items()}


def test_gpus_are_the_fewest_that_carry_the_rate_at_the_operating_load():
    for rate in (10, 1000, 100000):
        p = plan(rate, DEFAULTS)
        per_gpu = DEFAULTS["gpu_images_per_s"] * DEFAULTS["utilisation"]
        assert p.gpus * per_gpu >= rate > (p.gpus - 1) * per_gpu
        assert p.workers == p.gpus


def test_cost_per_million_follows_gpu_speed_and_price_not_rate():
    slow, fast = plan(1000, DEFAULTS), plan(1000, {**DEFAULTS, "gpu_images_per_s": 2 * DEFAULTS["gpu_images_per_s"]})
    assert slow.dollars_per_million == plan(10, DEFAULTS).dollars_per_million
    assert abs(fast.gpu_hours_per_million - slow.gpu_hours_per_million / 2) < 0.1
    pricier = plan(1000, {**DEFAULTS, "gpu_price": 2 * DEFAULTS["gpu_price"]})
    assert pricier.dollars_per_million == 2 * slow.dollars_per_million


def test_results_outside_redis_need_fewer_instances_and_memory_decides_when_inside():
    p = plan(1000, DEFAULTS)
    assert p.redis_png_outside < p.redis_png_inside
    assert p.redis_png_inside == math.ceil(p.redis_result_memory_gb / DEFAULTS["redis_memory_gb"])
    assert plan(10, DEFAULTS).api_replicas == 2  # two for availability even when one would do


def test_command_prints_every_input_and_plan():
    out = subprocess.run([sys.executable, "bench/capacity.py", "--json", "--rates", "10,1000"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    report = json.loads(out)
    assert set(report["inputs"]) == set(INPUTS)
    assert [p["images_per_s"] for p in report["plans"]] == [10, 1000]

"""bench/buckets.py in virtual time (the profile's costs on a clock: exact, no waiting): the engine's buckets
against powers of two at the XL/1 H200 profile, mixed requests (issue 24, item 6)."""

from __future__ import annotations

import json

from bench.buckets import PaddedCost, main
from engines.timing_profile import CostCurve
from engines.torch_backend import BUCKET_STEP


def test_padded_cost_charges_the_bucket_and_counts_the_waste():
    cost = PaddedCost(CostCurve(((1, 1.0), (64, 64.0))), [1, 2, 4, 8, 16, 24, 32, 64])
    assert cost(33) == 64.0 and cost(17) == 24.0
    assert (cost.needed, cost.computed) == (50, 88)


def test_the_engine_buckets_waste_less_and_serve_more_than_powers_of_two(tmp_path):
    assert main(["--requests", "160", "--loads", "0.7", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "buckets.json").read_text())
    old, new = result["policies"]["powers of two"], result["policies"][f"multiples of {BUCKET_STEP}"]
    assert new["buckets"] == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert new["saturated"]["waste"] <= 1.15 and new["saturated"]["waste"] < old["saturated"]["waste"]
    assert new["saturated"]["images_per_s"] > old["saturated"]["images_per_s"]
    assert new["runs"][0]["waste"] < old["runs"][0]["waste"]  # at 70% load too
    assert "| multiples of 8 | 11 |" in (tmp_path / "buckets.md").read_text()

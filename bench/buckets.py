#!/usr/bin/env python
"""Which padded batch sizes (CUDA-graph buckets) to capture: powers of two against multiples of 8 above 8.

With CUDA graphs a forward of R rows runs the smallest captured bucket >= R (engines/torch_backend.py),
so the rows computed can exceed the rows needed. Above 8 rows XL/1's forward time is linear in rows
(26.2, 50.8, 100.6 ms at 16, 32, 64 on the H200), so padding is paid in full: 33 rows in a 64-row
bucket cost as much as 64.

Both policies run the same requests through the service's Scheduler and DecodeQueue, in virtual time
on a timing profile (bench/batching.py's model: the profile's costs on a clock, no host work, exact
and deterministic), each forward charged at its bucket's cost. Reported per policy: rows computed per
row needed (the padding waste) and images/s, with every request queued at once (saturation) and at
open-loop Poisson loads (a share of the power-of-two capacity); the mixed workload (steps 25-250,
three presets) by default.

    python bench/buckets.py                                  # XL/1 H200 profile, max_rows 64 (seconds)
    python bench/buckets.py --profile b1-256-h200-derived --max-rows 32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.batching import Setup, arrivals, open_loop, workload  # noqa: E402
from bench.common import REPO, Model, in_thread, load_model, log  # noqa: E402
from engines.timing_profile import CostCurve, TimingProfile, load_profile  # noqa: E402
from engines.torch_backend import BUCKET_STEP, batch_buckets, bucket_for  # noqa: E402

# The engine's policy (BUCKET_STEP), the old one, and a finer one (more graphs to capture and to keep).
POLICIES = {"powers of two": 0, f"multiples of {BUCKET_STEP}": BUCKET_STEP, "multiples of 4": 4}


@dataclasses.dataclass
class PaddedCost:
    """A forward's cost at its bucket (the rows a CUDA graph computes), counting rows needed and computed."""

    curve: CostCurve
    buckets: list[int]
    needed: int = 0
    computed: int = 0

    def __call__(self, rows: int) -> float:
        bucket = bucket_for(rows, self.buckets)
        self.needed += rows
        self.computed += bucket
        return self.curve(bucket)

    def waste(self) -> float:
        return self.computed / self.needed if self.needed else float("nan")


def padded(profile: TimingProfile, max_rows: int, step: int) -> tuple[TimingProfile, PaddedCost]:
    cost = PaddedCost(profile.dit_ms, batch_buckets(max_rows, step))
    return dataclasses.replace(profile, dit_ms=cost), cost


def saturated(setup: Setup, cost: PaddedCost, max_rows: int, requests: int, seed: int, virtual: bool,
              time_limit: float = 0) -> dict:
    cost.needed = cost.computed = 0
    r = open_loop(setup, "step", max_rows, [0.0] * requests, workload(setup, requests, seed), time_limit, virtual)
    return {"images_per_s": r["completed"] / max(r["done_at"]), "waste": cost.waste(), "mean_rows": r["mean_rows"],
            "forwards": r["forwards"], "completed": r["completed"]}


def run_policy(setup: Setup, step: int, max_rows: int, requests: int, loads: list[float], capacity: float | None,
               seed: int, wall: int) -> dict:
    profile, cost = padded(setup.profile, max_rows, step)
    s = dataclasses.replace(setup, profile=profile)
    out = {"buckets": cost.buckets, "runs": []}
    out["saturated"] = saturated(s, cost, max_rows, requests, seed, virtual=True)
    if wall:  # the simulated backend in wall-clock time: the host's real work, the device as the profile says
        from engines.simulated import SimulatedEngine

        engine = SimulatedEngine(setup.model.bundle, profile, max_rows)
        w = dataclasses.replace(s, engine=engine)
        out["saturated_wall"] = in_thread(saturated, w, cost, max_rows, wall, seed, False, 600)
    capacity = capacity or out["saturated"]["images_per_s"]
    for i, load in enumerate(loads):
        cost.needed = cost.computed = 0
        times = arrivals(load * capacity, requests, seed + 1 + i)
        r = open_loop(s, "step", max_rows, times, workload(s, requests, seed + 101 + i), 0, virtual=True)
        out["runs"].append({"load": load, "rate": load * capacity, "waste": cost.waste(), "throughput": r["throughput"],
                            "p50": r["p50"], "p99": r["p99"], "mean_rows": r["mean_rows"]})
    return out


def markdown(result: dict) -> str:
    names = list(result["policies"])
    lines = [f"Profile `{result['profile']}`, max_rows {result['max_rows']}, workload `{result['workload']}`, "
             f"{result['requests']} requests per run, virtual time (exact; `python bench/buckets.py`).", "",
             "| buckets | graphs | saturated images/s | vs powers of two | rows computed / needed | mean rows per forward |",
             "|---|---|---|---|---|---|"]
    base = result["policies"][names[0]]["saturated"]["images_per_s"]
    for name in names:
        pol = result["policies"][name]
        sat = pol["saturated"]
        lines.append(f"| {name} | {len(pol['buckets'])} | {sat['images_per_s']:.3f} | {sat['images_per_s'] / base:.3f}x | "
                     f"{sat['waste']:.3f} | {sat['mean_rows']:.1f} |")
    if all("saturated_wall" in pol for pol in result["policies"].values()):
        wall = [result["policies"][n]["saturated_wall"] for n in names]
        lines += ["", f"Simulated backend, wall clock, {wall[0]['completed']} requests at once: " + ", ".join(
            f"{n} {w['images_per_s']:.3f} images/s ({w['images_per_s'] / wall[0]['images_per_s']:.3f}x), waste "
            f"{w['waste']:.3f}" for n, w in zip(names, wall, strict=True)) + "."]
    lines += ["", "| load (of the powers-of-two capacity) | " + " | ".join(f"{n}: waste, p50 s" for n in names) + " |",
              "|---|" + "---|" * len(names)]
    for i, load in enumerate(result["loads"]):
        cells = [f"{p['runs'][i]['waste']:.3f}, {p['runs'][i]['p50']:.2f}" for p in result["policies"].values()]
        lines.append(f"| {load:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="xl1-256-h200-measured")
    p.add_argument("--max-rows", type=int, default=64)
    p.add_argument("--workload", default="mixed", choices=("mixed", "preset"))
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--loads", default="0.3,0.5,0.7,0.9")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wall", type=int, default=0, help="also N requests at saturation on the simulated backend, "
                   "wall clock (about N/3 s per policy on the XL/1 profile)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    a = p.parse_args(argv)
    started = time.time()
    profile = load_profile(a.profile)
    loads = [float(x) for x in a.loads.split(",")]
    result = {"profile": profile.name, "max_rows": a.max_rows, "workload": a.workload, "requests": a.requests,
              "loads": loads, "policies": {}}
    with tempfile.TemporaryDirectory(prefix="ldit-buckets-") as tmp:
        base = load_model("demo", Path(tmp))
        preset = base.bundle.spec.presets.get("800ep", base.preset)
        model = Model(base.key, base.label, base.root, base.bundle, preset, f"simulated: profile {profile.name}")
        setup = Setup(f"{profile.name}/{a.workload}", profile.name, model, a.workload, None, profile)
        capacity = None
        for name, step in POLICIES.items():  # powers of two first: its capacity sets the loads of both
            result["policies"][name] = run_policy(setup, step, a.max_rows, a.requests, loads, capacity, a.seed, a.wall)
            capacity = capacity or result["policies"][name]["saturated"]["images_per_s"]
    result["seconds"] = round(time.time() - started, 1)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "buckets.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (a.out / "buckets.md").write_text(text)
    log(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

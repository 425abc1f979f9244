#!/usr/bin/env python
"""Is an image the same whatever shares its batch? Mixed step-level batches against solo runs.

Each trial draws `--images` requests (random class, seed and sampler settings: the model's
presets with other step counts, CFG scales, intervals and shifts) with random arrival steps,
runs them through the service's Scheduler and Runner exactly as a worker does (step-level
batching up to `--max-rows` rows, finished samples decoded together), and runs every request
again alone. It reports the largest absolute difference of any pixel value (uint8) between an
image from a mixed batch and its solo run, and how many images and pixels differ at all.

    python bench/determinism.py                          # the demo model on CPU, 40 trials x 24 images
    python bench/determinism.py --trials 5 --images 12 --json out.json
    python bench/determinism.py --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engines.torch_backend import TorchEngine  # noqa: E402
from model.bundle import ModelBundle, load_bundle  # noqa: E402
from model.sampling import SamplerPreset  # noqa: E402
from service.store.jobs import Job  # noqa: E402
from service.worker.runner import Runner  # noqa: E402
from service.worker.scheduler import Scheduler  # noqa: E402

DEMO_DIR = REPO / "checkpoints" / "demo"


def variants(bundle: ModelBundle) -> list[SamplerPreset]:
    """Sampler settings a mixed production queue would carry: the presets and overrides of them."""
    out = [p for p in bundle.spec.presets.values() if p.num_steps <= 64]  # 250-step recipes only slow trials
    for steps in (8, 12, 20, 31):
        for cfg, interval, shift, channels in ((1.0, None, 0.0, 3), (3.0, None, 0.0, 3), (4.5, 0.2, 0.3, 3),
                                               (7.0, 0.1, 1.5, None)):
            out.append(SamplerPreset(num_steps=steps, cfg_scale=cfg, cfg_interval_start=interval,
                                     timestep_shift=shift, cfg_channels=channels))
    return out


def run(runner: Runner, bundle: ModelBundle, max_rows: int, arrivals: dict[int, list[Job]]) -> dict[str, np.ndarray]:
    """Images by job key, made the way a worker makes them."""
    scheduler = Scheduler(max_rows, bundle.spec.latent_shape, "step", device=runner.engine.device)
    waiting: deque[Job] = deque()
    images, tick = {}, 0
    with torch.inference_mode():
        while tick <= max(arrivals) or waiting or scheduler.active:
            waiting.extend(arrivals.get(tick, []))
            scheduler.admit_waiting(waiting)
            plan = scheduler.schedule()
            if plan is not None:
                x_next, seconds = runner.step(plan)
                finished = scheduler.commit(plan, x_next, seconds)
                if finished:
                    decoded, _ = runner.decode([s.x for s in finished])
                    images.update({s.job.key: img for s, img in zip(finished, decoded, strict=True)})
            tick += 1
    return images


def measure(bundle: ModelBundle, trials: int, images: int, max_rows: int, seed: int = 0, device: str = "cpu",
            precision: str = "fp32", log=print) -> dict:
    runner = Runner(TorchEngine(bundle, device=device, precision=precision, max_rows=max_rows),
                    bundle.stats, bundle.null_class)
    presets = variants(bundle)
    rng = random.Random(seed)
    worst, differing_images, differing_pixels, total_pixels, count = 0, 0, 0, 0, 0
    histogram: dict[int, int] = {}
    start = time.time()
    for trial in range(trials):
        jobs = [Job(class_id=rng.randrange(bundle.spec.num_classes), seed=rng.randrange(2**31),
                    preset=rng.choice(presets), key=f"{trial}-{i}", deadline=float("inf")) for i in range(images)]
        arrivals: dict[int, list[Job]] = {}
        for job in jobs:
            arrivals.setdefault(rng.randrange(0, 24), []).append(job)
        mixed = run(runner, bundle, max_rows, arrivals)
        for job in jobs:
            solo = run(runner, bundle, max_rows, {0: [job]})[job.key]
            diff = np.abs(mixed[job.key].astype(np.int16) - solo.astype(np.int16))
            worst = max(worst, int(diff.max()))
            differing_images += int(diff.max() > 0)
            differing_pixels += int((diff > 0).sum())
            total_pixels += diff.size
            for value, n in zip(*np.unique(diff, return_counts=True), strict=True):
                histogram[int(value)] = histogram.get(int(value), 0) + int(n)
            count += 1
        log(f"trial {trial + 1}/{trials}: worst so far {worst}, differing images {differing_images}/{count} "
            f"({time.time() - start:.0f} s)")
    return {"model": bundle.spec.name, "trials": trials, "images": count, "max_rows": max_rows,
            "max_abs_pixel_diff": worst, "images_differing": differing_images,
            "pixels_differing": differing_pixels, "pixels": total_pixels,
            "diff_histogram": histogram, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.machine(),
            "precision": precision}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=DEMO_DIR)
    ap.add_argument("--b1", action="store_true", help="LightningDiT-B/1 at 16x16x32 latents, random weights "
                                                       "(bench/common.py) instead of --model-dir")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--images", type=int, default=24, help="requests per mixed trial")
    ap.add_argument("--max-rows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.b1:
        from bench.common import make_b1_bundle

        bundle = load_bundle(make_b1_bundle(Path(tempfile.mkdtemp()) / "b1"))
    else:
        bundle = load_bundle(args.model_dir)
    report = measure(bundle, args.trials, args.images, args.max_rows, device=args.device, precision=args.precision)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

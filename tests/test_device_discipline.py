"""The serving loop on a device that is not the CPU, without a GPU: torch's `meta` device.

A meta tensor has a device and a shape but no data, so everything that would
fail on CUDA fails here too: mixing a CPU tensor into a device computation
raises, and so does any data-dependent operation (`nonzero`, `.item()`, a
device-to-host copy) that would make the host wait for the GPU each step. The
real scheduler, runner and worker loop run here with the real DiT on `meta`;
only the decoder's last step (uint8 pixels, which a meta tensor cannot hold)
returns zeros after running the real decoder on meta.
"""

from __future__ import annotations

import io
import random
import threading
import time
from collections import deque

import pytest
import redis
import torch
from PIL import Image

from engines.torch_backend import TorchEngine
from model.bundle import load_bundle
from service.settings import Settings
from service.store.jobs import Job, Keys
from service.worker.loop import Worker
from service.worker.runner import Runner
from service.worker.scheduler import Scheduler
from tests.service_harness import have_redis_server, make_tiny_bundle, start_redis
from tests.test_scheduler import PRESETS, job


class MetaEngine(TorchEngine):
    """The torch backend on the meta device: real modules, shapes and devices, no data."""

    def __init__(self, bundle):
        super().__init__(bundle, "meta", "fp32", max_rows=8)
        self.forwards = 0

    def velocity(self, x, t, y):
        for name, v in (("x", x), ("t", t), ("y", y)):
            assert v.device.type == "meta", f"{name} reached the engine on {v.device}, not the engine's device"
        self.forwards += 1
        return super().velocity(x, t, y)

    @torch.inference_mode()
    def decode(self, z):
        assert z.device.type == "meta", f"latents reached the decoder on {z.device}"
        img = self.vae.decode(z)  # the real decoder, on meta: shapes and devices checked
        n, _, h, w = img.shape
        return torch.zeros((n, h, w, 3), dtype=torch.uint8)  # the interface: uint8 on the CPU


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle"))


def meta_runner(bundle_dir) -> Runner:
    bundle = load_bundle(bundle_dir)
    return Runner(MetaEngine(bundle), bundle.stats, bundle.null_class)


def test_scheduler_and_runner_keep_every_sample_on_the_engine_device(bundle_dir):
    """Mid-flight admissions, mixed presets, guided and unguided rows: every step runs on meta."""
    runner = meta_runner(bundle_dir)
    scheduler = Scheduler(max_rows=8, latent_shape=runner.engine.latent_shape, device=runner.engine.device)
    rng = random.Random(1)
    arrivals: dict[int, list[Job]] = {}
    for i in range(12):
        arrivals.setdefault(rng.randrange(0, 15), []).append(job(rng.randrange(10), i, rng.choice(sorted(PRESETS))))
    waiting: deque[Job] = deque()
    finished, mid_flight, step = [], 0, 0
    while step <= max(arrivals) or waiting or scheduler.active:
        waiting.extend(arrivals.get(step, []))
        was_active = bool(scheduler.active)
        admitted = scheduler.admit_waiting(waiting)
        mid_flight += len(admitted) if was_active else 0
        plan = scheduler.schedule()
        if plan is not None:
            x_next, _ = runner.step(plan)
            assert x_next.device.type == "meta"
            finished += scheduler.commit(plan, x_next, 0.0)
        step += 1
        assert step < 1000
    assert len(finished) == 12
    assert mid_flight > 0, "the test must admit samples into a running batch"
    images, _ = runner.decode([s.x for s in finished])
    assert images.shape == (12, 32, 32, 3)


@pytest.mark.parametrize("kind", ["debian", "embedded"])
def test_worker_loop_serves_on_a_non_cpu_device(bundle_dir, kind):
    if kind == "debian" and not have_redis_server():
        pytest.skip("Debian redis-server is not installed (scripts/test.sh installs it)")
    server = start_redis(kind)
    settings = Settings(redis_url=server.url, key_prefix=f"meta{kind}", max_batch_size=8, max_queue_delay_ms=0,
                        heartbeat_interval_s=0.2, png_threads=1, model_dir=bundle_dir)
    r = redis.Redis.from_url(server.url)
    bundle = load_bundle(bundle_dir)
    runner = meta_runner(bundle_dir)
    worker = Worker(settings, r, lambda: (runner, bundle.spec, "meta-v1",
                                          {"backend": "torch", "device": "meta", "precision": "fp32"}))
    assert worker.scheduler.device.type == "meta"
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    keys = Keys(settings.key_prefix)
    try:
        jobs = []
        for i in range(10):  # staggered: later jobs join a running batch
            j = Job(class_id=i % 10, seed=100 + i, preset=bundle.spec.presets["quick" if i % 2 else "allchannels"],
                    key=f"k{i}", deadline=time.time() + 120)
            r.xadd(keys.stream, j.to_fields())
            jobs.append(j)
            time.sleep(0.02)
        deadline = time.time() + 60
        while time.time() < deadline:
            states = [r.hget(keys.job(j.id), "status") for j in jobs]
            if all(s in (b"done", b"failed") for s in states):
                break
            time.sleep(0.05)
        states = {j.id: r.hgetall(keys.job(j.id)) for j in jobs}
        assert all(s.get(b"status") == b"done" for s in states.values()), states
        for s in states.values():
            png = r.hget(keys.result(s[b"key"].decode()), "png")
            assert Image.open(io.BytesIO(png)).size == (32, 32)
        assert runner.engine.forwards > 0
    finally:
        worker.stop()
        thread.join(timeout=30)
        server.stop()

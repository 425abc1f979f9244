"""The serving loop on a CUDA GPU: device discipline, graph capture beside a running loop, cuda:N.

Skipped where torch sees no CUDA GPU (the meta-device tests in test_device_discipline.py
hold the same loop to the same rules on any machine). scripts/gpu_check.sh runs these.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque

import pytest
import torch

from engines.torch_backend import PARITY_REL_TOL, TorchEngine
from model.bundle import load_bundle
from model.sampling import initial_noise, sample
from service.store.jobs import Job
from service.worker.runner import Runner
from service.worker.scheduler import Scheduler
from tests.service_harness import make_tiny_bundle
from tests.test_scheduler import PRESETS, job

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none here)")]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle"))


def run_staggered(runner: Runner, scheduler: Scheduler, jobs_at: dict[int, list[Job]]) -> dict[str, torch.Tensor]:
    waiting: deque[Job] = deque()
    done, step = {}, 0
    while step <= max(jobs_at) or waiting or scheduler.active:
        waiting.extend(jobs_at.get(step, []))
        scheduler.admit_waiting(waiting)
        plan = scheduler.schedule()
        if plan is not None:
            x_next, _ = runner.step(plan)
            for s in scheduler.commit(plan, x_next, 0.0):
                done[s.job.key] = s.x
        step += 1
    return done


def test_mid_flight_admission_on_cuda_equals_solo_runs(bundle_dir):
    bundle = load_bundle(bundle_dir)
    engine = TorchEngine(bundle, "cuda", "fp32", 8)
    runner = Runner(engine, bundle.stats, bundle.null_class)
    scheduler = Scheduler(8, bundle.spec.latent_shape, device=engine.device)
    rng = random.Random(0)
    jobs_at: dict[int, list[Job]] = {}
    jobs = []
    for i in range(10):
        j = job(rng.randrange(10), 500 + i, rng.choice(sorted(PRESETS)))
        jobs_at.setdefault(rng.randrange(0, 12), []).append(j)
        jobs.append(j)
    done = run_staggered(runner, scheduler, jobs_at)
    for j in jobs:
        noise = initial_noise(j.seed, bundle.spec.latent_shape)[None].cuda()
        with torch.inference_mode():
            solo = sample(engine.velocity, noise, torch.tensor([j.class_id], device="cuda"), j.preset,
                          bundle.null_class)[0]
        assert done[j.key].device.type == "cuda"
        torch.testing.assert_close(done[j.key], solo, rtol=1e-3, atol=1e-3)


def bundle_job(bundle, i: int, preset: str) -> Job:
    return Job(class_id=i % 10, seed=i, preset=bundle.spec.presets[preset], key=f"{preset}-{i}",
               deadline=time.time() + 600)


def test_graph_capture_beside_a_running_loop(bundle_dir):
    """A hot swap captures CUDA graphs in a loader thread while the serving loop keeps stepping."""
    bundle = load_bundle(bundle_dir)
    serving = TorchEngine(bundle, "cuda", "bf16", 8, cuda_graphs=True)
    serving.warmup()
    runner = Runner(serving, bundle.stats, bundle.null_class)
    scheduler = Scheduler(8, bundle.spec.latent_shape, device=serving.device)
    stop, errors, steps = threading.Event(), [], [0]

    def serve():
        try:
            waiting = deque(bundle_job(bundle, i, "long") for i in range(6))
            while not stop.is_set():
                if not scheduler.active:
                    waiting.extend(bundle_job(bundle, i, "long") for i in range(6))
                scheduler.admit_waiting(waiting)
                plan = scheduler.schedule()
                x_next, _ = runner.step(plan)
                scheduler.commit(plan, x_next, 0.0)
                steps[0] += 1
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        loaded = TorchEngine(load_bundle(bundle_dir), "cuda", "bf16", 8, cuda_graphs=True)
        loaded.warmup()  # captures every bucket while the other thread runs kernels
        before = steps[0]
        x = torch.randn(3, *bundle.spec.latent_shape, device="cuda")
        t = torch.rand(3, device="cuda")
        y = torch.tensor([1, 2, bundle.null_class], device="cuda")
        eager = TorchEngine(load_bundle(bundle_dir), "cuda", "bf16", 8)
        torch.testing.assert_close(loaded.velocity(x, t, y), eager.velocity(x, t, y), rtol=2e-2, atol=2e-2)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors
    assert steps[0] > before > 0, "the serving loop must have stepped during the capture"
    assert len(loaded.graphs.graphs) == len(loaded.graphs.buckets)


def test_explicit_device_index_is_honoured(bundle_dir):
    index = torch.cuda.device_count() - 1  # the last GPU: cuda:1 on a two-GPU machine
    bundle = load_bundle(bundle_dir)
    engine = TorchEngine(bundle, f"cuda:{index}", "bf16", 4, cuda_graphs=True)
    engine.warmup()
    runner = Runner(engine, bundle.stats, bundle.null_class)
    scheduler = Scheduler(4, bundle.spec.latent_shape, device=engine.device)
    done = run_staggered(runner, scheduler, {0: [bundle_job(bundle, 1, "quick")]})
    (x,) = done.values()
    assert x.device == torch.device("cuda", index)
    images, _ = runner.decode([x])
    assert images.shape[0] == 1
    assert engine.info.device == f"cuda:{index}"


@pytest.mark.parametrize("qk_norm", [False, True])
def test_sdpa_takes_the_flash_backend_with_the_models_qk_layout(qk_norm):
    """q, k, v reach SDPA as bf16 [N, h, T, d] tensors strided over the qkv output (v always; q and k after
    RoPE's fp32 island and the cast back, with or without qk-norm): flash attention must accept that layout,
    or SDPA would quietly fall back to a slower kernel. Restricted to flash, SDPA raises instead."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from engines.lowp_dit import lowp_dit
    from engines.random_bundle import perturb_
    from model.lightningdit import create_lightningdit

    torch.manual_seed(0)
    dit = create_lightningdit("LightningDiT-XL/1", depth=2, use_qknorm=qk_norm).eval()
    perturb_(dit, 1, big=0.05, small=0.02)
    dit = lowp_dit(dit, torch.bfloat16).cuda()
    x = torch.randn(4, 32, 16, 16, device="cuda")
    t = torch.rand(4, device="cuda")
    y = torch.tensor([1, 2, 3, 1000], device="cuda")
    with torch.inference_mode():
        with sdpa_kernel(SDPBackend.MATH):
            ref = dit(x, t, y).float()
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = dit(x, t, y).float()
    assert torch.isfinite(flash).all()
    # two bf16 attention kernels: 0.8-0.9% apart when the same check runs on the CPU's flash kernel
    assert float((flash - ref).abs().max() / ref.abs().max()) < PARITY_REL_TOL["bf16"]


def test_compiled_blocks_with_cuda_graphs_match_eager_on_every_bucket(bundle_dir):
    """Regional compilation on CUDA (Triton), with a CUDA graph per bucket on top: one graph for every bucket,
    and the same velocities as the eager bf16 engine within the bf16 bound."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = TorchEngine(load_bundle(bundle_dir), "cuda", "bf16", 8, compile=True, cuda_graphs=True)
    compiled.warmup()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert len(compiled.graphs.graphs) == len(compiled.graphs.buckets)
    fp32 = TorchEngine(load_bundle(bundle_dir), "cuda", "fp32", 8)
    for rows in (1, 3, 8):
        x = torch.randn(rows, *compiled.latent_shape, device="cuda")
        t = torch.rand(rows, device="cuda")
        y = torch.randint(0, compiled.null_class + 1, (rows,), device="cuda")
        ref = fp32.velocity(x, t, y)
        got = compiled.velocity(x, t, y)
        assert float((got - ref).abs().max() / ref.abs().max()) < PARITY_REL_TOL["bf16"]
    assert counters["stats"]["unique_graphs"] == 1


def test_decode_async_hands_pinned_images_over_without_blocking(bundle_dir):
    """Issue 20: the decode's uint8 images and finiteness flags reach pinned host memory through a
    non-blocking copy; after the mark they equal the synchronous decode, NaN latents flagged."""
    bundle = load_bundle(bundle_dir)
    engine = TorchEngine(bundle, "cuda", "fp32", 4)
    runner = Runner(engine, bundle.stats, bundle.null_class)
    z = torch.randn((3, *bundle.spec.latent_shape), device="cuda")
    z[2, 0, 0, 0] = float("nan")
    decoded = runner.decode_async(list(z))
    assert decoded.images.is_pinned() and decoded.images.dtype == torch.uint8
    decoded.wait()
    assert decoded.finite.tolist() == [True, True, False]
    images, _ = runner.decode(list(z[:2]))
    assert (decoded.images[:2].numpy() == images).all()

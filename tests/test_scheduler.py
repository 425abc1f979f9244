"""Step-level batching on the real engine: every sample equals its solo run, whatever shares its batch."""

from __future__ import annotations

import random
import time
from collections import deque

import numpy as np
import pytest
import torch

from engines.torch_backend import TorchEngine
from model.bundle import load_bundle
from model.latents import to_uint8
from model.sampling import SamplerPreset, initial_noise, sample
from service.store.jobs import Job
from service.worker.runner import Runner
from service.worker.scheduler import DecodeQueue, Sample, Scheduler
from tests.service_harness import make_tiny_bundle
from tests.test_service import psnr


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(make_tiny_bundle(tmp_path_factory.mktemp("bundle")))


@pytest.fixture(scope="module")
def runner(bundle):
    return Runner(TorchEngine(bundle), bundle.stats, bundle.null_class)


PRESETS = {
    "interval": SamplerPreset(num_steps=12, cfg_scale=4.0, cfg_interval_start=0.3, timestep_shift=0.3),
    "always": SamplerPreset(num_steps=7, cfg_scale=2.5),
    "allch": SamplerPreset(num_steps=9, cfg_scale=3.0, cfg_interval_start=0.2, cfg_channels=None),
    "plain": SamplerPreset(num_steps=5),
}


def job(class_id: int, seed: int, preset: str) -> Job:
    return Job(class_id=class_id, seed=seed, preset=PRESETS[preset], key=f"{class_id}-{seed}-{preset}",
               deadline=time.time() + 600)


def solo(bundle, j: Job) -> torch.Tensor:
    noise = initial_noise(j.seed, bundle.spec.latent_shape)[None]
    with torch.no_grad():
        return sample(bundle.dit, noise, torch.tensor([j.class_id]), j.preset, bundle.null_class)[0]


def drive(scheduler: Scheduler, runner: Runner, arrivals: dict[int, list[Job]]):
    """Run steps until everything finished; arrivals[k] join the queue before step k."""
    waiting: deque[Job] = deque()
    done, plans, step = {}, [], 0
    while step in arrivals or any(k > step for k in arrivals) or waiting or scheduler.active:
        waiting.extend(arrivals.get(step, []))
        scheduler.admit_waiting(waiting)
        plan = scheduler.schedule()
        if plan is not None:
            x_next, secs = runner.step(plan)
            plans.append(plan)
            for s in scheduler.commit(plan, x_next, secs):
                done[s.job.key] = s
        step += 1
        assert step < 10_000
    return done, plans


def test_staggered_mixed_presets_equal_solo_runs(bundle, runner):
    rng = random.Random(0)
    arrivals: dict[int, list[Job]] = {}
    jobs = []
    for i in range(14):
        j = job(rng.randrange(10), 1000 + i, rng.choice(sorted(PRESETS)))
        arrivals.setdefault(rng.randrange(0, 20), []).append(j)
        jobs.append(j)
    scheduler = Scheduler(max_rows=8, latent_shape=bundle.spec.latent_shape, batching="step")
    done, plans = drive(scheduler, runner, arrivals)
    assert sorted(done) == sorted(j.key for j in jobs)
    assert max(p.rows for p in plans) <= 8
    assert any(len({s.job.preset for s in p.samples}) > 1 for p in plans), "presets should share forwards"
    latents = [done[j.key].x for j in jobs]
    images = to_uint8(bundle.vae.decode(bundle.stats.denormalize(torch.stack(latents)))).numpy()
    for j, lat, img in zip(jobs, latents, images, strict=True):
        ref = solo(bundle, j)
        torch.testing.assert_close(lat, ref, rtol=0, atol=1e-4)
        ref_img = to_uint8(bundle.vae.decode(bundle.stats.denormalize(ref[None]))).numpy()[0]
        assert psnr(img, ref_img) >= 40


def test_unconditional_rows_only_inside_the_interval(bundle, runner):
    j = job(3, 5, "interval")
    scheduler = Scheduler(max_rows=8, latent_shape=bundle.spec.latent_shape)
    _, plans = drive(scheduler, runner, {0: [j]})
    grid_t = [float(p.t[0]) for p in plans]
    rows = [p.rows for p in plans]
    assert rows == [2 if t >= 0.3 else 1 for t in grid_t]
    assert {1, 2} <= set(rows)  # both phases happen
    assert len(plans) == PRESETS["interval"].num_steps - 1


def test_row_bound_fifo_and_no_starvation(bundle, runner):
    """Overcommitted rows defer the youngest samples, never the oldest, and admit nothing meanwhile."""
    scheduler = Scheduler(max_rows=4, latent_shape=bundle.spec.latent_shape)
    jobs = [job(i, i, "interval") for i in range(6)]
    waiting = deque(jobs)
    order, finished = [], []
    for _ in range(500):
        admitted = scheduler.admit_waiting(waiting)
        order += [s.job.key for s in admitted]
        plan = scheduler.schedule()
        if plan is None:
            break
        assert plan.rows <= 4
        if scheduler.deferred:
            assert scheduler.admission_rows() == 0
            oldest = min(s.seq for s in scheduler.active)
            assert oldest in {s.seq for s in plan.samples}
        x_next, secs = runner.step(plan)
        finished += [s.job.key for s in scheduler.commit(plan, x_next, secs)]
    assert order == [j.key for j in jobs]  # FIFO admission
    assert sorted(finished) == sorted(order)  # everyone finished


def test_request_level_batching_admits_only_into_an_empty_batch(bundle, runner):
    scheduler = Scheduler(max_rows=8, latent_shape=bundle.spec.latent_shape, batching="request")
    first = [job(i, i, "always") for i in range(3)]
    late = [job(9, 99, "plain")]
    done, plans = drive(scheduler, runner, {0: first, 1: late})
    steps_first = PRESETS["always"].num_steps - 1
    assert all(len(p.samples) == 3 for p in plans[:steps_first])  # the late job waited for the batch
    assert all(p.samples[0].job is late[0] for p in plans[steps_first:])
    assert len(done) == 4
    torch.testing.assert_close(done[late[0].key].x, solo(bundle, late[0]), rtol=0, atol=1e-4)


def test_step_level_admits_mid_flight(bundle, runner):
    scheduler = Scheduler(max_rows=8, latent_shape=bundle.spec.latent_shape, batching="step")
    first = [job(1, 1, "always")]
    late = [job(2, 2, "plain")]
    _, plans = drive(scheduler, runner, {0: first, 2: late})
    assert [len(p.samples) for p in plans[:4]] == [1, 1, 2, 2]


def test_runner_decode_batches(bundle, runner):
    lat = [initial_noise(s, bundle.spec.latent_shape) for s in range(3)]
    images, _ = runner.decode(lat)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8


def finished_sample(seq: int, at: float) -> Sample:
    s = Sample(job(seq % 10, seq, "plain"), torch.zeros(1), [0.0, 1.0], seq)
    s.finished_at = at
    return s


def test_decode_queue_waits_for_companions_only_while_the_rows_are_busy():
    q = DecodeQueue(max_delay_s=0.020, max_batch=3)
    a = finished_sample(0, 100.0)
    q.add([a])
    assert q.due(100.001, active_rows=8, max_rows=16) == []  # half the rows busy: wait for companions
    assert q.due(100.001, active_rows=7, max_rows=16) == [a]  # the accelerator has room: decode at once
    b, c = finished_sample(1, 100.0), finished_sample(2, 100.010)
    q.add([b, c])
    assert q.due(100.019, active_rows=16, max_rows=16) == []
    assert q.due(100.021, active_rows=16, max_rows=16) == [b, c]  # the oldest waited max_delay
    more = [finished_sample(i, 200.0) for i in range(3, 7)]
    q.add(more)
    assert q.due(200.0, active_rows=16, max_rows=16) == more[:3]  # max_batch reached: no more waiting
    assert q.due(200.0, active_rows=16, max_rows=16) == [] and len(q) == 1
    assert q.due(200.0, active_rows=0, max_rows=16) == more[3:]
    assert DecodeQueue(0.0).due(0.0, 16, 16) == []  # empty
    zero = DecodeQueue(0.0)
    zero.add([finished_sample(9, 1.0)])
    assert len(zero.due(1.0, active_rows=16, max_rows=16)) == 1  # no delay: every step's finished at once


def test_plans_put_guided_samples_first_and_commit_stamps_finish_times(bundle, runner):
    scheduler = Scheduler(max_rows=16, latent_shape=bundle.spec.latent_shape)
    for i, name in enumerate(["plain", "always", "plain", "always"]):
        scheduler.admit(job(i, i, name))
    plan = scheduler.schedule()
    assert plan.guided == [True, True, False, False]
    assert [s.job.preset for s in plan.samples] == [PRESETS["always"]] * 2 + [PRESETS["plain"]] * 2
    assert [s.seq for s in plan.samples] == [1, 3, 0, 2]  # admission order within each group
    x_next, secs = runner.step(plan)
    for s in plan.samples:
        s.step = len(s.grid) - 2  # one step from the end
    finished = scheduler.commit(plan, x_next, secs, now=123.0)
    assert len(finished) == 4 and {s.finished_at for s in finished} == {123.0}

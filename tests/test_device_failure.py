"""A lost CUDA context stops the worker (issue 24, items 7-9), checked on the CPU with CUDA-style errors.

After an illegal memory access or an uncorrectable ECC error every later CUDA call fails the same way: a
worker that kept going would keep heartbeating while every forward fails and its jobs are reclaimed again
and again. It must withdraw its heartbeat, leave its jobs for another worker and exit non-zero. The store
threads make the engine's device current before their first CUDA call, and a hot swap closes the old
engine.
"""

from __future__ import annotations

import threading
import time
from unittest import mock

import pytest
import torch

from engines.device import is_sticky_device_error
from service.runtime import build_worker, load_model
from service.settings import Settings
from service.store.jobs import GROUP, Job, Keys
from service.worker.results import Results
from service.worker.runner import Decoded
from tests.service_harness import make_tiny_bundle, start_redis

ILLEGAL_ADDRESS = ("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
                   "asynchronously reported at some other API call, so the stacktrace below might be incorrect.")


@pytest.mark.parametrize("message, sticky", [
    (ILLEGAL_ADDRESS, True),
    ("CUDA error: uncorrectable ECC error encountered", True),
    ("CUDA error: device-side assert triggered", True),
    ("CUDA error: unspecified launch failure", True),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False),  # recoverable: smaller batches may fit
    ("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x8)", False),
])
def test_sticky_errors_are_told_apart(message, sticky):
    assert is_sticky_device_error(RuntimeError(message)) is sticky
    try:  # and when it is the cause of what surfaced
        try:
            raise RuntimeError(message)
        except RuntimeError as inner:
            raise ValueError("step failed") from inner
    except ValueError as outer:
        assert is_sticky_device_error(outer) is sticky


def test_store_threads_make_the_engine_device_current_first(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.append((torch.device(d), threading.current_thread().name)))
    results = Results(Settings(png_threads=2), mock.MagicMock(), Keys("t"), "w", device=torch.device("cuda", 1))
    try:
        name = results.pool.submit(lambda: threading.current_thread().name).result()
    finally:
        results.shutdown()
    assert (torch.device("cuda", 1), name) in seen and name.startswith("png")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture
def redis_server():
    server = start_redis("embedded")
    yield server
    server.stop()


class FaultyRunner:
    """The real runner, failing the first real job (not the start-up calibration) with `error`, in the forward
    or where the decoded images are awaited (a store thread)."""

    def __init__(self, runner, error: Exception, where: str):
        self.runner, self.error, self.where, self.engine = runner, error, where, runner.engine
        self.failed = threading.Event()

    def step(self, plan):
        if self.where == "forward" and any(s.job.key != "calibration" for s in plan.samples):
            self.failed.set()
            raise self.error
        return self.runner.step(plan)

    def drain(self):
        self.runner.drain()

    def decode_async(self, latents):
        decoded = self.runner.decode_async(latents)
        if self.where != "decode":
            return decoded

        def wait():
            self.failed.set()
            raise self.error

        return Decoded(decoded.images, decoded.finite, wait, decoded.enqueue_s)


def start(bundle_dir, server, error, where):
    settings = Settings(redis_url=server.url, model_dir=bundle_dir, max_batch_size=4, heartbeat_interval_s=0.2,
                        png_threads=1, key_prefix="fail")
    worker = build_worker(settings, server.url)
    worker.runner = FaultyRunner(worker.runner, error, where)
    box = {}

    def run():
        try:
            worker.run()
        except BaseException as err:  # noqa: BLE001 - what the process would exit with
            box["exit"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert worker.ready.wait(60)
    keys = Keys("fail")
    job = Job(class_id=1, seed=7, preset=load_model_preset(bundle_dir), key="k1",
              deadline=time.time() + 120)
    server.client().xadd(keys.stream, job.to_fields())
    return worker, thread, box, keys


def load_model_preset(bundle_dir):
    from model.bundle import load_bundle

    spec = load_bundle(bundle_dir).spec
    return spec.presets[spec.default_preset]


@pytest.mark.parametrize("where", ["forward", "decode"])
def test_a_sticky_cuda_error_stops_the_worker_and_leaves_its_job(bundle_dir, redis_server, where):
    worker, thread, box, keys = start(bundle_dir, redis_server, RuntimeError(ILLEGAL_ADDRESS), where)
    r = redis_server.client()
    thread.join(60)
    assert not thread.is_alive(), "the worker kept running on a lost device"
    assert worker.runner.failed.is_set() and is_sticky_device_error(worker.fatal)
    assert isinstance(box.get("exit"), SystemExit) and box["exit"].code not in (0, None)  # the process exits non-zero
    assert r.hget(keys.workers, worker.name) is None  # no heartbeat: the API routes nothing to it
    pending = r.xpending(keys.stream, GROUP)
    assert pending["pending"] == 1, pending  # not acknowledged: another worker reclaims it
    assert r.keys("fail:result:*") == []


def test_an_ordinary_forward_error_does_not_stop_the_worker(bundle_dir, redis_server):
    worker, thread, box, keys = start(bundle_dir, redis_server, RuntimeError("shapes cannot be multiplied"), "forward")
    try:
        assert worker.runner.failed.wait(30)
        time.sleep(0.5)  # a few beats later
        assert thread.is_alive() and worker.fatal is None
        assert redis_server.client().hget(keys.workers, worker.name) is not None
    finally:
        worker.stop()
        thread.join(60)
    assert "exit" not in box


def test_a_hot_swap_closes_the_old_engine(bundle_dir, redis_server):
    settings = Settings(redis_url=redis_server.url, model_dir=bundle_dir, max_batch_size=4, key_prefix="swap")
    worker = build_worker(settings, redis_server.url)
    old = worker.runner.engine
    worker._swap = load_model(settings)  # what the loader thread leaves when a new checkpoint is published
    worker._hot_swap()
    try:
        assert worker.runner.engine is not old
        assert old.dit is None and old.vae is None and old.graphs is None  # closed: its device memory is freed
    finally:
        worker.results.shutdown()

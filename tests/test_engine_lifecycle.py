"""The torch engine's device-facing plumbing, checked on the CPU: what an engine keeps alive, how it
waits for the device, and which padded sizes it runs (issue 24, items 6-8)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from engines.base import Engine, EngineError, EngineInfo
from engines.random_bundle import TINY_DIT, TINY_VAE_DDCONFIG, make_random_bundle
from engines.torch_backend import CudaGraphRunner, TorchEngine, batch_buckets, bucket_for
from model.bundle import load_bundle


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_random_bundle(tmp_path_factory.mktemp("tiny"), TINY_DIT, TINY_VAE_DDCONFIG, seed=5)


@pytest.fixture
def no_gc():
    """Only reference counting frees objects inside the test: a cycle would keep them alive."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def test_the_graph_runner_does_not_keep_the_engine_alive(bundle_dir, no_gc):
    engine = TorchEngine(load_bundle(bundle_dir), "cpu", "fp32", 8)
    # The runner the engine builds for CUDA graphs (constructing it touches no CUDA).
    engine.graphs = engine._make_graphs()
    engine._forward = engine.graphs
    assert isinstance(engine.graphs, CudaGraphRunner)
    ref = weakref.ref(engine)
    del engine
    assert ref() is None, "engine <-> graph runner cycle: the old model waits for the garbage collector"


def test_close_releases_the_model_even_while_the_engine_is_still_referenced(bundle_dir, no_gc):
    engine = TorchEngine(load_bundle(bundle_dir), "cpu", "bf16", 8)  # bf16: a converted copy the engine owns
    engine.graphs = engine._make_graphs()
    dit, vae, runner = weakref.ref(engine.dit), weakref.ref(engine.vae), weakref.ref(engine.graphs)
    engine.close()
    assert dit() is None and vae() is None and runner() is None
    with pytest.raises(EngineError, match="closed"):
        engine.velocity(torch.zeros(1, *engine.latent_shape), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_graphs_are_captured_largest_first_into_one_pool(monkeypatch):
    runner = CudaGraphRunner(lambda x, t, y: x, (4, 2, 2), torch.device("cpu"), 24, null_class=10)
    order = []

    def fake_capture(rows):
        order.append((rows, runner.pool))
        runner.pool = runner.pool or ("pool",)  # what graph.pool() hands the next capture
        runner.graphs[rows] = None

    monkeypatch.setattr(runner, "_capture", fake_capture)
    runner.capture_all()
    assert [r for r, _ in order] == [24, 16, 8, 4, 2, 1]
    assert [p for _, p in order[1:]] == [("pool",)] * 5  # every later capture joins the first one's pool


def test_buckets_are_multiples_of_8_above_8():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(16) == [1, 2, 4, 8, 16] and batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(64, step=0) == [1, 2, 4, 8, 16, 32, 64]  # the old policy, for comparisons
    for rows in range(9, 65):
        assert bucket_for(rows, batch_buckets(64)) - rows < 8
    assert bucket_for(33, batch_buckets(64)) == 40 and bucket_for(33, batch_buckets(64, step=0)) == 64


class _CudaEngine(Engine):
    info = EngineInfo("fake", "cuda:0", "fp32", 1)

    def velocity(self, x, t, y):
        raise NotImplementedError

    def decode(self, z):
        raise NotImplementedError


def test_a_mark_is_a_blocking_event_so_its_waiter_sleeps(monkeypatch):
    made = []

    class FakeEvent:
        def __init__(self, enable_timing=False, blocking=False, interprocess=False):
            made.append({"blocking": blocking})
            self.recorded_on = None

        def record(self, stream=None):
            self.recorded_on = stream

        def synchronize(self):
            made[-1]["waited"] = True

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    wait = _CudaEngine().mark()
    wait()
    assert made == [{"blocking": True, "waited": True}]
    assert wait.__self__.recorded_on == "stream of cuda:0"


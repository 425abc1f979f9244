"""The torch engine's issue-24 changes on a CUDA GPU: buckets in multiples of 8 under CUDA graphs, one
shared graph pool, close() returning the device memory, and the fp32-stream recipe's error bounds.

Skipped where torch sees no CUDA GPU; scripts/gpu_check.sh (pytest_gpu step) runs these. The CPU halves of
the same properties are in test_engine_lifecycle.py and test_lowp.py.
"""

from __future__ import annotations

import pytest
import torch

from engines.random_bundle import TINY_DIT, TINY_VAE_DDCONFIG, make_random_bundle
from engines.torch_backend import PARITY_REL_TOL, TorchEngine
from model.bundle import load_bundle

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none here)")]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_random_bundle(tmp_path_factory.mktemp("tiny"), TINY_DIT, TINY_VAE_DDCONFIG, seed=11)


def inputs(bundle, rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, *bundle.spec.latent_shape, generator=g).cuda(), torch.rand(rows, generator=g).cuda(),
            torch.randint(0, bundle.null_class + 1, (rows,), generator=g).cuda())


def rel_err(got, ref) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def test_buckets_of_8_replay_like_eager_and_close_returns_the_memory(bundle_dir):
    # A first engine pays the process's one-time allocations (cuBLAS workspaces of the streams used), so
    # that what the second one holds is the engine's own: a hot swap is always a second engine.
    first = TorchEngine(load_bundle(bundle_dir), "cuda", "fp16", 24, cuda_graphs=True)
    first.warmup()
    first.close()
    del first
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    bundle = load_bundle(bundle_dir)
    graphs = TorchEngine(bundle, "cuda", "fp16", 24, cuda_graphs=True)
    graphs.warmup()
    assert sorted(graphs.graphs.graphs) == [1, 2, 4, 8, 16, 24]
    eager = TorchEngine(load_bundle(bundle_dir), "cuda", "fp32", 24)
    for rows in (3, 9, 17, 24):  # padded to 4, 16, 24, 24
        x, t, y = inputs(bundle, rows, seed=rows)
        got, ref = graphs.velocity(x, t, y), eager.velocity(x, t, y)
        assert got.shape == ref.shape and rel_err(got, ref) < PARITY_REL_TOL["fp16"]
    held = torch.cuda.memory_allocated()
    assert held > before
    graphs.close()
    eager.close()
    del graphs, eager, bundle, got, ref, x, t, y
    torch.cuda.synchronize()
    # no gc.collect(): nothing references a closed engine's graphs, so reference counting frees them
    assert torch.cuda.memory_allocated() <= before + (1 << 20), (before, held, torch.cuda.memory_allocated())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_fp32_stream_recipe_is_within_its_bound_on_cuda(bundle_dir, precision):
    bundle = load_bundle(bundle_dir)
    low = TorchEngine(bundle, "cuda", precision, 8)
    ref = TorchEngine(load_bundle(bundle_dir), "cuda", "fp32", 8)
    x, t, y = inputs(bundle, 8, seed=5)
    err = rel_err(low.velocity(x, t, y), ref.velocity(x, t, y))
    assert 0 < err < PARITY_REL_TOL[precision], err

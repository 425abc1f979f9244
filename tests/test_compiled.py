"""The torch backend's compiled path (regional compilation, inductor's C++ backend) on the CPU.

A tiny DiT (2 blocks, 64 tokens) keeps the C++ compilation to about half a minute per precision
on a small CPU. What is checked: the compiled forward agrees with eager fp32 within the parity
bounds the GPU kit uses, and one graph serves every block and every batch bucket (compiling
more as buckets are added would put minutes of compilation on the first requests of a size).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from engines.random_bundle import TINY_DIT, TINY_VAE_DDCONFIG, make_random_bundle
from engines.torch_backend import PARITY_REL_TOL, RegionalCompiledDiT, TorchEngine, batch_buckets
from model.bundle import load_bundle

pytestmark = pytest.mark.slow
MAX_ROWS = 8


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_random_bundle(tmp_path_factory.mktemp("tiny"), TINY_DIT, TINY_VAE_DDCONFIG, seed=3)


def inputs(bundle, rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, *bundle.spec.latent_shape, generator=g)
    t = torch.rand(rows, generator=g)
    y = torch.randint(0, bundle.null_class + 1, (rows,), generator=g)  # the null class included
    return x, t, y


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def eager(bundle_dir):
    return TorchEngine(load_bundle(bundle_dir), "cpu", "fp32", MAX_ROWS)


def test_model_blocks_share_one_graph_over_every_bucket_in_fp32(bundle_dir, eager):
    torch._dynamo.reset()
    counters.clear()
    bundle = load_bundle(bundle_dir)
    assert len(bundle.dit.blocks) == 2
    engine = TorchEngine(bundle, "cpu", "fp32", MAX_ROWS, compile=True)
    assert "compiled blocks" in engine.info.detail
    # largest first: the first compiled call, the one inductor tunes on, is at the size that carries the load
    assert engine.warmup_rows() == sorted(batch_buckets(MAX_ROWS), reverse=True) == [8, 4, 2, 1]
    engine.warmup()
    after_warmup = compiled_graphs()
    assert after_warmup == 1, dict(counters["stats"])
    for rows in (1, 2, 3, 4, 7, 8, 11):  # buckets, sizes between them, and a call split over max_rows
        x, t, y = inputs(bundle, rows, seed=rows)
        got = engine.velocity(x, t, y)
        ref = eager.velocity(x, t, y)
        assert got.shape == ref.shape == (rows, *bundle.spec.latent_shape)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        assert rel_err(got, ref) < PARITY_REL_TOL["fp32"]
    assert compiled_graphs() == after_warmup, "a row count recompiled the blocks"
    assert counters["stats"]["calls_captured"] > 0
    # A hot swap to a checkpoint of the same architecture loads a new engine: it reuses the graph.
    swapped = TorchEngine(load_bundle(bundle_dir), "cpu", "fp32", MAX_ROWS, compile=True)
    x, t, y = inputs(bundle, 3, seed=50)
    torch.testing.assert_close(swapped.velocity(x, t, y), eager.velocity(x, t, y), rtol=1e-4, atol=1e-4)
    assert compiled_graphs() == after_warmup


def test_bf16_compiled_is_within_the_bf16_bound_of_eager_fp32(bundle_dir, eager):
    torch._dynamo.reset()
    counters.clear()
    bundle = load_bundle(bundle_dir)
    engine = TorchEngine(bundle, "cpu", "bf16", MAX_ROWS, compile=True)
    lowp_eager = TorchEngine(load_bundle(bundle_dir), "cpu", "bf16", MAX_ROWS)
    engine.warmup()
    assert compiled_graphs() == 1, dict(counters["stats"])
    for rows in (1, 5, 8):
        x, t, y = inputs(bundle, rows, seed=100 + rows)
        ref = eager.velocity(x, t, y)
        got = engine.velocity(x, t, y)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        err, eager_err = rel_err(got, ref), rel_err(lowp_eager.velocity(x, t, y), ref)
        assert 0 < err < PARITY_REL_TOL["bf16"], (err, eager_err)
        # Fusion keeps intermediates in registers (fewer bf16 roundings), so it may be closer, never far worse.
        assert err < 2 * eager_err + 1e-3, (err, eager_err)
    assert compiled_graphs() == 1


def test_the_row_count_is_bounded_by_max_rows_in_the_compiled_graph(bundle_dir):
    """Without an upper bound on the unbacked row count, inductor indexes in 64 bits and newer torch refuses
    cuDNN attention (issue 24). The traced graph's shape environment must know rows <= max_rows."""
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):  # a dynamo backend that keeps the traced graph and runs it eagerly
        graphs.append(gm)
        return gm.forward

    bundle = load_bundle(bundle_dir)
    compiled = RegionalCompiledDiT(bundle.dit.eval(), MAX_ROWS, backend=record)
    x, t, y = inputs(bundle, 3, seed=9)
    with torch.inference_mode():
        got = compiled(x, t, y)
        torch.testing.assert_close(got, bundle.dit(x, t, y), rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1
    rows = next(n.meta["example_value"].shape[0] for n in graphs[0].graph.nodes
                if n.op == "placeholder" and getattr(n.meta.get("example_value"), "ndim", 0) == 3)
    assert isinstance(rows, torch.SymInt), "the row count must stay symbolic (one graph for every bucket)"
    bound = rows.node.shape_env.bound_sympy(rows.node.expr)
    assert bound.upper == MAX_ROWS, bound
    torch._dynamo.reset()

"""Engines: ONNX export parity, ORT vs torch through the sampler, bf16, manifest refusal, TensorRT (GPU only)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engines import EngineError, load_engine
from engines.artifacts import export_and_validate, write_onnx_manifest
from engines.onnx_export import dit_example_inputs, export_dit, ort_cpu_session, validate_onnx
from engines.random_bundle import make_random_bundle
from engines.torch_backend import TorchEngine, batch_buckets
from model.bundle import load_bundle
from model.lightningdit import LightningDiT
from model.sampling import SamplerPreset, initial_noise, sample
from tests.conftest import FIXTURES, load_fixture


def has_tensorrt_gpu() -> tuple[bool, str]:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "tensorrt is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    return True, ""


TRT_OK, TRT_REASON = has_tensorrt_gpu()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(255.0**2 / mse)).item()


def sample_images(engine, bundle, seeds=(0, 1, 2, 3), preset: SamplerPreset | None = None) -> torch.Tensor:
    preset = preset or bundle.spec.presets[bundle.spec.default_preset]
    noise = torch.stack([initial_noise(s, bundle.spec.latent_shape) for s in seeds]).to(engine.device)
    labels = torch.tensor([s % bundle.spec.num_classes for s in seeds], device=engine.device)
    x = sample(engine.velocity, noise, labels, preset, bundle.null_class)
    return engine.decode(bundle.stats.denormalize(x))


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory) -> Path:
    return make_random_bundle(tmp_path_factory.mktemp("bundle") / "demo")


@pytest.fixture(scope="module")
def demo_onnx(demo_bundle, tmp_path_factory) -> Path:
    """ONNX artifacts of the demo-sized bundle, exported and validated as build_engine.py does."""
    out = tmp_path_factory.mktemp("onnx")
    bundle = load_bundle(demo_bundle)
    report = export_and_validate(bundle, out, batch_sizes=(1, 3, 8))
    print(report.text())
    assert report.ok, report.text()
    write_onnx_manifest(bundle, out, report, profile={"min": 1, "opt": 8, "max": 16})
    return out


def test_tiny_official_fixture_exports_and_matches(tmp_path):
    meta, sd = load_fixture("dit_tiny")
    dit = LightningDiT(**{k: v for k, v in meta["config"].items() if k != "use_checkpoint"}).eval()
    dit.load_state_dict(sd, strict=True)
    path = export_dit(dit, tmp_path / "dit.onnx")
    results = validate_onnx(dit, path, lambda n, s: dit_example_inputs(dit, n, s), ["x", "t", "y"],
                            batch_sizes=(1, 3, 5), rel_tol=1e-4)
    assert all(r.ok for r in results), [r.line() for r in results]
    # and the official output itself, through ONNX Runtime
    io = load_file(str(FIXTURES / "dit_tiny_io.safetensors"))
    got = ort_cpu_session(path).run(None, {"x": io["x"].numpy(), "t": io["t"].numpy(), "y": io["y"].numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), io["out"], rtol=1e-4, atol=1e-4)


def test_demo_bundle_onnx_parity_recorded(demo_onnx):
    import json

    manifest = json.loads((demo_onnx / "manifest.json").read_text())
    rows = manifest["onnx"]["validation"]["dit"]
    assert [r["rows"] for r in rows] == [1, 3, 8]
    assert all(r["max_rel"] < 1e-3 for r in rows)
    assert manifest["onnx"]["exporter"] == "dynamo" and manifest["onnx"]["opset"] == 18


def test_ort_and_torch_give_the_same_images(demo_bundle, demo_onnx):
    bundle = load_bundle(demo_bundle)
    ref = sample_images(load_engine(bundle, backend="torch", device="cpu"), bundle)
    ort_engine = load_engine(bundle, backend="onnxruntime", device="cpu", engine_dir=demo_onnx)
    got = sample_images(ort_engine, bundle)
    assert got.dtype == torch.uint8 and got.shape == ref.shape and got.shape[-1] == 3
    value = psnr(ref, got)
    print(f"ORT vs torch fp32 PSNR {value:.1f} dB")
    assert value >= 40


def test_torch_bf16_close_to_fp32(demo_bundle):
    bundle = load_bundle(demo_bundle)
    ref = sample_images(TorchEngine(bundle, "cpu", "fp32", 16), bundle)
    bf16 = sample_images(TorchEngine(bundle, "cpu", "bf16", 16), bundle)
    value = psnr(ref, bf16)
    print(f"torch bf16 (converted weights) vs fp32 PSNR {value:.1f} dB")
    # Benchmark target is 30 dB on the full sampler; a random-weight model amplifies errors more.
    assert value >= 25


def test_velocity_splits_calls_above_max_rows(demo_bundle):
    bundle = load_bundle(demo_bundle)
    engine = TorchEngine(bundle, "cpu", "fp32", max_rows=4)
    x, t, y = dit_example_inputs(bundle.dit, 10)
    with torch.no_grad():
        ref = bundle.dit(x, t, y)
    torch.testing.assert_close(engine.velocity(x, t, y), ref, rtol=1e-4, atol=1e-4)
    assert batch_buckets(16) == [1, 2, 4, 8, 16] and batch_buckets(12) == [1, 2, 4, 8, 12]


def test_changed_checkpoint_is_refused(demo_bundle, demo_onnx, tmp_path):
    other = tmp_path / "changed"
    shutil.copytree(demo_bundle, other)
    sd = load_file(str(other / "dit_ema.safetensors"))
    sd["final_layer.linear.bias"] = sd["final_layer.linear.bias"] + 1.0
    save_file(sd, str(other / "dit_ema.safetensors"))
    with pytest.raises(EngineError, match="dit_checkpoint sha256"):
        load_engine(load_bundle(other), backend="onnxruntime", device="cpu", engine_dir=demo_onnx)


def test_missing_artifacts_and_bad_choices_are_clear(demo_bundle, tmp_path):
    bundle = load_bundle(demo_bundle)
    with pytest.raises(EngineError, match="build_engine.py"):
        load_engine(bundle, backend="onnxruntime", device="cpu", engine_dir=tmp_path)
    with pytest.raises(EngineError, match="unknown backend"):
        load_engine(bundle, backend="tvm")
    with pytest.raises(EngineError, match="bf16"):
        load_engine(bundle, backend="onnxruntime", device="cpu", precision="bf16", engine_dir=tmp_path)
    if not TRT_OK:
        with pytest.raises(EngineError, match="TensorRT backend unavailable"):
            load_engine(bundle, backend="tensorrt", engine_dir=tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch CUDA path: no CUDA GPU here")
def test_torch_cuda_graphs_match_eager(demo_bundle):
    bundle = load_bundle(demo_bundle)
    eager = TorchEngine(bundle, "cuda", "fp32", 8)
    graphs = TorchEngine(load_bundle(demo_bundle), "cuda", "fp32", 8, cuda_graphs=True)
    for rows in (1, 3, 8):
        x, t, y = (v.cuda() for v in dit_example_inputs(bundle.dit, rows, seed=rows))
        torch.testing.assert_close(graphs.velocity(x, t, y), eager.velocity(x, t, y), rtol=1e-4, atol=1e-4)
    fp16 = TorchEngine(load_bundle(demo_bundle), "cuda", "fp16", 8)
    assert psnr(sample_images(eager, bundle), sample_images(fp16, bundle)) >= 30


@pytest.mark.gpu
@pytest.mark.skipif(not TRT_OK, reason=f"TensorRT test needs tensorrt and a CUDA GPU: {TRT_REASON}")
def test_tensorrt_builds_and_runs_a_tiny_engine(demo_bundle, demo_onnx, tmp_path):
    import json

    from engines.manifest import DIT_ONNX, DIT_PLAN, TIMING_CACHE, VAE_ONNX, VAE_PLAN, gpu_identity
    from engines.trt_build import build_plan_from_onnx

    out = tmp_path / "trt"
    shutil.copytree(demo_onnx, out)
    profile = {"min": 1, "opt": 4, "max": 8}
    plans = {name: build_plan_from_onnx(out / onnx, out / plan, profile, out / TIMING_CACHE)
             for name, onnx, plan in (("dit", DIT_ONNX, DIT_PLAN), ("vae_decoder", VAE_ONNX, VAE_PLAN))}
    assert (out / TIMING_CACHE).stat().st_size > 0
    manifest = json.loads((out / "manifest.json").read_text())
    import tensorrt

    manifest["tensorrt"] = {"version": tensorrt.__version__, "precision": "fp16", "route": "onnx",
                            "gpu": gpu_identity(), "plans": plans}
    (out / "manifest.json").write_text(json.dumps(manifest))
    bundle = load_bundle(demo_bundle)
    engine = load_engine(bundle, backend="tensorrt", engine_dir=out, max_rows=8)
    x, t, y = (v.cuda() for v in dit_example_inputs(bundle.dit, 5))
    with torch.no_grad():
        ref = bundle.dit.cuda()(x, t, y)
    got = engine.velocity(x, t, y)
    assert float((got - ref).abs().max() / ref.abs().max()) < 2e-2
    ref_images = sample_images(load_engine(load_bundle(demo_bundle), backend="torch", device="cuda"), bundle)
    assert psnr(ref_images, sample_images(engine, bundle)) >= 30


def test_fp32_islands_on_the_exported_graph(demo_onnx):
    """On the real dynamo export: norms, softmax and the timestep embedder stay fp32; the block matmuls don't."""
    import onnx

    from engines.manifest import DIT_ONNX
    from engines.trt_build import node_scopes, select_fp32_nodes

    nodes = list(onnx.load(str(demo_onnx / DIT_ONNX), load_external_data=False).graph.node)
    chosen = select_fp32_nodes(nodes)
    matmuls = [n for n in nodes if n.op_type in ("MatMul", "Gemm")]
    in_blocks = [n for n in matmuls if not any(p == "t_embedder" for p in node_scopes(n))]
    assert in_blocks and all(n.name not in chosen for n in in_blocks), "block matmuls must run in fp16"
    assert any(n.op_type == "Softmax" and n.name in chosen for n in nodes)
    norm_nodes = [n for n in nodes if any(p in ("norm1", "norm2", "norm_final") for p in node_scopes(n))]
    assert norm_nodes and all(n.name in chosen for n in norm_nodes)
    assert any(n.name in chosen for n in matmuls if "t_embedder" in node_scopes(n))

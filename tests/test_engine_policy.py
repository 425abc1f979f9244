"""Device, provider and precision decisions, and the TensorRT fp32-island selection: all on the CPU.

The GPU code paths decide from facts a CPU machine can fake (is there a CUDA
GPU, which ONNX Runtime providers exist); these tests feed those facts in and
check the decisions, so a wrong choice shows up in CI, not on the first GPU.
"""

from __future__ import annotations

import pytest
import torch

import build_engine
from engines import EngineError, load_engine
from engines.device import decode_precision, ort_providers, resolve_device
from engines.ort_backend import trt_ep_options
from engines.torch_backend import TorchEngine
from engines.trt_backend import pad_rows
from engines.trt_build import FP32_OPS, select_fp32_nodes
from model.bundle import load_bundle
from tests.service_harness import make_tiny_bundle

CPU_ORT = ["AzureExecutionProvider", "CPUExecutionProvider"]
GPU_ORT = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_auto_device_with_a_cpu_only_onnxruntime_stays_on_the_cpu():
    # torch sees a GPU, but this onnxruntime build cannot use it (the bug: auto chose CUDA, then failed)
    assert resolve_device("auto", "onnxruntime", has_cuda=True, providers=CPU_ORT) == "cpu"
    assert resolve_device("auto", "onnxruntime", has_cuda=True, providers=GPU_ORT) == "cuda"
    assert resolve_device("auto", "onnxruntime", has_cuda=False, providers=GPU_ORT) == "cpu"
    with pytest.raises(EngineError, match="no CUDA or TensorRT execution provider"):
        resolve_device("cuda:1", "onnxruntime", has_cuda=True, providers=CPU_ORT)


def test_device_choices_for_torch_and_tensorrt():
    assert resolve_device("auto", "torch", has_cuda=False) == "cpu"
    assert resolve_device("auto", "torch", has_cuda=True) == "cuda"
    assert resolve_device("cuda:2", "torch", has_cuda=True) == "cuda:2"  # the index is kept
    with pytest.raises(EngineError, match="sees no CUDA GPU"):
        resolve_device("cuda", "torch", has_cuda=False)
    with pytest.raises(EngineError, match="unknown device"):
        resolve_device("gpu0", "torch", has_cuda=True)
    assert resolve_device("auto", "tensorrt", has_cuda=True) == "cuda"
    with pytest.raises(EngineError, match="CUDA devices only"):
        resolve_device("cpu", "tensorrt", has_cuda=True)


def test_ort_providers_bind_the_stream_and_the_profile():
    assert ort_providers("cpu", 0, CPU_ORT, use_trt_ep=False) == ["CPUExecutionProvider"]
    opts = trt_ep_options(__import__("pathlib").Path("/e"), {"x": (4, 8, 8), "t": (), "y": ()},
                          {"min": 1, "opt": 8, "max": 32})
    assert opts["trt_profile_min_shapes"] == "x:1x4x8x8,t:1,y:1"
    assert opts["trt_profile_opt_shapes"] == "x:8x4x8x8,t:8,y:8"
    assert opts["trt_profile_max_shapes"] == "x:32x4x8x8,t:32,y:32"
    assert opts["trt_layer_norm_fp32_fallback"] == "True"
    chosen = ort_providers("cuda", 1, GPU_ORT, use_trt_ep=True, stream_ptr=1234, trt_options=opts)
    names = [p[0] if isinstance(p, tuple) else p for p in chosen]
    assert names == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    for name, options in chosen[:2]:
        assert options["device_id"] == 1 and options["user_compute_stream"] == "1234", name
    assert chosen[0][1]["trt_profile_max_shapes"].startswith("x:32x")
    no_trt = ort_providers("cuda", 0, GPU_ORT, use_trt_ep=False)
    assert [p[0] if isinstance(p, tuple) else p for p in no_trt] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(EngineError, match="TensorRT execution provider"):
        ort_providers("cuda", 0, ["CUDAExecutionProvider", "CPUExecutionProvider"], use_trt_ep=True)
    with pytest.raises(EngineError, match="no CUDAExecutionProvider"):
        ort_providers("cuda", 0, CPU_ORT, use_trt_ep=False)


def test_decoder_precision_is_fp32_unless_asked(tmp_path):
    assert decode_precision(None, "cuda") == "fp32"
    assert decode_precision("fp16", "cuda") == "fp16"
    with pytest.raises(EngineError, match="not usable on CPU"):
        decode_precision("fp16", "cpu")
    bundle_dir = make_tiny_bundle(tmp_path / "b")
    fp32 = TorchEngine(load_bundle(bundle_dir), "cpu", "fp32", 4)
    bf16 = load_engine(load_bundle(bundle_dir), "torch", "cpu", "bf16", max_rows=4)
    assert bf16.info.precision == "bf16" and bf16.info.decode_precision == "fp32"
    z = torch.randn(2, *fp32.latent_shape)
    # the DiT's precision is never inherited by the decoder: bit-identical images
    assert torch.equal(bf16.decode(z), fp32.decode(z))
    bf16_decode = TorchEngine(load_bundle(bundle_dir), "cpu", "fp32", 4, decode_precision="bf16")
    assert bf16_decode.info.decode_precision == "bf16"
    assert not torch.equal(bf16_decode.decode(z), fp32.decode(z))


def test_onnxruntime_refuses_what_it_cannot_run(tmp_path):
    bundle = load_bundle(make_tiny_bundle(tmp_path / "b"))
    with pytest.raises(EngineError, match="fp32 only"):
        load_engine(bundle, "onnxruntime", "cpu", "fp32", engine_dir=tmp_path, decode="bf16")
    with pytest.raises(EngineError, match="not 'fp16' on cpu"):
        load_engine(bundle, "onnxruntime", "cpu", "fp16", engine_dir=tmp_path)


def test_pad_rows_repeats_the_last_row():
    t = torch.arange(6.0).view(2, 3)
    padded = pad_rows(t, 4)
    assert padded.shape == (4, 3) and torch.equal(padded[2], t[1]) and torch.equal(padded[3], t[1])
    assert pad_rows(t, 1) is t


def test_plan_comparison_fails_on_non_finite_output():
    ref = torch.ones(2, 3, 4, 4)
    assert build_engine.compare_plan("decoder", ref * 1.001, ref, "fp32") < 1e-2
    with pytest.raises(EngineError, match="non-finite"):
        build_engine.compare_plan("decoder", torch.where(ref > 0, float("nan"), ref), ref, "fp16")
    with pytest.raises(EngineError, match="disagrees"):
        build_engine.compare_plan("DiT", ref * 1.5, ref, "fp16")


class _Node:
    def __init__(self, name: str, op_type: str, scope: str = ""):
        self.name, self.op_type = name, op_type
        prop = type("P", (), {"key": "pkg.torch.onnx.name_scopes", "value": scope})()
        self.metadata_props = [prop] if scope else []


def test_fp32_islands_by_op_type_and_module_scope():
    nodes = [
        _Node("pow_1", "Pow", "['', 'blocks.0', 'blocks.0.norm1', 'pow_1']"),
        _Node("mul_3", "Mul", "['', 'blocks.0', 'blocks.0.norm1', 'mul_3']"),  # inside RMSNorm: scope
        _Node("linear_7", "MatMul", "['', 'blocks.0', 'blocks.0.attn', 'blocks.0.attn.qkv', 'linear_7']"),
        _Node("softmax", "Softmax", "['', 'blocks.0', 'blocks.0.attn', 'softmax']"),
        _Node("linear_1", "Gemm", "['', 't_embedder', 't_embedder.mlp', 't_embedder.mlp.0', 'linear_1']"),
        _Node("linear_9", "MatMul", "['', 'blocks.0', 'blocks.0.mlp', 'blocks.0.mlp.w12', 'linear_9']"),
        _Node("/blocks.1/norm2/ReduceMean", "ReduceMean"),  # TorchScript exporter naming
        _Node("/blocks.1/mlp/w3/MatMul", "MatMul"),
    ]
    chosen = select_fp32_nodes(nodes)
    assert chosen == {"pow_1", "mul_3", "softmax", "linear_1", "/blocks.1/norm2/ReduceMean"}
    assert {"ReduceMean", "Softmax", "Pow", "Sqrt", "Exp", "Sin", "Cos"} <= FP32_OPS

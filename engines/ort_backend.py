"""ONNX Runtime backend: runs the ONNX files that build_engine.py exports.

CPU execution provider here; the CUDA (and TensorRT) execution providers when
onnxruntime-gpu provides them and device is CUDA. Intra-op spinning is off: torch
shares the process (the sampler's arithmetic, the decode's uint8 conversion),
and spinning ORT workers made a torch call take 312 ms instead of 9 ms.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engines.base import Engine, EngineError, EngineInfo
from engines.manifest import DIT_ONNX, VAE_ONNX
from model.bundle import ModelBundle
from model.latents import to_uint8

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}
_TORCH_TYPES = {np.float32: torch.float32, np.int64: torch.int64, np.int32: torch.int32}


def session_options(threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def providers_for(device: torch.device, engine_dir: Path, use_trt_ep: bool) -> list:
    import onnxruntime as ort

    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise EngineError(f"onnxruntime has no CUDAExecutionProvider (available: {available}); "
                          "install onnxruntime-gpu or use device=cpu")
    chosen: list = []
    if use_trt_ep and "TensorrtExecutionProvider" in available:
        # ORT builds and caches its own FP16 TensorRT engines next to the ONNX files.
        chosen.append(("TensorrtExecutionProvider", {
            "device_id": device.index or 0, "trt_fp16_enable": True, "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(engine_dir / "ort_trt_cache"), "trt_timing_cache_enable": True,
        }))
    chosen.append(("CUDAExecutionProvider", {"device_id": device.index or 0}))
    chosen.append("CPUExecutionProvider")
    return chosen


class _OrtGraph:
    """One InferenceSession; feeds torch tensors (numpy views on CPU, IO binding on CUDA)."""

    def __init__(self, path: Path, device: torch.device, threads: int | None, providers: list):
        import onnxruntime as ort

        if not path.is_file():
            raise EngineError(f"missing ONNX file {path}; run build_engine.py")
        self.session = ort.InferenceSession(str(path), session_options(threads), providers=providers)
        self.device = device
        self.inputs = [(i.name, _ORT_TYPES.get(i.type, np.float32)) for i in self.session.get_inputs()]
        self.output = self.session.get_outputs()[0].name

    def run(self, *tensors: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            feeds = {name: t.detach().cpu().numpy().astype(dtype, copy=False)
                     for (name, dtype), t in zip(self.inputs, tensors, strict=True)}
            return torch.from_numpy(self.session.run([self.output], feeds)[0])
        binding = self.session.io_binding()
        keep = []  # the bound buffers must outlive the run
        for (name, dtype), t in zip(self.inputs, tensors, strict=True):
            t = t.to(self.device, _TORCH_TYPES[dtype]).contiguous()
            keep.append(t)
            binding.bind_input(name, "cuda", self.device.index or 0, dtype, list(t.shape), t.data_ptr())
        binding.bind_output(self.output, "cuda", self.device.index or 0)
        self.session.run_with_iobinding(binding)
        out = binding.get_outputs()[0]
        return torch.from_dlpack(out.to_dlpack()) if hasattr(out, "to_dlpack") else torch.from_numpy(out.numpy())


class OrtEngine(Engine):
    def __init__(self, bundle: ModelBundle, engine_dir: str | Path, device: str = "cpu", max_rows: int = 16,
                 threads: int | None = None, use_trt_ep: bool = False, manifest: dict | None = None):
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise EngineError(f"onnxruntime is not importable: {err}") from None
        self.engine_dir = Path(engine_dir)
        self.dev = torch.device(device)
        providers = providers_for(self.dev, self.engine_dir, use_trt_ep)
        self.dit = _OrtGraph(self.engine_dir / DIT_ONNX, self.dev, threads, providers)
        self.vae = _OrtGraph(self.engine_dir / VAE_ONNX, self.dev, threads, providers)
        self.max_rows = max_rows
        used = self.dit.session.get_providers()
        self.info = EngineInfo("onnxruntime", str(self.dev), "fp32", max_rows,
                               f"onnxruntime {ort.__version__}, providers {used}, {self.engine_dir}")
        self.manifest = manifest

    def velocity(self, x, t, y):
        # Larger calls are split: the graph takes any batch, but max_rows is the contract the scheduler plans with.
        outs = [self.dit.run(x[i:i + self.max_rows].float(), t[i:i + self.max_rows].float(),
                             y[i:i + self.max_rows].long()) for i in range(0, x.shape[0], self.max_rows)]
        v = outs[0] if len(outs) == 1 else torch.cat(outs)
        return v.to(self.dev)

    def decode(self, z):
        images = [self.vae.run(z[i:i + self.max_rows].float()) for i in range(0, z.shape[0], self.max_rows)]
        return to_uint8(images[0] if len(images) == 1 else torch.cat(images)).cpu()

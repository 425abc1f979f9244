"""Runtime backends behind one interface (`engines.base.Engine`), `load_engine` to pick one, and the
ONNX export and TensorRT build that `build_engine.py` drives.
May import `model`; never `service` or `training`.

Backends:
* "torch": the bundle's PyTorch modules (CPU or CUDA; fp32, bf16, fp16 on CUDA;
  optional torch.compile and CUDA graphs).
* "onnxruntime": the ONNX files of an artifact dir (CPU EP; CUDA/TensorRT EPs on
  GPUs). With engine_dir=None the bundle is exported to a temporary dir first.
* "tensorrt": the FP16 plans of an artifact dir (GPU + tensorrt only).
* "simulated": no model at all; forwards and decodes take the time a timing
  profile says (engines.simulated, engines/profiles/). For measuring the server
  apart from the model; it says "simulated" wherever it reports itself.

Artifacts are written by `build_engine.py`; a backend refuses artifacts whose
manifest names other checkpoints (or, for TensorRT plans, another GPU).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from engines.base import Engine, EngineError, EngineInfo
from engines.device import decode_precision, resolve_device
from model.bundle import ModelBundle, load_bundle

BACKENDS = ("torch", "onnxruntime", "tensorrt", "simulated")

__all__ = ["BACKENDS", "Engine", "EngineError", "EngineInfo", "load_engine", "resolve_device"]


def _export_to_temp(bundle: ModelBundle) -> Path:
    """ONNX artifacts for a bundle in a fresh temp dir (what build_engine.py would write, without TensorRT)."""
    from engines.artifacts import export_and_validate, write_onnx_manifest

    out = Path(tempfile.mkdtemp(prefix="ldit-onnx-"))
    report = export_and_validate(bundle, out, batch_sizes=(1, 2))
    if not report.ok:
        raise EngineError(f"ONNX export of {bundle.spec.root} failed validation:\n{report.text()}")
    write_onnx_manifest(bundle, out, report, profile={"min": 1, "opt": 1, "max": 1})
    return out


def load_engine(
    bundle: ModelBundle | str | Path,
    backend: str = "torch",
    device: str = "auto",
    precision: str = "fp32",
    engine_dir: str | Path | None = None,
    max_rows: int = 16,
    compile: bool = False,
    cuda_graphs: bool = False,
    decode: str | None = None,
    simulated_profile: str | Path | None = None,
) -> Engine:
    """Build the engine the service runs. Raises EngineError with the reason when it cannot run here.

    `precision` is the DiT's; `decode` the VA-VAE decoder's (default fp32 on every
    backend, see engines.device.decode_precision).
    """
    if not isinstance(bundle, ModelBundle):
        bundle = load_bundle(bundle)
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    dev = resolve_device(device, backend)
    if backend == "simulated":
        from engines.simulated import SimulatedEngine
        from engines.timing_profile import load_profile

        return SimulatedEngine(bundle, load_profile(simulated_profile), max_rows)
    decode = decode_precision(decode, torch.device(dev).type)
    if backend == "torch":
        from engines.torch_backend import TorchEngine

        return TorchEngine(bundle, dev, precision, max_rows, compile=compile, cuda_graphs=cuda_graphs,
                           decode_precision=decode)
    if backend == "onnxruntime":
        from engines.manifest import check_artifacts
        from engines.ort_backend import OrtEngine

        if precision not in ("fp32", "fp16") or (precision == "fp16" and dev == "cpu"):
            raise EngineError(f"onnxruntime runs the fp32 ONNX graphs (fp16 through its TensorRT provider on "
                              f"CUDA), not {precision!r} on {dev}; bf16 is available with backend=torch")
        if decode != "fp32":
            raise EngineError("onnxruntime decodes in fp32 only (the fp32 ONNX decoder)")
        engine_dir = Path(engine_dir) if engine_dir is not None else _export_to_temp(bundle)
        manifest = check_artifacts(engine_dir, bundle.spec)
        return OrtEngine(bundle, engine_dir, dev, max_rows, use_trt_ep=precision == "fp16", manifest=manifest)
    from engines.trt_backend import TrtEngine

    if engine_dir is None:
        raise EngineError("backend tensorrt needs engine_dir (the output of build_engine.py)")
    return TrtEngine(bundle, engine_dir, dev, max_rows)

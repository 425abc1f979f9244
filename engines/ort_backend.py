"""ONNX Runtime backend: runs the ONNX files that build_engine.py exports.

CPU execution provider here; the CUDA (and, for precision fp16, TensorRT)
execution providers when onnxruntime-gpu provides them and the device is CUDA.
Intra-op spinning is off: torch shares the process (the sampler's arithmetic,
the decode's uint8 conversion), and spinning ORT workers made a torch call take
312 ms instead of 9 ms.

On CUDA, inputs and outputs stay on the GPU: they are bound by pointer to torch
tensors (the output preallocated by torch), and each session computes on a
stream of its own that first waits for the caller's stream, so ORT never reads
an input before the kernels that write it have run.

The TensorRT execution provider builds its engines with one optimisation
profile over the rows (the same min/opt/max as build_engine.py's plans), so it
never rebuilds while serving, and keeps layer norms in fp32. It cannot pin the
other fp32 islands that the TensorRT backend keeps (build_engine.py's plans),
which is why backend=tensorrt is the recommended fp16 route.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engines.base import Engine, EngineError, EngineInfo
from engines.device import ort_available_providers, ort_providers
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


def trt_ep_options(engine_dir: Path, inputs: dict[str, tuple[int, ...]], profile: dict) -> dict:
    """TensorRT EP options: FP16 with fp32 layer norms, caches beside the ONNX files, and an
    explicit profile over the rows. `inputs` maps each input name to its shape without the batch axis."""

    def shapes(rows: int) -> str:
        return ",".join(f"{name}:" + "x".join(str(d) for d in (rows, *rest)) for name, rest in inputs.items())

    return {
        "trt_fp16_enable": "True",
        "trt_layer_norm_fp32_fallback": "True",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(engine_dir / "ort_trt_cache"),
        "trt_timing_cache_enable": "True",
        "trt_profile_min_shapes": shapes(profile["min"]),
        "trt_profile_opt_shapes": shapes(profile["opt"]),
        "trt_profile_max_shapes": shapes(profile["max"]),
    }


class _OrtGraph:
    """One InferenceSession; feeds torch tensors (numpy views on CPU, IO binding on CUDA)."""

    def __init__(self, path: Path, device: torch.device, threads: int | None, providers_fn):
        import onnxruntime as ort

        if not path.is_file():
            raise EngineError(f"missing ONNX file {path}; run build_engine.py")
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        stream = self.stream.cuda_stream if self.stream is not None else None
        shapes = static_input_shapes(path) if device.type == "cuda" else {}
        self.session = ort.InferenceSession(str(path), session_options(threads),
                                            providers=providers_fn(stream, shapes))
        self.inputs = [(i.name, _ORT_TYPES.get(i.type, np.float32)) for i in self.session.get_inputs()]
        out = self.session.get_outputs()[0]
        self.output, self.output_rest = out.name, out.shape[1:]

    def run(self, *tensors: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            feeds = {name: t.detach().cpu().numpy().astype(dtype, copy=False)
                     for (name, dtype), t in zip(self.inputs, tensors, strict=True)}
            return torch.from_numpy(self.session.run([self.output], feeds)[0])
        index = self.device.index or 0
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # the inputs were written on the caller's stream
        binding = self.session.io_binding()
        keep = []  # the bound buffers must outlive the run
        with torch.cuda.stream(self.stream):
            for (name, dtype), t in zip(self.inputs, tensors, strict=True):
                t = t.to(self.device, _TORCH_TYPES[dtype]).contiguous()
                keep.append(t)
                binding.bind_input(name, "cuda", index, dtype, list(t.shape), t.data_ptr())
            rows = tensors[0].shape[0]
            if all(isinstance(d, int) for d in self.output_rest):
                out = torch.empty((rows, *self.output_rest), dtype=torch.float32, device=self.device)
                binding.bind_output(self.output, "cuda", index, np.float32, list(out.shape), out.data_ptr())
            else:  # a symbolic non-batch axis: let ORT allocate, then hand its buffer to torch
                out = None
                binding.bind_output(self.output, "cuda", index)
            self.session.run_with_iobinding(binding)
            if out is None:
                out = torch.from_dlpack(binding.get_outputs()[0].to_dlpack())
        caller.wait_stream(self.stream)
        for t in (*keep, out):
            t.record_stream(caller)
        return out


def static_input_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each graph input's shape without the batch axis, read from the ONNX file (weights not loaded)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    shapes = {}
    for value in graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim[1:]
        if any(not d.HasField("dim_value") for d in dims):
            raise EngineError(f"ONNX input {value.name} of {path.name} has a dynamic axis other than the batch")
        shapes[value.name] = tuple(d.dim_value for d in dims)
    return shapes


class OrtEngine(Engine):
    def __init__(self, bundle: ModelBundle, engine_dir: str | Path, device: str = "cpu", max_rows: int = 16,
                 threads: int | None = None, use_trt_ep: bool = False, manifest: dict | None = None):
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise EngineError(f"onnxruntime is not importable: {err}") from None
        self.engine_dir = Path(engine_dir)
        self.dev = torch.device(device)
        self.latent_shape, self.null_class = tuple(bundle.spec.latent_shape), bundle.null_class
        if self.dev.type == "cuda" and self.dev.index is None:
            self.dev = torch.device("cuda", torch.cuda.current_device())
        available = ort_available_providers()
        profile = (manifest or {}).get("batch_profile") or {"min": 1, "opt": max_rows, "max": max_rows}

        def providers(use_trt: bool):
            return lambda stream, shapes: ort_providers(
                self.dev.type, self.dev.index or 0, available, use_trt_ep=use_trt, stream_ptr=stream,
                trt_options=trt_ep_options(self.engine_dir, shapes, profile) if use_trt else None)

        self.dit = _OrtGraph(self.engine_dir / DIT_ONNX, self.dev, threads, providers(use_trt_ep))
        # The decoder stays off the fp16 TensorRT EP (engines.device.decode_precision): CUDA EP, fp32.
        self.vae = _OrtGraph(self.engine_dir / VAE_ONNX, self.dev, threads, providers(False))
        self.max_rows = max_rows
        used = self.dit.session.get_providers()
        precision = "fp16" if use_trt_ep and "TensorrtExecutionProvider" in used else "fp32"
        self.info = EngineInfo("onnxruntime", str(self.dev), precision, max_rows,
                               f"onnxruntime {ort.__version__}, providers {used}, decoder fp32, {self.engine_dir}")
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

"""TensorRT backend: runs the FP16 plans that build_engine.py writes (TensorRT 10 Python API).

I/O is bound to torch CUDA tensors (`set_tensor_address` with their data
pointers), so nothing is copied through the host; every engine instance owns its
own execution contexts and CUDA stream (one engine per worker). The batch is
dynamic within the plan's single optimisation profile; larger calls are split.
`tensorrt` is imported lazily: this module imports fine on machines without it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engines.base import Engine, EngineError, EngineInfo
from engines.manifest import DIT_PLAN, VAE_PLAN, check_artifacts
from engines.trt_version import INSTALL_HINT, version_problem
from model.bundle import ModelBundle
from model.latents import to_uint8


def import_tensorrt():
    """The tensorrt module, or EngineError saying why it cannot be used here."""
    try:
        import tensorrt
    except ImportError as err:
        raise EngineError(f"TensorRT backend unavailable: the tensorrt Python package is not installed ({err}); "
                          f"{INSTALL_HINT}; or use backend torch/onnxruntime") from None
    problem = version_problem(tensorrt)
    if problem:
        raise EngineError(f"TensorRT backend unavailable: {problem}")
    if not torch.cuda.is_available():
        raise EngineError("TensorRT backend unavailable: torch sees no CUDA GPU here")
    return tensorrt


def torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    try:
        return table[dtype]
    except KeyError:
        raise EngineError(f"TensorRT I/O type {dtype} is not supported by this backend") from None


class TrtPlan:
    """One deserialised plan with one execution context, fed with torch CUDA tensors on one stream."""

    def __init__(self, trt, runtime, path: Path, device: torch.device, stream: torch.cuda.Stream):
        if not path.is_file():
            raise EngineError(f"missing TensorRT plan {path}; run build_engine.py")
        self.trt, self.device, self.stream = trt, device, stream
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialise {path} (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        lo, _, hi = self.engine.get_tensor_profile_shape(self.inputs[0], 0)
        self.min_rows, self.max_rows = int(lo[0]), int(hi[0])

    def run(self, *tensors: torch.Tensor) -> torch.Tensor:
        """Inputs in the plan's input order; returns the first output (on the device, in the plan's dtype).

        Ordering: the plan's stream first waits for the caller's current stream (which
        produced the inputs), and the caller's stream then waits for the plan's (which
        produces the output), so neither side reads a buffer before it is written, and
        the host never blocks. A call below the profile's minimum rows is padded.
        """
        rows = tensors[0].shape[0]
        if rows > self.max_rows:
            raise EngineError(f"{rows} rows are above the plan's profile {self.min_rows}..{self.max_rows}")
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            keep = []  # bound buffers must live until the stream has run
            for name, t in zip(self.inputs, tensors, strict=True):
                t = pad_rows(t.to(self.device, self.dtypes[name]), self.min_rows).contiguous()
                keep.append(t)
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
            outs = []
            for name in self.outputs:
                out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name],
                                  device=self.device)
                self.context.set_tensor_address(name, out.data_ptr())
                outs.append(out)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise EngineError("TensorRT execute_async_v3 failed")
        caller.wait_stream(self.stream)
        for t in (*keep, *outs):  # the caching allocator must not hand these out before both streams are done
            t.record_stream(caller)
        return outs[0][:rows]


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` with its last row repeated up to `rows` rows (rows are independent; extra outputs are dropped)."""
    missing = rows - t.shape[0]
    if missing <= 0:
        return t
    return torch.cat([t, t[-1:].expand(missing, *t.shape[1:])])


class TrtEngine(Engine):
    def warmup_rows(self) -> list[int]:
        return sorted({self.dit.min_rows, self.max_rows})

    def __init__(self, bundle: ModelBundle, engine_dir: str | Path, device: str = "cuda", max_rows: int = 16):
        trt = import_tensorrt()
        self.engine_dir = Path(engine_dir)
        self.latent_shape, self.null_class = tuple(bundle.spec.latent_shape), bundle.null_class
        self.manifest = check_artifacts(self.engine_dir, bundle.spec, need_tensorrt=True)
        self.dev = torch.device(device)
        if self.dev.type != "cuda":
            raise EngineError(f"TensorRT runs on CUDA devices only, not {device!r}")
        if self.dev.index is None:
            self.dev = torch.device("cuda", torch.cuda.current_device())
        self.logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.dev):  # TensorRT deserialises onto the current device
            self.runtime = trt.Runtime(self.logger)
            self.stream = torch.cuda.Stream(self.dev)
            self.dit = TrtPlan(trt, self.runtime, self.engine_dir / DIT_PLAN, self.dev, self.stream)
            self.vae = TrtPlan(trt, self.runtime, self.engine_dir / VAE_PLAN, self.dev, self.stream)
        self.max_rows = min(max_rows, self.dit.max_rows)
        built = self.manifest["tensorrt"]
        route = built.get("route", "onnx")
        vae_precision = built.get("vae_precision", "fp16")  # plans from before the split decoded in fp16
        self.info = EngineInfo("tensorrt", str(self.dev), built.get("precision", "fp16"), self.max_rows,
                               f"TensorRT {trt.__version__} ({route} route), {self.engine_dir}",
                               decode_precision=vae_precision)

    @torch.inference_mode()
    def velocity(self, x, t, y):
        m = self.max_rows
        outs = [self.dit.run(x[i:i + m], t[i:i + m], y[i:i + m]).float() for i in range(0, x.shape[0], m)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @torch.inference_mode()
    def decode(self, z):
        m = min(self.max_rows, self.vae.max_rows)
        images = [to_uint8(self.vae.run(z[i:i + m]).float()) for i in range(0, z.shape[0], m)]
        return (images[0] if len(images) == 1 else torch.cat(images)).cpu()

    def close(self) -> None:
        self.stream.synchronize()
        del self.dit, self.vae

"""Which device and which precisions an engine runs with: pure decisions, testable without a GPU.

* `resolve_device`: "auto" means CUDA only where the chosen backend can really
  use it. torch seeing a GPU is not enough for ONNX Runtime: the CPU build of
  onnxruntime has no CUDA provider, so auto falls back to the CPU there.
* `ort_providers`: the execution providers an ONNX Runtime session is given.
* `decode_precision`: the VA-VAE decoder runs in fp32 unless fp16 or bf16 is
  asked for explicitly. Decoders of this family overflow in fp16, and the
  decoder is a small share of an image's FLOPs, so the DiT's precision is never
  inherited by the decoder.
"""

from __future__ import annotations

import re

from engines.base import EngineError

PRECISIONS = ("fp32", "bf16", "fp16")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+|meta)$")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def ort_available_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def ort_has_cuda(providers: list[str]) -> bool:
    return "CUDAExecutionProvider" in providers or "TensorrtExecutionProvider" in providers


def resolve_device(device: str, backend: str = "torch", *, has_cuda: bool | None = None,
                   providers: list[str] | None = None) -> str:
    """The concrete device ("cpu", "cuda", "cuda:N") for `backend`; EngineError when it cannot run there.

    `has_cuda` and `providers` default to what this machine has (tests pass them in).
    """
    if not DEVICE_PATTERN.match(device):
        raise EngineError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    has_cuda = cuda_available() if has_cuda is None else has_cuda
    if backend == "onnxruntime":
        providers = ort_available_providers() if providers is None else providers
        if device == "auto":
            return "cuda" if has_cuda and ort_has_cuda(providers) else "cpu"
        if device.startswith("cuda") and not ort_has_cuda(providers):
            raise EngineError(f"device {device!r} asked for, but this onnxruntime build has no CUDA or TensorRT "
                              f"execution provider (available: {providers}); install onnxruntime-gpu or use cpu")
    if backend == "simulated":  # a timing model: its tensors live on the host whatever it simulates
        if device not in ("auto", "cpu"):
            raise EngineError(f"backend simulated runs on the CPU (it simulates the accelerator's timing); "
                              f"device {device!r} is not available to it, use auto or cpu")
        return "cpu"
    if backend == "tensorrt":  # the backend itself says why it cannot run (no tensorrt, no GPU)
        if device == "cpu":
            raise EngineError("TensorRT runs on CUDA devices only; use device auto, cuda or cuda:N")
        return "cuda" if device == "auto" else device
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    if device.startswith("cuda") and not has_cuda:
        raise EngineError(f"device {device!r} requested but torch sees no CUDA GPU")
    return device


def ort_providers(device_type: str, device_index: int, available: list[str], *, use_trt_ep: bool,
                  stream_ptr: int | None = None, trt_options: dict | None = None) -> list:
    """Execution providers for a session on `device_type` ("cpu" | "cuda"), in priority order.

    `stream_ptr`, when given, is the CUDA stream the session computes on (the
    caller orders it against its own stream). `trt_options` are the TensorRT EP's
    extra options (profile shapes, caches, precision).
    """
    if device_type == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise EngineError(f"onnxruntime has no CUDAExecutionProvider (available: {available}); "
                          "install onnxruntime-gpu or use device=cpu")
    stream = {} if stream_ptr is None else {"has_user_compute_stream": "1", "user_compute_stream": str(stream_ptr)}
    chosen: list = []
    if use_trt_ep:
        if "TensorrtExecutionProvider" not in available:
            raise EngineError(f"precision fp16 with onnxruntime needs its TensorRT execution provider "
                              f"(available: {available})")
        chosen.append(("TensorrtExecutionProvider", {"device_id": device_index, **stream, **(trt_options or {})}))
    chosen.append(("CUDAExecutionProvider", {"device_id": device_index, **stream}))
    chosen.append("CPUExecutionProvider")
    return chosen


def decode_precision(requested: str | None, device_type: str) -> str:
    """The decoder's precision: fp32 by default on every backend; bf16/fp16 only when asked for."""
    precision = requested or "fp32"
    if precision not in PRECISIONS:
        raise EngineError(f"unknown decode precision {precision!r} ({' | '.join(PRECISIONS)})")
    if precision == "fp16" and device_type == "cpu":
        raise EngineError("fp16 decode is not usable on CPU; use fp32 or bf16")
    return precision


# Errors after which a CUDA context is unusable: every later call in the process fails the same way
# (CUDA runtime error strings, as torch reports them in "CUDA error: ..."). Out of memory is not one.
STICKY_CUDA_ERRORS = (
    "an illegal memory access was encountered",  # cudaErrorIllegalAddress
    "an illegal instruction was encountered",  # cudaErrorIllegalInstruction
    "misaligned address",  # cudaErrorMisalignedAddress
    "operation not supported on global/shared address space",  # cudaErrorInvalidAddressSpace
    "invalid program counter",  # cudaErrorInvalidPc
    "unspecified launch failure",  # cudaErrorLaunchFailure
    "the launch timed out and was terminated",  # cudaErrorLaunchTimeout
    "hardware stack error",  # cudaErrorHardwareStackError
    "device-side assert triggered",  # cudaErrorAssert
    "uncorrectable ecc error encountered",  # cudaErrorECCUncorrectable
    "uncorrectable nvlink error",  # cudaErrorNvlinkUncorrectable
    "cudaerrorillegaladdress", "cudaerrorlaunchfailure", "cudaerrorecc",
)


def is_sticky_device_error(err: BaseException) -> bool:
    """Whether `err` (or an error it was raised from) says the CUDA context is lost for good: the process
    must exit and be restarted, since retrying a forward, or the next job, fails again."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err).lower()
        if any(s in text for s in STICKY_CUDA_ERRORS):
            return True
        err = err.__cause__ or err.__context__
    return False


def use_device_in_this_thread(device) -> None:
    """Make `device` the current CUDA device of the calling thread (a no-op elsewhere). A new thread's
    current device is 0: its first CUDA call (an event wait, a copy) would create a context on GPU 0,
    hundreds of MiB, even when the engine runs on cuda:N."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)

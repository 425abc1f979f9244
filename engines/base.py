"""The one interface every runtime backend implements.

The sampler needs two primitives only (see docs/architecture.md):

* `velocity(x, t, y)`: one DiT forward over a batch of rows. x [R, C, H, W]
  float32, t [R] float32 (one time per row), y [R] int64 (the null class for
  unconditional rows). Returns float32 [R, C, H, W] on `device`. R may be any
  value in 1..max_rows; CFG is done by the caller.
* `decode(z)`: VA-VAE decoder over de-normalised latents [N, C, H, W] float32;
  returns uint8 images [N, H', W', 3] on the CPU (the official conversion).
  `decode_async(z)` is the same without waiting (the service's path): the uint8
  conversion runs on the device and the copy to pinned host memory is
  non-blocking; the images may be read once the mark it returns was called.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EngineInfo:
    backend: str  # "torch" | "onnxruntime" | "tensorrt"
    device: str  # "cpu" | "cuda:0" ...
    precision: str  # "fp32" | "bf16" | "fp16" (the DiT's)
    max_rows: int  # most rows one velocity() call accepts
    detail: str = ""  # e.g. execution providers, engine file
    decode_precision: str = "fp32"  # the VA-VAE decoder's


class Engine(ABC):
    info: EngineInfo
    latent_shape: tuple[int, int, int]  # [C, H, W] of one sample
    null_class: int

    @property
    def device(self) -> torch.device:
        return torch.device(self.info.device)

    def warmup_rows(self) -> list[int]:
        """Row counts to run once before serving (backends with per-size state list every size)."""
        return sorted({1, self.info.max_rows})

    @torch.inference_mode()
    def warmup(self) -> None:
        """Run every row count that needs it and one decode, so that the first requests pay no
        lazy initialisation (CUDA graph capture, compilation, library handles, autotuning)."""
        for rows in self.warmup_rows():
            x = torch.zeros((rows, *self.latent_shape), device=self.device)
            t = torch.full((rows,), 0.5, device=self.device)
            y = torch.full((rows,), self.null_class, dtype=torch.long, device=self.device)
            self.velocity(x, t, y)
        self.decode(torch.zeros((1, *self.latent_shape), device=self.device))

    @abstractmethod
    def velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor: ...

    def decode_async(self, z: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None]]:
        """`decode(z)` without waiting for the device: uint8 images [N, H, W, 3] in host memory that may
        be read once the returned mark was called. Backends whose decode is synchronous return a
        mark with nothing to wait for."""
        return self.decode(z), _done

    def to_host_async(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of `t` enqueued after the work so far (pinned, non-blocking on CUDA); valid once a
        later mark was called. On the CPU it is `t` itself."""
        if t.device.type != "cuda":
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    def mark(self) -> Callable[[], None]:
        """A mark after everything enqueued so far: calling it blocks the host until the device has run
        that work (a CUDA event on CUDA; on the CPU the work is done when the call returns)."""
        if self.device.type == "cuda":
            # blocking=True (cudaEventBlockingSync): a thread waiting on the mark sleeps until the device
            # wakes it. The default event spins a CPU core for the whole wait, one per waiting store thread.
            done = torch.cuda.Event(blocking=True)
            done.record(torch.cuda.current_stream(self.device))
            return done.synchronize
        return _done

    def synchronize(self) -> None:
        """Block the host until the device has run everything enqueued so far."""
        self.mark()()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device resources."""


def _done() -> None:
    """Nothing to wait for."""


class EngineError(RuntimeError):
    """An engine that cannot run here (missing runtime, stale or foreign artifacts)."""

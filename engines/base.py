"""The one interface every runtime backend implements.

The sampler needs two primitives only (see docs/architecture.md):

* `velocity(x, t, y)`: one DiT forward over a batch of rows. x [R, C, H, W]
  float32, t [R] float32 (one time per row), y [R] int64 (the null class for
  unconditional rows). Returns float32 [R, C, H, W] on `device`. R may be any
  value in 1..max_rows; CFG is done by the caller.
* `decode(z)`: VA-VAE decoder over de-normalised latents [N, C, H, W] float32;
  returns uint8 images [N, H', W', 3] on the CPU (the official conversion).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EngineInfo:
    backend: str  # "torch" | "onnxruntime" | "tensorrt"
    device: str  # "cpu" | "cuda:0" ...
    precision: str  # "fp32" | "bf16" | "fp16"
    max_rows: int  # most rows one velocity() call accepts
    detail: str = ""  # e.g. execution providers, engine file


class Engine(ABC):
    info: EngineInfo

    @property
    def device(self) -> torch.device:
        return torch.device(self.info.device)

    @abstractmethod
    def velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device resources."""


class EngineError(RuntimeError):
    """An engine that cannot run here (missing runtime, stale or foreign artifacts)."""

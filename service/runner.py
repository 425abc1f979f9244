"""Runs what the scheduler planned: one guided forward and an Euler update, or a decode.

Everything runs on the caller's current stream, the one the scheduler's noise
copies were enqueued on, so no cross-stream ordering is needed here (the
TensorRT and ONNX Runtime backends order their own streams against it). A step
ends with `engine.synchronize()` (CUDA: an event recorded after the update; the
simulated backend: a sleep until its queue is empty), so the step time that the
metrics report is the device's time, not the time to enqueue kernels.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from engines.base import Engine
from model.latents import LatentStats
from model.sampling import guided_velocity
from service.scheduler import StepPlan


class Runner:
    def __init__(self, engine: Engine, stats: LatentStats, null_class: int):
        self.engine = engine
        self.null_class = null_class
        self.device = engine.device
        self.stats = stats.to(self.device)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> tuple[torch.Tensor, float]:
        """Advance every planned sample by one Euler step; returns (x_next [B, C, H, W], seconds)."""
        start = time.perf_counter()
        x = torch.stack([s.x for s in plan.samples])  # already on the device
        v = guided_velocity(
            self.engine.velocity, x, self._to_device(plan.t), self._to_device(plan.y), plan.guided,
            self._to_device(plan.cfg_scale), self.null_class, self._to_device(plan.cfg_channels),
        )
        x_next = x + self._to_device(plan.dt).view(-1, 1, 1, 1) * v
        self.engine.synchronize()
        return x_next, time.perf_counter() - start

    @torch.inference_mode()
    def decode(self, latents: list[torch.Tensor]) -> tuple[np.ndarray, float]:
        """uint8 images [N, H, W, 3] of finished samples, decoded as one batch."""
        start = time.perf_counter()
        z = self.stats.denormalize(torch.stack(latents).float())
        images = self.engine.decode(z).numpy()
        return images, time.perf_counter() - start

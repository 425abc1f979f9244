"""Runs what the scheduler planned: one guided forward and an Euler update, or a decode.

On CUDA the runner owns one stream and enqueues everything on it, so a model
loading in the background (hot swap: CUDA graph capture, weight uploads) never
shares the legacy default stream with the serving loop. A step ends with a wait
on a CUDA event recorded after the update: the step time that the metrics
report is then the device's time, not the time to enqueue kernels.
"""

from __future__ import annotations

import contextlib
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
        dev = engine.device
        self.stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        with self._on_stream():
            self.stats = stats.to(dev)

    def _on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _wait(self) -> None:
        """Block the host until the runner's stream has done its work (no-op off CUDA)."""
        if self.stream is not None:
            done = torch.cuda.Event()
            done.record(self.stream)
            done.synchronize()

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.engine.device, non_blocking=True)

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> tuple[torch.Tensor, float]:
        """Advance every planned sample by one Euler step; returns (x_next [B, C, H, W], seconds)."""
        start = time.perf_counter()
        with self._on_stream():
            x = torch.stack([s.x for s in plan.samples])  # already on the device
            v = guided_velocity(
                self.engine.velocity, x, self._to_device(plan.t), self._to_device(plan.y), plan.guided,
                self._to_device(plan.cfg_scale), self.null_class, self._to_device(plan.cfg_channels),
            )
            x_next = x + self._to_device(plan.dt).view(-1, 1, 1, 1) * v
        self._wait()
        return x_next, time.perf_counter() - start

    @torch.inference_mode()
    def decode(self, latents: list[torch.Tensor]) -> tuple[np.ndarray, float]:
        """uint8 images [N, H, W, 3] of finished samples, decoded as one batch."""
        start = time.perf_counter()
        with self._on_stream():
            z = self.stats.denormalize(torch.stack(latents).float())
            images = self.engine.decode(z).numpy()
        return images, time.perf_counter() - start

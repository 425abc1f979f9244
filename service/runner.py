"""Runs what the scheduler planned: one guided forward and an Euler update, or a decode.

Everything runs on the caller's current stream, the one the scheduler's noise
copies were enqueued on, so no cross-stream ordering is needed here (the
TensorRT and ONNX Runtime backends order their own streams against it).

Steps run ahead of the device by at most `run_ahead` steps: a step enqueues its
work, records a mark (a CUDA event; the simulated backend's queue position), and
then waits for the mark of the step `run_ahead` before it. So the host plans and
enqueues step k+1 while the device runs step k, and the host's per-step work
(scheduling, tensor building, CFG bookkeeping) leaves the device idle only when
it takes longer than a forward. The scheduler needs no result of step k to plan
step k+1 (every sample's next time, and who finishes, are known on the host), and
the latents are device tensors that later work on the same stream may use
before they are computed. A decode hands images to the host, which waits for
everything before it. In steady state a step's measured time is the device's
time per step, not the time to enqueue kernels. `run_ahead=0` waits at the end
of every step.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np
import torch

from engines.base import Engine
from model.latents import LatentStats
from model.sampling import guided_velocity
from service.scheduler import StepPlan


class Runner:
    def __init__(self, engine: Engine, stats: LatentStats, null_class: int, run_ahead: int = 1):
        self.engine = engine
        self.null_class = null_class
        self.device = engine.device
        self.stats = stats.to(self.device)
        self.run_ahead = run_ahead
        self._in_flight: deque = deque()  # marks of enqueued steps, oldest first

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
        self._in_flight.append(self.engine.mark())
        while len(self._in_flight) > self.run_ahead:
            self._in_flight.popleft()()
        return x_next, time.perf_counter() - start

    def drain(self) -> None:
        """Wait for every enqueued step."""
        while self._in_flight:
            self._in_flight.popleft()()

    @torch.inference_mode()
    def decode(self, latents: list[torch.Tensor]) -> tuple[np.ndarray, float]:
        """uint8 images [N, H, W, 3] of finished samples, decoded as one batch."""
        start = time.perf_counter()
        z = self.stats.denormalize(torch.stack(latents).float())
        images = self.engine.decode(z).numpy()  # on the host: everything enqueued before it has run
        self._in_flight.clear()
        return images, time.perf_counter() - start

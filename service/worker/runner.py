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
before they are computed. A decode is enqueued the same way: its images reach host
memory through a non-blocking copy, and the thread that stores them waits for
them, not the loop. In steady state a step's measured time is the device's
time per step, not the time to enqueue kernels. `run_ahead=0` waits at the end
of every step.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from engines.base import Engine
from model.latents import LatentStats
from model.sampling import guided_velocity
from service.worker.scheduler import StepPlan


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
    def decode_async(self, latents: list[torch.Tensor]) -> Decoded:
        """Enqueue the decode of finished samples as one batch, and their finiteness check; returns at once.

        The uint8 conversion runs on the device and the copy to host memory is non-blocking
        (engines.base.Engine.decode_async), so the host goes on planning the next step while
        the device decodes; whoever reads the images calls `wait()` first."""
        start = time.perf_counter()
        z = torch.stack(latents).float()
        if z.is_meta:  # shapes without data (tests/test_device_discipline.py): nothing to check
            finite = torch.ones(len(latents), dtype=torch.bool)
        else:
            finite = self.engine.to_host_async(torch.isfinite(z).flatten(1).all(1))
        images, wait = self.engine.decode_async(self.stats.denormalize(z))
        return Decoded(images, finite, wait, time.perf_counter() - start)

    def decode(self, latents: list[torch.Tensor]) -> tuple[np.ndarray, float]:
        """uint8 images [N, H, W, 3] of finished samples, decoded as one batch, on the host."""
        start = time.perf_counter()
        decoded = self.decode_async(latents)
        decoded.wait()
        self._in_flight.clear()  # everything enqueued before the decode has run too
        return decoded.images.numpy(), time.perf_counter() - start


@dataclass
class Decoded:
    """A decode on its way to the host: read `images` and `finite` only after `wait()` returned."""

    images: torch.Tensor  # uint8 [N, H, W, 3], host memory
    finite: torch.Tensor  # bool [N]: the sample's latent held no NaN or inf
    wait: Callable[[], None]
    enqueue_s: float  # host time spent enqueueing

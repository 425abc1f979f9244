"""Runs what the scheduler planned: one guided forward and an Euler update, or a decode."""

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
        self.stats = stats
        self.null_class = null_class

    def step(self, plan: StepPlan) -> tuple[torch.Tensor, float]:
        """Advance every planned sample by one Euler step; returns (x_next [B, C, H, W], seconds)."""
        start = time.perf_counter()
        dev = self.engine.device
        x = torch.stack([s.x for s in plan.samples]).to(dev)
        v = guided_velocity(
            self.engine.velocity, x, plan.t.to(dev), plan.y.to(dev), plan.guided.to(dev),
            plan.cfg_scale.to(dev), self.null_class, plan.cfg_channels.to(dev),
        )
        x_next = x + plan.dt.to(dev).view(-1, 1, 1, 1) * v
        return x_next, time.perf_counter() - start

    def decode(self, latents: list[torch.Tensor]) -> tuple[np.ndarray, float]:
        """uint8 images [N, H, W, 3] of finished samples, decoded as one batch."""
        start = time.perf_counter()
        z = self.stats.denormalize(torch.stack(latents).to(self.engine.device).float())
        images = self.engine.decode(z).numpy()
        return images, time.perf_counter() - start

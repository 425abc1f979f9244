"""Step-level (continuous) batching: decides what runs each sampler step.

The scheduler owns the active samples. Each step it hands the runner a plain
`StepPlan` (which samples, their t and dt, labels, who is guided) and gets the
advanced latents back. Between steps it admits new samples into free rows, so
a request never waits for a whole sampling run to finish (`batching="step"`);
with `batching="request"` it admits only into an empty batch, the classic way.

Rows: a sample costs one row, plus one unconditional row while its own t is in
its CFG interval. `max_rows` bounds conditional + unconditional rows per
forward (the engine's profile). Rows are not reserved ahead: when samples
entering their guided phase overflow the bound, the youngest wait a step
(admission order = priority, so nothing starves) and no new sample is admitted
until everyone fits again.

Device discipline: every sample's state lives on the engine's device from the
moment it is admitted (the noise is drawn on the CPU, as the sampler's
convention says, and moved once). Everything the plan decides (times, labels,
who is guided) is known on the host, so a step never waits on a device read.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from model.sampling import initial_noise, time_grid
from service.jobs import Job


@dataclass
class Sample:
    """One request being denoised."""

    job: Job
    x: torch.Tensor  # [C, H, W] current state, on the engine's device
    grid: list[float]  # N float32 time points, read onto the host once
    seq: int  # admission order
    admitted_at: float = field(default_factory=time.time)
    step: int = 0
    compute_s: float = 0.0
    widest_batch: int = 0  # most samples that shared one of its forwards

    @property
    def t(self) -> float:
        return self.grid[self.step]

    @property
    def guided(self) -> bool:
        return self.job.preset.guided_at(self.t)

    @property
    def rows(self) -> int:
        return 2 if self.guided else 1

    @property
    def done(self) -> bool:
        return self.step >= len(self.grid) - 1


@dataclass
class StepPlan:
    """Everything the runner needs for one forward; it decides nothing itself.

    The tensors are host-side (small; the runner moves them once); `guided` is a
    plain list because the runner branches on it.
    """

    samples: list[Sample]
    t: torch.Tensor  # [B] float32
    dt: torch.Tensor  # [B] float32
    y: torch.Tensor  # [B] int64
    guided: list[bool]  # [B]
    cfg_scale: torch.Tensor  # [B] float32
    cfg_channels: torch.Tensor  # [B] int64 (channel count; C for all-channel guidance)

    @property
    def rows(self) -> int:
        return len(self.samples) + sum(self.guided)


class Scheduler:
    def __init__(self, max_rows: int, latent_shape: tuple[int, int, int], batching: str = "step",
                 device: torch.device | str = "cpu"):
        if batching not in ("step", "request"):
            raise ValueError(f"unknown batching {batching!r}")
        self.max_rows = max_rows
        self.latent_shape = latent_shape
        self.device = torch.device(device)
        self.batching = batching
        self.active: list[Sample] = []
        self.deferred = 0  # samples left out of the last plan
        self._seq = itertools.count()

    # -- admission --------------------------------------------------------------
    def active_rows(self) -> int:
        return sum(s.rows for s in self.active)

    def admission_rows(self) -> int:
        """Rows a new sample may take now (0: admit nothing this step)."""
        if self.deferred:
            return 0
        if self.batching == "request":
            # A whole batch starts together; reserve the worst case (2 rows) per sample.
            return self.max_rows if not self.active else 0
        return self.max_rows - self.active_rows()

    @staticmethod
    def rows_at_start(job: Job) -> int:
        return 2 if job.preset.guided_at(0.0) else 1

    @staticmethod
    def reserved_rows(job: Job) -> int:
        return 2 if job.preset.uses_cfg else 1

    def admit_waiting(self, waiting: deque[Job]) -> list[Sample]:
        """Admit jobs from the head of `waiting` (FIFO) while their rows fit."""
        budget, admitted = self.admission_rows(), []
        cost = self.reserved_rows if self.batching == "request" else self.rows_at_start
        while waiting and cost(waiting[0]) <= budget:
            job = waiting.popleft()
            budget -= cost(job)
            admitted.append(self.admit(job))
        return admitted

    def admit(self, job: Job) -> Sample:
        grid = time_grid(job.preset.num_steps, job.preset.timestep_shift).tolist()
        noise = initial_noise(job.seed, self.latent_shape).to(self.device, non_blocking=True)
        sample = Sample(job, noise, grid, next(self._seq))
        self.active.append(sample)
        return sample

    # -- one step -----------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        """The oldest samples whose rows fit, in admission order."""
        chosen, rows = [], 0
        for s in self.active:  # admission order
            if rows + s.rows <= self.max_rows:
                chosen.append(s)
                rows += s.rows
        self.deferred = len(self.active) - len(chosen)
        if not chosen:
            return None
        c = self.latent_shape[0]
        t = torch.tensor([s.grid[s.step] for s in chosen], dtype=torch.float32)
        t_next = torch.tensor([s.grid[s.step + 1] for s in chosen], dtype=torch.float32)
        presets = [s.job.preset for s in chosen]
        return StepPlan(
            samples=chosen,
            t=t,
            dt=t_next - t,
            y=torch.tensor([s.job.class_id for s in chosen], dtype=torch.long),
            guided=[s.guided for s in chosen],
            cfg_scale=torch.tensor([p.cfg_scale for p in presets], dtype=torch.float32),
            cfg_channels=torch.tensor([c if p.cfg_channels is None else p.cfg_channels for p in presets]),
        )

    def commit(self, plan: StepPlan, x_next: torch.Tensor, seconds: float) -> list[Sample]:
        """Store the advanced states; returns (and retires) the samples that reached t = 1."""
        width = len(plan.samples)
        for s, x in zip(plan.samples, x_next, strict=True):
            s.x = x
            s.step += 1
            s.compute_s += seconds
            s.widest_batch = max(s.widest_batch, width)
        finished = [s for s in plan.samples if s.done]
        if finished:
            self.active = [s for s in self.active if not s.done]
        return finished

    def drop(self, predicate) -> list[Sample]:
        """Remove and return active samples matching predicate (e.g. past their deadline)."""
        gone = [s for s in self.active if predicate(s)]
        if gone:
            self.active = [s for s in self.active if not predicate(s)]
        return gone

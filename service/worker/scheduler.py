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

Priority: sample-set jobs (`job.batch`) are priority 1, interactive requests 0. While any
interactive sample is active, plans hold interactive samples only (sample-set samples keep
their state and wait), and interactive admission counts interactive rows only; so a running
sample set costs an interactive request at most the forward in progress, never a share of
every forward. Sample-set samples are admitted only while no interactive one is active.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from model.sampling import initial_noise, time_grid_values
from service.store.jobs import Job


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
    finished_at: float = 0.0  # when its last step ended (it then waits for the decode)
    guided_steps: list[bool] = field(default_factory=list)  # per grid point: inside the CFG interval?

    def __post_init__(self) -> None:
        if not self.guided_steps:  # decided once, not on every step
            self.guided_steps = [self.job.preset.guided_at(t) for t in self.grid]

    @property
    def t(self) -> float:
        return self.grid[self.step]

    @property
    def guided(self) -> bool:
        return self.guided_steps[self.step]

    @property
    def rows(self) -> int:
        return 2 if self.guided else 1

    @property
    def done(self) -> bool:
        return self.step >= len(self.grid) - 1

    @property
    def priority(self) -> int:
        return priority(self.job)


def priority(job: Job) -> int:
    """0: an interactive request; 1: an image of a sample set (runs only when 0 has nothing)."""
    return 1 if job.batch else 0


@dataclass
class StepPlan:
    """Everything the runner needs for one forward; it decides nothing itself.

    Samples are in admission order, guided ones first.

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
    def active_rows(self, up_to_priority: int = 1) -> int:
        return sum(s.rows for s in self.active if s.priority <= up_to_priority)

    def interactive_active(self) -> bool:
        return any(s.priority == 0 for s in self.active)

    def admission_rows(self, priority: int = 0) -> int:
        """Rows a new sample of this priority may take now (0: admit nothing this step)."""
        if self.deferred or (priority > 0 and self.interactive_active()):
            return 0
        if self.batching == "request":
            # A whole batch starts together; reserve the worst case (2 rows) per sample.
            busy = self.interactive_active() if priority == 0 else bool(self.active)
            return self.max_rows if not busy else 0
        return self.max_rows - self.active_rows(priority)

    @staticmethod
    def rows_at_start(job: Job) -> int:
        return 2 if job.preset.guided_at(0.0) else 1

    @staticmethod
    def reserved_rows(job: Job) -> int:
        return 2 if job.preset.uses_cfg else 1

    def admit_waiting(self, waiting: deque[Job], priority: int = 0) -> list[Sample]:
        """Admit jobs of one priority from the head of `waiting` (FIFO) while their rows fit."""
        budget, admitted = self.admission_rows(priority), []
        cost = self.reserved_rows if self.batching == "request" else self.rows_at_start
        while waiting and cost(waiting[0]) <= budget:
            job = waiting.popleft()
            budget -= cost(job)
            admitted.append(self.admit(job))
        return admitted

    def admit(self, job: Job) -> Sample:
        grid = list(time_grid_values(job.preset.num_steps, job.preset.timestep_shift))
        noise = initial_noise(job.seed, self.latent_shape).to(self.device, non_blocking=True)
        sample = Sample(job, noise, grid, next(self._seq))
        self.active.append(sample)
        return sample

    # -- one step -----------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        """The oldest samples of the most urgent priority whose rows fit, in admission order."""
        pool = [s for s in self.active if s.priority == 0] or self.active
        chosen, rows = [], 0
        for s in pool:  # admission order
            if rows + s.rows <= self.max_rows:
                chosen.append(s)
                rows += s.rows
        self.deferred = len(pool) - len(chosen)
        if not chosen:
            return None
        # Guided samples first (a stable sort): the runner then slices their rows instead of gathering them.
        chosen.sort(key=lambda s: not s.guided)
        c = self.latent_shape[0]
        # Two host tensors per step, not six: this runs once per forward, between device waits.
        floats = torch.tensor([(s.grid[s.step], s.grid[s.step + 1], s.job.preset.cfg_scale) for s in chosen],
                              dtype=torch.float32)
        ints = torch.tensor([(s.job.class_id, c if s.job.preset.cfg_channels is None else s.job.preset.cfg_channels)
                             for s in chosen], dtype=torch.long)
        t = floats[:, 0]
        return StepPlan(
            samples=chosen,
            t=t,
            dt=floats[:, 1] - t,
            y=ints[:, 0],
            guided=[s.guided for s in chosen],
            cfg_scale=floats[:, 2],
            cfg_channels=ints[:, 1],
        )

    def commit(self, plan: StepPlan, x_next: torch.Tensor, seconds: float, now: float | None = None) -> list[Sample]:
        """Store the advanced states; returns (and retires) the samples that reached t = 1 (stamped
        `finished_at` = `now`, default time.time())."""
        width = len(plan.samples)
        now = time.time() if now is None else now
        for s, x in zip(plan.samples, x_next.unbind(0), strict=True):
            s.x = x
            s.step += 1
            s.compute_s += seconds
            if width > s.widest_batch:
                s.widest_batch = width
        finished = [s for s in plan.samples if s.done]
        if finished:
            for s in finished:
                s.finished_at = now
            self.active = [s for s in self.active if not s.done]
        return finished

    def drop(self, predicate) -> list[Sample]:
        """Remove and return active samples matching predicate (e.g. past their deadline)."""
        gone = [s for s in self.active if predicate(s)]
        if gone:
            self.active = [s for s in self.active if not predicate(s)]
        return gone


class DecodeQueue:
    """Finished samples waiting for the VAE decode, and when to run it.

    A decode call has a fixed cost whatever its size (on the H200, 1 image takes
    6.0 ms and 4 images 13.2 ms: docs/benchmarks.md), and every sample still
    denoising waits for it. So while others are denoising, a finished sample may
    wait up to `max_delay_s` for companions to share one call; with nothing else
    to run, or `max_batch` waiting, the decode runs at once. `max_delay_s` 0:
    decode every step's finished samples at once.
    """

    def __init__(self, max_delay_s: float = 0.0, max_batch: int = 64):
        self.max_delay_s = max_delay_s
        self.max_batch = max(1, max_batch)
        self.waiting: list[Sample] = []

    def __len__(self) -> int:
        return len(self.waiting)

    def add(self, samples: list[Sample]) -> None:
        self.waiting += samples

    def due(self, now: float, active_rows: int, max_rows: int) -> list[Sample]:
        """The samples to decode now (at most max_batch), or [] to let them wait for companions.

        They wait only while the samples still denoising fill at least half of `max_rows`: below
        that the accelerator has time to spare and a decode delays nobody much. `now` is on the
        time.time() clock (Sample.finished_at's).
        """
        if not self.waiting:
            return []
        oldest = min(s.finished_at for s in self.waiting)
        busy = 2 * active_rows >= max_rows
        if busy and len(self.waiting) < self.max_batch and now - oldest < self.max_delay_s:
            return []
        batch, self.waiting = self.waiting[: self.max_batch], self.waiting[self.max_batch:]
        return batch

    def drop(self, predicate) -> list[Sample]:
        gone = [s for s in self.waiting if predicate(s)]
        self.waiting = [s for s in self.waiting if not predicate(s)]
        return gone

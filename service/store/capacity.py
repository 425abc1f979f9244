"""How much work the workers can do, and whether a new job can still finish before its deadline.

Work is counted in row-steps: one DiT row for one sampler step. A job costs one row per
Euler step plus one unconditional row on each step inside its CFG interval
(`row_steps`). Every worker models how long one loop tick takes as a function of the
rows in its forward, `seconds = a + b * rows` (`TickModel`: timed at start-up, scaled by
what its live ticks took over the last seconds, at full width once it has run full batches),
and publishes the line in its heartbeat. The API sums the fleet's full-batch throughput and asks whether the work
ahead of a new job plus the job's own steps fit in its deadline (`admission_limits`);
the check itself runs atomically in Redis (service/store/scripts.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import lru_cache

from model.sampling import SamplerPreset, time_grid_values


@lru_cache(maxsize=256)
def _rows_per_step(preset: SamplerPreset) -> tuple[int, ...]:
    return tuple(2 if preset.guided_at(t) else 1 for t in time_grid_values(preset.num_steps, preset.timestep_shift)[:-1])


def row_steps(preset: SamplerPreset, upto: int | None = None) -> int:
    """Rows x steps of a job with this preset (of its first `upto` steps when given)."""
    return sum(_rows_per_step(preset)[:upto])


class Slowdown:
    """Live seconds over bare-forward seconds of the ticks of about the last `window_s` seconds: two sums
    that decay with the live time that passes, so their ratio is the throughput the machine really gave
    over that while (one slow tick moves it by its share of the time, a slower minute all the way),
    whether a tick takes 1 ms or 100 ms."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.live_s = 0.0
        self.bare_s = 0.0
        self.at = -math.inf  # time.monotonic() of the last observation

    def add(self, live_s: float, bare_s: float) -> None:
        keep = math.exp(-max(0.0, live_s) / self.window_s)
        self.live_s = self.live_s * keep + live_s
        self.bare_s = self.bare_s * keep + bare_s
        self.at = time.monotonic()

    @property
    def value(self) -> float | None:
        return self.live_s / self.bare_s if self.bare_s > 0 else None


class TickModel:
    """A worker's loop-tick time against rows per forward: what the worker measured.

    Its shape comes from timing bare forwards of one row and of a full batch at start-up
    (`calibrate`): forward(rows) = a + b * rows. Live ticks, which add Redis round trips,
    decoding and whatever else shares the machine, scale it by the ratio of the live ticks'
    time to the bare forwards of their widths over the last `window_s` seconds of busy
    ticks (`Slowdown`): `scale` over every tick, `full_scale` over ticks at least
    `FULL_SHARE` of `max_rows` wide only. The admission's rate is a full batches' rate, so
    once full batches have been measured (within `FULL_FRESH_S`) their scale is published;
    before, the line is scaled by what narrower ticks measured. Published: the scaled line.
    """

    FULL_SHARE = 0.75
    FULL_FRESH_S = 60.0

    def __init__(self, max_rows: int, window_s: float = 2.0):
        self.max_rows = max_rows
        self.shape: tuple[float, float] | None = None
        self.scale = Slowdown(window_s)
        self.full_scale = Slowdown(window_s)
        self.full_rows = max(1, math.ceil(self.FULL_SHARE * max_rows))

    def calibrate(self, seconds: dict[int, float]) -> None:
        """Bare forward seconds by rows (one or two widths)."""
        (r0, s0), (r1, s1) = min(seconds.items()), max(seconds.items())
        b = max(0.0, (s1 - s0) / (r1 - r0)) if r1 > r0 else 0.0
        a = max(0.0, s1 - b * r1)
        self.shape = (a, b)

    def forward_s(self, rows: int) -> float:
        a, b = self.shape or (0.0, 0.0)
        return a + b * rows

    def observe(self, rows: int, seconds: float) -> None:
        bare = self.forward_s(rows)
        if bare > 0:
            self.scale.add(seconds, bare)
            if rows >= self.full_rows:
                self.full_scale.add(seconds, bare)

    def current_scale(self) -> float:
        """Live over bare: at full width when it was measured lately, else over whatever ran (1.0: nothing yet)."""
        full, any_width = self.full_scale.value, self.scale.value
        if full is not None and time.monotonic() - self.full_scale.at < self.FULL_FRESH_S:
            return full
        return any_width if any_width is not None else 1.0

    def published(self) -> dict | None:
        """What the heartbeat carries: tick seconds = a + b * rows, and the widest forward."""
        if self.shape is None:
            return None
        a, b = self.shape
        k = self.current_scale()
        return {"a": a * k, "b": b * k, "max_rows": self.max_rows}


@dataclass(frozen=True)
class FleetRate:
    """The live workers' capacity as the API sees it."""

    rows_per_s: float  # full-batch throughput of all workers together
    full_tick_s: float  # slowest worker's tick at full width (a sample's step when batches are full)
    alone_tick_s: float  # slowest worker's tick with one guided sample alone

    @classmethod
    def of(cls, fits: list[dict]) -> FleetRate | None:
        fits = [f for f in fits if f and f.get("max_rows")]
        if not fits:
            return None
        full = [f["a"] + f["b"] * f["max_rows"] for f in fits]
        if min(full) <= 0:
            return None
        return cls(rows_per_s=sum(f["max_rows"] / t for f, t in zip(fits, full, strict=True)),
                   full_tick_s=max(full), alone_tick_s=max(f["a"] + 2 * f["b"] for f in fits))


@dataclass(frozen=True)
class Limits:
    """What the admission script needs: the most work ahead that still lets the job finish in time."""

    max_work: float  # row-steps ahead of the job (queued + active, less what is done) that still fit
    alone_fits: bool  # whether the job fits its deadline on an empty queue


def admission_limits(rate: FleetRate | None, steps: int, budget_s: float) -> Limits | None:
    """None: no measured rate yet (only the queue-length limit applies)."""
    if rate is None:
        return None
    own_busy = steps * rate.full_tick_s
    return Limits(max_work=max(0.0, (budget_s - own_busy) * rate.rows_per_s),
                  alone_fits=steps * rate.alone_tick_s <= budget_s)


def retry_after_s(rate: FleetRate | None, work: float, limits: Limits | None) -> int:
    """Seconds until enough of the work ahead is done for the job to fit (at least 1)."""
    if rate is None or limits is None:
        return 1
    return max(1, math.ceil((work - limits.max_work) / rate.rows_per_s))

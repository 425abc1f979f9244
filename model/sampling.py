"""The official LightningDiT sampler: rectified flow, shifted time grid, Euler, CFG interval.

Conventions (facts file, sections 0 and 3):
* t runs from 0 (noise) to 1 (data); the model sees raw t.
* `num_steps` counts grid points: N points are N-1 model evaluations (Euler).
* shift s: t' = s t / (1 + (s - 1) t) on a float32 linspace (s <= 0 means none).
* CFG is used iff cfg_scale > 1; a sample is guided at time t iff there is no
  interval or t >= cfg_interval_start. Guidance touches latent channels 0..2 only
  (`cfg_channels=3`, the release's rule); `cfg_channels=None` guides all channels.
* The interval test is per sample, so only guided samples get an unconditional
  row: the official code computes that row on every step and throws it away on
  unguided steps, which gives the same numbers.

Noise convention: a request's initial noise is
`torch.randn((1, C, H, W), generator=torch.Generator("cpu").manual_seed(seed))[0]`
in float32 on the CPU, moved to the compute device afterwards, so an image
depends only on (model, class, seed, preset), never on its batch mates or the device.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SamplerPreset:
    num_steps: int = 250  # grid points, i.e. num_steps - 1 Euler steps
    cfg_scale: float = 1.0
    cfg_interval_start: float | None = None  # None: guide on every step
    timestep_shift: float = 0.0
    method: Literal["euler", "heun"] = "euler"
    cfg_channels: int | None = 3  # None: guide every channel

    def __post_init__(self) -> None:
        if self.num_steps < 2:
            raise ValueError("num_steps counts grid points and must be at least 2")
        if self.method not in ("euler", "heun"):
            raise ValueError(f"unknown sampling method {self.method!r}")

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale > 1.0

    def guided_at(self, t: float) -> bool:
        return self.uses_cfg and (self.cfg_interval_start is None or t >= self.cfg_interval_start)

    def replace(self, **changes) -> SamplerPreset:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return dict(_fields_of(self))


@functools.lru_cache(maxsize=1024)
def _fields_of(preset: SamplerPreset) -> tuple[tuple[str, object], ...]:
    # The serving path keys and queues every request by its preset's fields: computed once per preset.
    return tuple(dataclasses.asdict(preset).items())


PRESETS: dict[str, SamplerPreset] = {
    # configs/reproductions/lightningdit_xl_vavae_f16d32_800ep_cfg.yaml (FID 1.35)
    "800ep": SamplerPreset(num_steps=250, cfg_scale=6.7, cfg_interval_start=0.125, timestep_shift=0.3),
    # configs/reproductions/lightningdit_xl_vavae_f16d32_64ep_cfg.yaml (FID 2.11)
    "64ep": SamplerPreset(num_steps=250, cfg_scale=10.0, cfg_interval_start=0.10, timestep_shift=0.3),
    # run_fast_inference.sh --demo: cfg 9, no interval, no shift, the config's 250 points
    "demo": SamplerPreset(num_steps=250, cfg_scale=9.0, cfg_interval_start=None, timestep_shift=0.0),
}


def time_grid(num_steps: int, shift: float = 0.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 grid of `num_steps` points from 0 to 1, shifted as the release does."""
    t = torch.linspace(0, 1, num_steps, dtype=torch.float32)
    if shift > 0:
        t = (shift * t) / (1 + (shift - 1) * t)
        t[-1] = 1.0  # the data end, which the float32 formula can miss by an ulp (shift 0.1: 0.99999976)
    return t.to(device)


@functools.lru_cache(maxsize=1024)
def time_grid_values(num_steps: int, shift: float = 0.0) -> tuple[float, ...]:
    """`time_grid` as Python floats, computed once per (num_steps, shift): the serving path asks per request."""
    return tuple(time_grid(num_steps, shift).tolist())


def initial_noise(seed: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """The request's starting noise [C, H, W] (see the module docstring)."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((1, *shape), generator=generator, dtype=torch.float32)[0]


def guided_velocity(
    velocity: VelocityFn,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    guided: Sequence[bool] | torch.Tensor,
    cfg_scale: torch.Tensor,
    null_class: int,
    cfg_channels: int | None | torch.Tensor = 3,
) -> torch.Tensor:
    """One forward over conditional rows plus an unconditional row per guided sample.

    x [B, C, H, W], t [B], y [B], cfg_scale [B] on the compute device; `guided` [B]
    bools on the host (a list or a CPU tensor): the caller knows which samples are
    inside their CFG interval, so the step needs no data-dependent device op (such
    as `nonzero`), which would make the host wait for the device. Returns
    [B, C, H, W]: the conditional velocity, with `uncond + s * (cond - uncond)` on
    the first `cfg_channels` channels of guided rows (all channels when None; a [B]
    integer tensor gives each row its own count, so samples of different presets
    can share one forward). When the guided samples are the first ones, their rows
    are sliced, not gathered (fewer device ops per step; the same numbers).
    """
    if isinstance(guided, torch.Tensor) and guided.device.type != "cpu":
        raise ValueError("guided must be host-side (a list or a CPU tensor), not on " + str(guided.device))
    host_idx = [i for i, g in enumerate(guided) if bool(g)]
    if not host_idx:
        return velocity(x, t, y)
    b, c, dev = x.shape[0], x.shape[1], x.device
    g = len(host_idx)
    if host_idx[-1] == g - 1:  # the guided samples come first (the serving scheduler orders them so): views
        idx = slice(0, g)
    else:
        idx = torch.tensor(host_idx, dtype=torch.long).to(dev, non_blocking=True)
    rows_x = torch.cat([x, x[idx]])
    rows_t = torch.cat([t, t[idx]])
    rows_y = torch.cat([y, torch.full((g,), null_class, dtype=y.dtype, device=y.device)])
    v = velocity(rows_x, rows_t, rows_y)
    cond, uncond = v[:b], v[b:]
    scale = cfg_scale[idx].to(cond.dtype).view(-1, 1, 1, 1)
    cond_g = cond[idx]
    mixed = uncond + scale * (cond_g - uncond)
    if cfg_channels is None:
        channels = torch.full((g,), c, device=dev)
    elif isinstance(cfg_channels, torch.Tensor):
        channels = cfg_channels.to(dev)[idx]
    else:
        channels = torch.full((g,), int(cfg_channels), device=dev)
    on = torch.arange(c, device=dev).view(1, c, 1, 1) < channels.view(-1, 1, 1, 1)
    out = cond.clone()
    out[idx] = torch.where(on, mixed, cond_g)
    return out


def preset_velocity(velocity: VelocityFn, preset: SamplerPreset, null_class: int):
    """The CFG-wrapped velocity of one preset: `fn(x, t, y, t_host)`, where `t_host` is the
    rows' common time as a host float (the interval test needs no device read)."""

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, t_host: float) -> torch.Tensor:
        if not preset.guided_at(t_host):
            return velocity(x, t, y)
        scale = torch.full_like(t, preset.cfg_scale, dtype=torch.float32)
        return guided_velocity(velocity, x, t, y, [True] * x.shape[0], scale, null_class, preset.cfg_channels)

    return fn


@torch.no_grad()
def sample(
    velocity: VelocityFn,
    noise: torch.Tensor,
    labels: torch.Tensor,
    preset: SamplerPreset,
    null_class: int,
    progress: Callable[[int, int], None] | None = None,
    trajectory: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Integrate from noise [B, C, H, W] (t = 0) to the data end (t = 1).

    `progress(step, total)` is called after every step; `trajectory`, when given,
    receives the state at every grid time (its first entry is the noise).
    """
    f = preset_velocity(velocity, preset, null_class)
    grid = time_grid(preset.num_steps, preset.timestep_shift)
    grid_host = grid.tolist()  # the same float32 values, read once
    x = noise
    if trajectory is not None:
        trajectory.append(x)
    total = len(grid) - 1
    for n in range(total):
        t0, t1 = grid[n], grid[n + 1]
        dt = (t1 - t0).to(x.device)
        k1 = f(x, t0.expand(x.shape[0]).to(x.device), labels, grid_host[n])
        if preset.method == "euler":
            x = x + dt * k1
        else:  # Heun (explicit trapezoid), torchdiffeq's "heun2" tableau
            k2 = f(x + dt * k1, t1.expand(x.shape[0]).to(x.device), labels, grid_host[n + 1])
            x = x + dt * (k1 / 2 + k2 / 2)
        if trajectory is not None:
            trajectory.append(x)
        if progress is not None:
            progress(n + 1, total)
    return x

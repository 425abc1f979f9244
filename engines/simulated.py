"""The simulated backend: an accelerator as a timing model, for measuring the server apart from the model.

Like Triton's identity backend, it runs no model. A DiT forward of R rows
occupies a simulated device for `dit_ms(R)` and a decode of N latents for
`decode_ms(N)` (engines.timing_profile). Work is queued the way a CUDA stream
queues it: `velocity()` enqueues and returns at once, and the host blocks only
at a synchronisation point: a `mark()` it waits on (the runner's step marks),
`synchronize()`, or `decode()` (which hands back images on the host). The host blocks by sleeping,
so a waiting simulated worker costs no CPU and many of them fit on one machine.

What comes back has the real shapes and dtypes: velocities float32 [R, C, H, W]
(zero: a sample keeps its initial noise, so a result depends on the seed only),
images uint8 [N, S, S, 3] on the CPU. The images are crops of real pictures (the
bundle's own sample grid, or photographs; the profile's `images`), picked by a
hash of the latent, so the PNGs cost and weigh what real ones do. S is the
profile's `image_size`, or the bundle's resolution.

It never claims to be real: `info.backend` is "simulated" (the heartbeat, the
model card and the metrics report it) and the service warns when it starts one.
"""

from __future__ import annotations

import importlib.util
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engines.base import Engine, EngineError, EngineInfo
from engines.timing_profile import TimingProfile
from model.bundle import ModelBundle

POOL_SIZE = 32  # distinct crops to pick from
SAMPLES_PNG = "samples.png"


def photo_paths() -> list[Path]:
    """The photographs scikit-learn ships (a dependency of this package)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise EngineError("images \"photos\" needs scikit-learn's sample images; scikit-learn is not installed")
    root = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "images"
    paths = [root / "china.jpg", root / "flower.jpg"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise EngineError(f"scikit-learn's sample photographs are missing: {missing}")
    return paths


def image_sources(profile: TimingProfile, bundle_root: Path) -> tuple[list[Path], str]:
    """The picture files to crop, and a description of them for the engine's detail."""
    own = profile.images_path()
    if own is not None:
        return [own], f"crops of {own.name}"
    samples = bundle_root / SAMPLES_PNG
    if profile.images == "bundle" and samples.is_file():
        return [samples], f"crops of the bundle's {SAMPLES_PNG}"
    why = "" if profile.images == "photos" else f" (the bundle has no {SAMPLES_PNG})"
    return photo_paths(), "crops of scikit-learn's sample photographs" + why


def crop_pool(paths: list[Path], size: int, count: int = POOL_SIZE, seed: int = 0) -> np.ndarray:
    """`count` size x size RGB crops at seeded positions, uint8 [count, size, size, 3]."""
    pictures = []
    for p in paths:
        img = Image.open(p).convert("RGB")
        short = min(img.size)
        if short < size:  # too small to crop from: scale it up first
            scale = size / short
            img = img.resize((math.ceil(img.width * scale), math.ceil(img.height * scale)), Image.BICUBIC)
        pictures.append(np.asarray(img))
    rng = np.random.default_rng(seed)
    pool = np.empty((count, size, size, 3), dtype=np.uint8)
    for k in range(count):
        pic = pictures[k % len(pictures)]
        top = int(rng.integers(0, pic.shape[0] - size + 1))
        left = int(rng.integers(0, pic.shape[1] - size + 1))
        pool[k] = pic[top:top + size, left:left + size]
    return pool


class SimulatedDevice:
    """When the simulated accelerator finishes what was enqueued on it (one in-order queue)."""

    def __init__(self):
        self._busy_until = 0.0
        self._lock = threading.Lock()
        self.busy_s = 0.0  # device time enqueued so far

    def enqueue(self, seconds: float) -> None:
        with self._lock:
            now = time.perf_counter()
            self._busy_until = max(now, self._busy_until) + seconds
            self.busy_s += seconds

    def wait(self, until: float | None = None) -> None:
        """Sleep until the queue is empty, or until the work enqueued before a mark is done (no CPU spent)."""
        left = (self._busy_until if until is None else until) - time.perf_counter()
        if left > 0:
            time.sleep(left)

    def mark(self) -> Callable[[], None]:
        until = self._busy_until
        return lambda: self.wait(until)


class SimulatedEngine(Engine):
    def __init__(self, bundle: ModelBundle, profile: TimingProfile, max_rows: int = 16):
        spec = bundle.spec
        self.profile = profile
        self.latent_shape = spec.latent_shape
        self.null_class = bundle.null_class
        self.max_rows = max_rows
        self.image_size = profile.image_size or spec.image_size
        paths, what = image_sources(profile, Path(spec.root))
        self.pool = torch.from_numpy(crop_pool(paths, self.image_size))
        self.device_queue = SimulatedDevice()
        self.info = EngineInfo(
            "simulated", "cpu", "simulated", max_rows,
            f"timing profile {profile.name}; no model runs; {self.image_size}x{self.image_size} images, {what}",
            decode_precision="simulated",
        )

    def warmup_rows(self) -> list[int]:
        return [1]  # nothing to build; one call checks the wiring

    def _chunks(self, n: int) -> list[int]:
        """Sizes of the calls a real backend makes for n items (max_rows at a time)."""
        full, rest = divmod(n, self.max_rows)
        return [self.max_rows] * full + ([rest] if rest else [])

    def velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if t.shape != (rows,) or y.shape != (rows,) or tuple(x.shape[1:]) != tuple(self.latent_shape):
            raise ValueError(f"velocity: x {tuple(x.shape)}, t {tuple(t.shape)}, y {tuple(y.shape)} do not match "
                             f"[R, {', '.join(map(str, self.latent_shape))}], [R], [R]")
        for n in self._chunks(rows):
            self.device_queue.enqueue(self.profile.dit_ms(n) / 1000)
        # A zero velocity without an allocation (a broadcast view; in-place writes to it raise).
        return torch.zeros((), dtype=torch.float32, device=x.device).expand(rows, *self.latent_shape)

    def mark(self) -> Callable[[], None]:
        return self.device_queue.mark()

    def pick(self, z: torch.Tensor) -> torch.Tensor:
        """Which crop each latent gets: a hash of its first values (same latent, same image)."""
        head = z.reshape(z.shape[0], -1)[:, :16].double()
        return (head.abs().sum(dim=1) * 1e4).long() % self.pool.shape[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        images, wait = self.decode_async(z)
        wait()  # the images are on the host once the device is done
        return images

    def decode_async(self, z: torch.Tensor):
        """The decode's device time is queued, and the images count as on the host once the queue passed it."""
        if tuple(z.shape[1:]) != tuple(self.latent_shape):
            raise ValueError(f"decode: latents {tuple(z.shape)} are not [N, {', '.join(map(str, self.latent_shape))}]")
        for k in self._chunks(z.shape[0]):
            self.device_queue.enqueue(self.profile.decode_ms(k) / 1000)
        return self.pool[self.pick(z.detach().cpu())], self.device_queue.mark()

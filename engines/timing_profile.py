"""A timing profile: what a DiT forward and a VAE decode cost on some accelerator, as data.

The simulated backend (`engines.simulated`) runs no model; it waits as long as a
profile says. A profile is a JSON file:

    {
      "name": "xl1-256-h200-measured",
      "source": "where the numbers come from (a measurement's command, or FLOP counts and an assumption)",
      "dit_ms": {"1": 5.27, "8": 14.96, "64": 100.58},   # ms per DiT forward, by rows
      "decode_ms": {"1": 5.96, "32": 74.61},              # ms per VAE decode call, by images
      "image_size": 256,                                  # optional: output resolution (default: the bundle's)
      "images": "photos",                                 # optional: what the images are tiles of (below)
      "model": "...", "hardware": "...", "notes": ["..."]  # optional provenance
    }

Costs between points are interpolated linearly; past the last point the last
segment is extended (a single point means a flat cost); below the first point
the first point's cost holds (a forward never gets cheaper than one row's).

`images`: "bundle" (default; the bundle's `samples.png`, or the photos when the
bundle has none), "photos" (the two photographs scikit-learn ships, china.jpg and
flower.jpg: PNG sizes and encode times like natural 256x256 images), or a path
to an image file (relative to the profile's directory).

Shipped profiles live in engines/profiles/ and may be named without the path.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from engines.base import EngineError

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
KEYS = {"name", "source", "dit_ms", "decode_ms", "image_size", "images", "model", "hardware", "notes", "derivation"}


class ProfileError(EngineError):
    """A timing profile that cannot be used (missing, malformed, or naming a bad value)."""


@dataclass(frozen=True)
class CostCurve:
    """Milliseconds by size: piecewise linear through `points`, sorted by size."""

    points: tuple[tuple[int, float], ...]

    def __call__(self, size: int) -> float:
        pts = self.points
        if size <= pts[0][0] or len(pts) == 1:  # flat below the first point; one point: flat everywhere
            return pts[0][1]
        for (n0, m0), (n1, m1) in zip(pts, pts[1:], strict=False):
            if size <= n1:
                return m0 + (m1 - m0) * (size - n0) / (n1 - n0)
        (n0, m0), (n1, m1) = pts[-2], pts[-1]
        return m1 + (m1 - m0) * (size - n1) / (n1 - n0)

    @classmethod
    def parse(cls, raw, key: str) -> CostCurve:
        if not isinstance(raw, dict) or not raw:
            raise ProfileError(f"{key}: must be a non-empty object of size -> milliseconds, e.g. {{\"1\": 9.0}}")
        points = []
        for size, ms in raw.items():
            try:
                n = int(size)
            except (TypeError, ValueError):
                raise ProfileError(f"{key}: size {size!r} is not an integer") from None
            if n < 1 or str(n) != str(size).strip():
                raise ProfileError(f"{key}: size {size!r} must be a positive integer")
            if isinstance(ms, bool) or not isinstance(ms, int | float) or not math.isfinite(ms) or ms < 0:
                raise ProfileError(f"{key}[{size}]: {ms!r} is not a finite number of milliseconds >= 0")
            points.append((n, float(ms)))
        return cls(tuple(sorted(points)))


@dataclass(frozen=True)
class TimingProfile:
    name: str
    source: str
    dit_ms: CostCurve
    decode_ms: CostCurve
    image_size: int | None = None
    images: str = "bundle"
    path: Path | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    def images_path(self) -> Path | None:
        """The image file that `images` names, or None for "bundle" / "photos"."""
        if self.images in ("bundle", "photos"):
            return None
        p = Path(self.images)
        return p if p.is_absolute() or self.path is None else self.path.parent / p

    @classmethod
    def from_dict(cls, raw: dict, path: Path | None = None) -> TimingProfile:
        where = str(path) if path else "profile"
        if not isinstance(raw, dict):
            raise ProfileError(f"{where}: a profile is a JSON object")
        unknown = sorted(set(raw) - KEYS)
        if unknown:
            raise ProfileError(f"{where}: unknown keys {unknown}; a profile has {sorted(KEYS)}")
        for key in ("dit_ms", "decode_ms"):
            if key not in raw:
                raise ProfileError(f"{where}: missing {key!r} (milliseconds by size)")
        size = raw.get("image_size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 4096):
            raise ProfileError(f"{where}: image_size must be an integer in [8, 4096], not {size!r}")
        images = raw.get("images", "bundle")
        if not isinstance(images, str) or not images:
            raise ProfileError(f"{where}: images must be \"bundle\", \"photos\" or an image path")
        profile = cls(
            name=str(raw.get("name") or (path.stem if path else "unnamed")),
            source=str(raw.get("source", "")),
            dit_ms=CostCurve.parse(raw["dit_ms"], "dit_ms"),
            decode_ms=CostCurve.parse(raw["decode_ms"], "decode_ms"),
            image_size=size,
            images=images,
            path=path,
            raw=raw,
        )
        img = profile.images_path()
        if img is not None and not img.is_file():
            raise ProfileError(f"{where}: images file {str(img)!r} does not exist")
        return profile


def shipped_profiles() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PROFILE_DIR.glob("*.json"))}


def load_profile(ref: str | Path | None) -> TimingProfile:
    """A profile by file path or by the name of a shipped one (engines/profiles/<name>.json)."""
    shipped = shipped_profiles()
    if ref is None or not str(ref).strip():
        raise ProfileError(f"backend simulated needs a timing profile (LDIT_SIMULATED_PROFILE): a JSON file or "
                           f"one of the shipped profiles {sorted(shipped)}")
    path = Path(ref)
    if not path.is_file():
        if str(ref) not in shipped:
            raise ProfileError(f"timing profile {str(ref)!r} is neither a file nor a shipped profile "
                               f"({', '.join(sorted(shipped))})")
        path = shipped[str(ref)]
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProfileError(f"{path}: not a readable JSON file ({err})") from None
    return TimingProfile.from_dict(raw, path.resolve())

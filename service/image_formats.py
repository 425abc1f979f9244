"""The image formats the API answers in, and which one a request gets (Accept with q-values).

Workers make PNGs (service/png.py) and the result cache holds them; a request that wants WebP or
JPEG gets the PNG decoded and encoded again by the API process, once per result and format: the
encoded bytes are cached beside the PNG under a key that names the format (`OutputFormat.tag`).

* `png`: the worker's PNG as it is.
* `webp`: lossless by default (it decodes to the PNG's exact pixels, about 20% fewer bytes on
  photographs); with a quality below 100 (`output_compression`) lossy WebP at that quality.
* `jpeg`: quality 90 by default, 4:4:4 (no chroma subsampling); `output_compression` sets the
  quality. Its PSNR against the PNG is in docs/benchmarks.md (bench/image_formats.py).

Depends on numpy and Pillow only.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

MEDIA_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
NAMES = tuple(MEDIA_TYPES)  # also the order of preference when the client likes several equally
ALIASES = {"jpg": "jpeg"}
# Chosen from bench/image_formats.py's table (docs/benchmarks.md): the knee of bytes against ms.
WEBP_LOSSLESS = {"lossless": True, "quality": 25, "method": 0}
WEBP_LOSSY_METHOD = 4
JPEG_QUALITY = 90
JPEG_SUBSAMPLING = 0  # 4:4:4: a class-conditional model's edges and colours stay crisp


@dataclass(frozen=True)
class OutputFormat:
    """A format and its quality (None: the format's default; for WebP that is lossless)."""

    name: str = "png"
    quality: int | None = None

    def __post_init__(self):
        if self.name not in MEDIA_TYPES:
            raise ValueError(f"unknown image format {self.name!r} ({' | '.join(NAMES)})")
        if self.quality is not None and not 0 <= self.quality <= 100:
            raise ValueError(f"quality must be 0-100, got {self.quality}")

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.name]

    @property
    def effective_quality(self) -> int | None:
        """The quality the bytes are made with: None for PNG and lossless WebP."""
        if self.name == "png":
            return None
        if self.name == "webp":
            return None if self.quality is None or self.quality >= 100 else self.quality
        return JPEG_QUALITY if self.quality is None else self.quality

    @property
    def tag(self) -> str:
        """What a cache key adds for this format: equal tags mean equal bytes ("png", "webp", "jpeg-q90")."""
        q = self.effective_quality
        return self.name if q is None else f"{self.name}-q{q}"

    @property
    def lossless(self) -> bool:
        return self.effective_quality is None


def encode(pixels: np.ndarray, fmt: OutputFormat, png_encoder=None) -> bytes:
    """The bytes of a uint8 RGB image [H, W, 3] in `fmt` (`png_encoder(pixels)` makes PNGs; Pillow's if None)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {pixels.dtype} {list(pixels.shape)}")
    if fmt.name == "png" and png_encoder is not None:
        return png_encoder(pixels)
    buf = io.BytesIO()
    image = Image.fromarray(pixels, "RGB")
    q = fmt.effective_quality
    if fmt.name == "png":
        image.save(buf, format="PNG", compress_level=1)
    elif fmt.name == "webp":
        if q is None:
            image.save(buf, format="WEBP", **WEBP_LOSSLESS)
        else:
            image.save(buf, format="WEBP", quality=q, method=WEBP_LOSSY_METHOD)
    else:
        image.save(buf, format="JPEG", quality=q, subsampling=JPEG_SUBSAMPLING, optimize=False)
    return buf.getvalue()


def decode(blob: bytes) -> np.ndarray:
    """uint8 RGB pixels [H, W, 3] of a PNG, WebP or JPEG."""
    with Image.open(io.BytesIO(blob)) as im:
        return np.asarray(im.convert("RGB"))


def transcode(png: bytes, fmt: OutputFormat) -> bytes:
    """A cached PNG in `fmt` (the PNG itself for png)."""
    if fmt.name == "png":
        return png
    return encode(decode(png), fmt)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# -- Accept ------------------------------------------------------------------------------------------

class NotAcceptable(ValueError):
    """No format we make is acceptable to the client (HTTP 406)."""


_PARAM = re.compile(r";\s*q\s*=\s*([0-9.]+)", re.IGNORECASE)


def parse_accept(header: str) -> list[tuple[str, float]]:
    """[(media range, q)] of an Accept header; ranges lower-cased, parameters other than q dropped."""
    out = []
    for part in header.split(","):
        part = part.strip()
        if not part:
            continue
        media = part.split(";", 1)[0].strip().lower()
        if "/" not in media:
            continue  # not a media range: ignored, as a lenient server does
        q = 1.0
        m = _PARAM.search(part)
        if m:
            try:
                q = min(1.0, max(0.0, float(m.group(1))))
            except ValueError:
                q = 1.0
        out.append((media, q))
    return out


def _quality_of(name: str, ranges: list[tuple[str, float]]) -> tuple[float, int]:
    """(q, specificity) the Accept ranges give format `name`: the most specific matching range wins."""
    media = MEDIA_TYPES[name]
    kind = media.split("/")[0]
    best: tuple[int, float] | None = None
    for rng, q in ranges:
        spec = 3 if rng == media else 2 if rng == f"{kind}/*" else 1 if rng == "*/*" else 0
        if spec and (best is None or spec > best[0]):
            best = (spec, q)
    return (0.0, 0) if best is None else (best[1], best[0])


def negotiate(accept: str | None, wanted: str | None = None) -> str:
    """The format to answer in.

    `wanted` (the body's `output_format`, or a job's) is used if the Accept header allows it;
    else the format the header likes most (q-values; on a tie an explicitly named type, then
    png, webp, jpeg). No header, or one that likes nothing we make: NotAcceptable, unless the
    header is absent or empty (then `wanted` or png).
    """
    if wanted is not None:
        wanted = ALIASES.get(wanted, wanted)
        if wanted not in MEDIA_TYPES:
            raise ValueError(f"unknown image format {wanted!r}")
    if accept is None or not accept.strip():
        return wanted or "png"
    ranges = parse_accept(accept)
    if not ranges:
        return wanted or "png"
    scores = {name: _quality_of(name, ranges) for name in NAMES}
    if wanted is not None:
        if scores[wanted][0] > 0:
            return wanted
        raise NotAcceptable(f"the request asks for {wanted} (output_format) but the Accept header "
                            f"({accept[:100]!r}) does not accept {MEDIA_TYPES[wanted]}")
    name = max(NAMES, key=lambda n: (scores[n][0], scores[n][1] == 3, -NAMES.index(n)))
    if scores[name][0] <= 0:
        raise NotAcceptable(f"this endpoint answers with {', '.join(MEDIA_TYPES.values())}; the Accept "
                            f"header ({accept[:100]!r}) accepts none of them")
    return name

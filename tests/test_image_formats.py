"""service/image_formats.py: WebP lossless is exact, JPEG keeps the PSNR docs/benchmarks.md states,
and Accept negotiation with q-values (the HTTP side is in tests/test_clients.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engines.simulated import crop_pool, photo_paths
from service import image_formats as fmts
from service import png

# docs/benchmarks.md ("Image formats"): the default JPEG (quality 90, 4:4:4) has a PSNR of at least
# this on every photo crop of bench/image_formats.py.
JPEG_MIN_PSNR_DB = 35.0


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return crop_pool(photo_paths(), 256, count=8)  # the benchmark's first 8 images


def test_webp_lossless_decodes_to_the_pngs_exact_pixels(photos):
    noise = np.random.default_rng(0).integers(0, 256, (40, 24, 3), dtype=np.uint8)  # odd size, no structure
    for pixels in [*photos, noise]:
        served_png = png.encode(pixels, **png.DEFAULTS)
        webp = fmts.transcode(served_png, fmts.OutputFormat("webp"))
        with Image.open(io.BytesIO(webp)) as im:
            assert im.format == "WEBP"
            decoded = np.asarray(im.convert("RGB"))
        assert np.array_equal(decoded, np.asarray(Image.open(io.BytesIO(served_png)).convert("RGB")))
        assert np.array_equal(decoded, pixels)


def test_webp_is_smaller_than_the_png_on_photos(photos):
    png_bytes = sum(len(png.encode(p, **png.DEFAULTS)) for p in photos)
    webp_bytes = sum(len(fmts.encode(p, fmts.OutputFormat("webp"))) for p in photos)
    assert webp_bytes < 0.9 * png_bytes


def test_jpeg_keeps_the_stated_psnr(photos):
    sizes = []
    for pixels in photos:
        jpeg = fmts.transcode(png.encode(pixels), fmts.OutputFormat("jpeg"))
        with Image.open(io.BytesIO(jpeg)) as im:
            assert im.format == "JPEG"
            decoded = np.asarray(im.convert("RGB"))
        assert fmts.psnr(decoded, pixels) >= JPEG_MIN_PSNR_DB
        sizes.append(len(jpeg))
    lower = fmts.encode(photos[0], fmts.OutputFormat("jpeg", 50))
    assert len(lower) < sizes[0]  # the quality is really used
    assert fmts.psnr(fmts.decode(lower), photos[0]) < fmts.psnr(fmts.decode(
        fmts.encode(photos[0], fmts.OutputFormat("jpeg"))), photos[0])


def test_lossy_webp_below_quality_100():
    fmt = fmts.OutputFormat("webp", 80)
    assert fmt.tag == "webp-q80" and not fmt.lossless
    assert fmts.OutputFormat("webp", 100).tag == "webp" and fmts.OutputFormat("webp", 100).lossless


def test_tags_name_what_makes_the_bytes():
    assert fmts.OutputFormat().tag == "png"
    assert fmts.OutputFormat("png", 40).tag == "png"  # PNG is lossless whatever the quality
    assert fmts.OutputFormat("jpeg").tag == f"jpeg-q{fmts.JPEG_QUALITY}" == fmts.OutputFormat("jpeg", 90).tag
    assert fmts.OutputFormat("jpeg", 75).tag == "jpeg-q75"
    with pytest.raises(ValueError, match="gif"):
        fmts.OutputFormat("gif")
    with pytest.raises(ValueError, match="0-100"):
        fmts.OutputFormat("jpeg", 101)


@pytest.mark.parametrize(("accept", "wanted", "expected"), [
    (None, None, "png"),
    ("", "webp", "webp"),
    ("*/*", None, "png"),
    ("image/*", None, "png"),
    ("image/webp", None, "webp"),
    ("image/jpeg, image/png;q=0.5", None, "jpeg"),
    ("image/png;q=0.5, image/webp;q=0.9, */*;q=0.1", None, "webp"),
    ("IMAGE/WEBP;Q=0.2, image/jpeg;q=0.3", None, "jpeg"),
    ("image/webp, image/*", None, "webp"),  # a named type beats a wildcard at the same q
    ("image/png, image/webp", None, "png"),  # equal and both named: png first
    ("image/*;q=0.8, image/png;q=0", None, "webp"),  # q=0 refuses png, the wildcard admits webp
    ("image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8", None, "webp"),  # a browser's <img>
    ("*/*", "jpeg", "jpeg"),
    ("image/jpeg;q=0.1, image/png", "jpeg", "jpeg"),  # the body's choice, if acceptable at all
    ("image/*", "jpg", "jpeg"),
    ("nonsense", None, "png"),  # no media range at all: as no header
])
def test_negotiate(accept, wanted, expected):
    assert fmts.negotiate(accept, wanted) == expected


@pytest.mark.parametrize(("accept", "wanted", "says"), [
    ("application/json", None, "accepts none of them"),
    ("image/avif", None, "image/png, image/webp, image/jpeg"),
    ("image/png;q=0, image/webp;q=0, image/jpeg;q=0", None, "accepts none"),
    ("image/png", "webp", "output_format"),
    ("image/*;q=1, image/jpeg;q=0", "jpeg", "does not accept image/jpeg"),
])
def test_not_acceptable(accept, wanted, says):
    with pytest.raises(fmts.NotAcceptable, match=says):
        fmts.negotiate(accept, wanted)

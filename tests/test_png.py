"""The PNG writer (service/png.py) and the one-crossing result path (service/store/scripts.py's END script)."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import redis
from PIL import Image
from pydantic import ValidationError

from engines.simulated import crop_pool, photo_paths
from service import png
from service.settings import Settings
from service.store import scripts
from service.store.jobs import GROUP, Keys
from tests.service_harness import have_redis_server, start_redis


def decoded(blob: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(blob))
    assert image.format == "PNG" and image.mode == "RGB"
    return np.asarray(image)


@pytest.mark.parametrize("compressor", sorted(png.COMPRESSORS))
@pytest.mark.parametrize("method", png.FILTERS)
def test_every_filter_and_compressor_writes_the_exact_pixels(compressor, method):
    rng = np.random.default_rng(0)
    # Odd sizes, a flat area, full-range noise and a smooth ramp: every filter's edge cases (first row/column).
    noise = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    noise[:10, :10] = 255
    ramp = np.broadcast_to(np.arange(53, dtype=np.uint8)[None, :, None] * 4, (37, 53, 3)).copy()
    for image in (noise, ramp, np.zeros((1, 1, 3), np.uint8)):
        top = {"isal": 3, "libdeflate": 12, "zlib": 9}[compressor]
        for level in (0, 1, top):
            assert np.array_equal(decoded(png.encode(image, level, method, compressor)), image)


def test_the_default_is_smaller_than_raw_on_photographs():
    photo = crop_pool(photo_paths(), 256, count=2)[1]
    blob = png.encode(photo, **{"level": png.DEFAULTS["level"], "method": png.DEFAULTS["method"],
                                "compressor": png.DEFAULTS["compressor"]})
    assert np.array_equal(decoded(blob), photo)
    assert len(blob) < 0.75 * photo.nbytes  # the filter and deflate do their job


def test_bad_images_and_settings_are_refused_clearly():
    with pytest.raises(ValueError, match="uint8"):
        png.encode(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="unknown PNG filter"):
        png.encode(np.zeros((4, 4, 3), np.uint8), method="best")
    with pytest.raises(ValidationError, match="past isal's levels 0-3"):
        Settings(png_encoder="isal", png_compress_level=6)
    assert Settings(png_encoder="libdeflate", png_compress_level=12).png_compress_level == 12
    with pytest.raises(ValidationError, match="png_filter"):
        Settings(png_filter="adaptive")


def test_a_result_crosses_redis_once_and_reaches_the_waiter_whole():
    """END stores the PNG under the result key and publishes the same bytes on the reply channel,
    so the API answers without reading it back (and a follower gets it too)."""
    if not have_redis_server():
        pytest.skip("Debian redis-server is not installed (scripts/test.sh installs it)")
    server = start_redis("debian")
    try:
        r: redis.Redis = server.client()
        keys = Keys("pngtest")
        r.xgroup_create(keys.stream, GROUP, id="0", mkstream=True)
        sid = r.xadd(keys.stream, {"id": "job1", "cost": "7"}).decode()
        r.xreadgroup(GROUP, "w", {keys.stream: ">"}, count=1)
        r.set(keys.work, 7)
        r.rpush(f"{keys.prefix}:followers:job1", "job2 reply-b")
        sub = r.pubsub()
        sub.subscribe("reply-a", "reply-b")
        for _ in range(2):
            sub.get_message(timeout=2)
        image = crop_pool(photo_paths(), 64, count=1)[0]
        blob = png.encode(image)
        meta = json.dumps({"queue_ms": 1.0, "compute_ms": 2.0, "batch_size": 3, "model_version": "v", "worker": "w"})
        status = {"status": "done", "key": "k1", "meta": meta}
        end = r.register_script(scripts.END)
        end(keys=[keys.job("job1"), keys.stream, keys.work, keys.inflight("k1"), keys.result("k1")],
            args=[sid, GROUP, 60, "job1", "reply-a", keys.prefix, scripts.as_json(status), keys.events, blob, meta])
        assert r.hget(keys.result("k1"), "png") == blob and r.hget(keys.result("k1"), "meta").decode() == meta
        assert r.xlen(keys.stream) == 0 and int(r.get(keys.work)) == 0
        assert r.hget(keys.job("job2"), "status") == b"done"
        got = {}
        deadline = time.time() + 5
        while len(got) < 2 and time.time() < deadline:
            msg = sub.get_message(timeout=1)
            if msg and msg["type"] == "message":
                got[msg["channel"].decode()] = msg["data"]
        for channel, job_id in (("reply-a", b"job1"), ("reply-b", b"job2")):
            head, status_json, body = got[channel].split(b"\n", 2)
            assert head == job_id and json.loads(status_json)["key"] == "k1"
            assert body == blob and np.array_equal(decoded(body), image)
        sub.close()
    finally:
        server.stop()

"""The service end to end: real uvicorn, real Redis servers, real PNG decoding."""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from model.bundle import load_bundle
from model.generate import generate
from tests.service_harness import have_redis_server, make_tiny_bundle, start_redis, start_service

REDIS_KINDS = [
    "embedded",
    pytest.param("debian", marks=pytest.mark.skipif(
        not have_redis_server(), reason="Debian's redis-server is not installed (scripts/test.sh installs it)")),
]


def decode_png(content: bytes) -> np.ndarray:
    assert content[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir)


def reference(bundle, classes, seeds, preset_name=None):
    preset = bundle.spec.presets[preset_name or bundle.spec.default_preset]
    return generate(bundle, list(classes), list(seeds), preset, batch_size=64)


@pytest.fixture(scope="module", params=REDIS_KINDS)
def stack(request, bundle_dir):
    """API and worker as separate processes against one Redis server."""
    server = start_redis(request.param)
    env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(bundle_dir), "LDIT_MAX_BATCH_SIZE": "32",
           "LDIT_MAX_QUEUE_DELAY_MS": "20"}
    api = start_service("api", env)
    worker = start_service("worker", env)
    yield api, worker, server, env
    worker.stop()
    api.stop()
    server.stop()


def test_generate_returns_the_offline_image(stack, bundle):
    api, *_ = stack
    r = httpx.post(f"{api.url}/generate", json={"class_label": 3, "seed": 11}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    for h in ("X-Request-Id", "X-Queue-Ms", "X-Compute-Ms", "X-Batch-Size", "X-Model-Version"):
        assert r.headers[h]
    assert r.headers["X-Seed"] == "11" and r.headers["X-Model-Version"] == bundle.spec.version()
    img = decode_png(r.content)
    assert img.shape == (bundle.spec.image_size, bundle.spec.image_size, 3)
    assert psnr(img, reference(bundle, [3], [11])[0]) >= 40
    # by class name too, and a repeat is a cache hit with the same bytes
    again = httpx.post(f"{api.url}/generate", json={"class_label": "digit-3", "seed": 11}, timeout=60)
    assert again.status_code == 200 and again.headers["X-Cache"] == "hit" and again.content == r.content


def test_32_concurrent_requests_share_batches_and_get_their_own_images(stack, bundle):
    api, *_ = stack
    seeds = list(range(100, 132))
    classes = [s % 10 for s in seeds]

    def post(i):
        return httpx.post(f"{api.url}/generate", json={"class_label": classes[i], "seed": seeds[i]}, timeout=120)

    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(post, range(32)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    assert max(int(r.headers["X-Batch-Size"]) for r in responses) > 1
    expected = reference(bundle, classes, seeds)
    for r, want in zip(responses, expected, strict=True):
        assert psnr(decode_png(r.content), want) >= 40
    assert len({r.content for r in responses}) == 32


def test_presets_and_overrides_change_the_image(stack, bundle):
    api, *_ = stack
    base = {"class_label": 5, "seed": 7}
    a = httpx.post(f"{api.url}/generate", json=base, timeout=60)
    b = httpx.post(f"{api.url}/generate", json={**base, "preset": "allchannels"}, timeout=60)
    c = httpx.post(f"{api.url}/generate", json={**base, "steps": 9, "cfg_scale": 1.0}, timeout=60)
    assert a.status_code == b.status_code == c.status_code == 200
    assert psnr(decode_png(b.content), reference(bundle, [5], [7], "allchannels")[0]) >= 40
    assert len({a.content, b.content, c.content}) == 3


BAD = [
    ({"class_label": 10, "seed": 1}, "class_label"),
    ({"class_label": -1, "seed": 1}, "class_label"),
    ({"class_label": "dgit-3", "seed": 1}, "class_label"),
    ({"class_label": 1.5, "seed": 1}, "class_label"),
    ({"class_label": True, "seed": 1}, "class_label"),
    ({"class_label": 1, "seed": -1}, "seed"),
    ({"class_label": 1, "seed": 2**63}, "seed"),
    ({"class_label": 1, "seed": " 7"}, "seed"),
    ({"class_label": 1, "seed": "²"}, "seed"),
    ({"class_label": 1, "seed": "1" * 5000}, "seed"),
    ({"class_label": "²", "seed": 1}, "class_label"),
    ({"class_label": "3" * 5000, "seed": 1}, "class_label"),
    ({"class_label": "10", "seed": 1}, "class_label"),
    ({"class_label": 1}, "seed"),
    ({"seed": 1}, "class_label"),
    ({"class_label": 1, "seed": 1, "steps": 1}, "steps"),
    ({"class_label": 1, "seed": 1, "steps": 1001}, "steps"),
    ({"class_label": 1, "seed": 1, "cfg_scale": "high"}, "cfg_scale"),
    ({"class_label": 1, "seed": 1, "cfg_interval_start": 2}, "cfg_interval_start"),
    ({"class_label": 1, "seed": 1, "preset": "nope"}, "preset"),
    ({"class_label": 1, "seed": 1, "colour": "red"}, "colour"),
    ([1, 2], "body"),
]


@pytest.mark.parametrize(("body", "field"), BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_input_gets_4xx_naming_the_field(stack, body, field):
    api, *_ = stack
    r = httpx.post(f"{api.url}/generate", json=body, timeout=10)
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["error"] == "invalid_request"
    assert field in {d["field"] for d in err["detail"]}


def test_unknown_class_name_suggests_the_closest(stack):
    api, *_ = stack
    r = httpx.post(f"{api.url}/generate", json={"class_label": "digit-33", "seed": 1}, timeout=10)
    assert r.status_code == 422
    assert "digit-3" in r.json()["detail"][0]["closest"]


def test_non_json_and_oversized_bodies(stack):
    api, *_ = stack
    r = httpx.post(f"{api.url}/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "body"
    r = httpx.post(f"{api.url}/generate", content=b"class=1", headers={"content-type": "text/plain"})
    assert r.status_code == 422
    big = json.dumps({"class_label": 1, "seed": 1, "pad": "x" * 20000})
    r = httpx.post(f"{api.url}/generate", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"

    def chunks():  # no content-length: the limit still holds while streaming
        for _ in range(40):
            yield b" " * 1000

    r = httpx.post(f"{api.url}/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_async_jobs_flow(stack, bundle):
    api, *_ = stack
    r = httpx.post(f"{api.url}/jobs", json={"class_label": 8, "seed": 4242})
    assert r.status_code == 202
    job = r.json()
    for _ in range(600):
        st = httpx.get(f"{api.url}{job['status_url']}").json()
        if st["status"] in ("done", "failed"):
            break
        time.sleep(0.05)
    assert st["status"] == "done", st
    img = httpx.get(f"{api.url}{job['image_url']}")
    assert img.status_code == 200 and psnr(decode_png(img.content), reference(bundle, [8], [4242])[0]) >= 40
    assert httpx.get(f"{api.url}/jobs/nope").status_code == 404
    assert httpx.get(f"{api.url}/jobs/nope/image").status_code == 404


def test_model_info_health_and_readiness(stack, bundle):
    api, *_ = stack
    info = httpx.get(f"{api.url}/v1/model").json()
    assert info["num_classes"] == 10 and info["class_names"][3] == "digit-3"
    assert info["resolution"] == 32 and info["default_preset"] == "quick" and "long" in info["presets"]
    assert info["version"] == bundle.spec.version()
    assert httpx.get(f"{api.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{api.url}/readyz")
    assert ready.status_code == 200 and ready.json()["workers"] >= 1


def scrape(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_move(stack):
    api, worker, server, env = stack
    before = scrape(f"{api.url}/metrics")
    seeds = range(900, 904)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda s: httpx.post(f"{api.url}/generate", json={"class_label": 1, "seed": s}, timeout=60),
                      seeds))
    httpx.post(f"{api.url}/generate", json={"class_label": 1, "seed": 900}, timeout=60)  # cache hit
    httpx.post(f"{api.url}/generate", json={"class_label": 99, "seed": 1}, timeout=60)  # 422
    after = scrape(f"{api.url}/metrics")
    key = 'ldit_inference_request_success_total{endpoint="generate"}'
    assert after[key] - before.get(key, 0) == 5
    assert after["ldit_result_cache_hits_total"] - before.get("ldit_result_cache_hits_total", 0) == 1
    assert after["ldit_inference_request_duration_seconds_count"] > before.get(
        "ldit_inference_request_duration_seconds_count", 0)
    assert "ldit_inference_pending_request_count" in after


def test_queue_full_answers_429_with_retry_after(bundle_dir):
    server = start_redis("embedded")
    env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(bundle_dir), "LDIT_MAX_QUEUE_LENGTH": "3"}
    api = start_service("api", env)  # no worker: the queue only fills
    try:
        codes = [httpx.post(f"{api.url}/jobs", json={"class_label": 1, "seed": s}).status_code for s in range(3)]
        assert codes == [202, 202, 202]
        r = httpx.post(f"{api.url}/jobs", json={"class_label": 1, "seed": 99}, timeout=10)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and r.json()["error"] == "queue_full"
        assert httpx.get(f"{api.url}/readyz").status_code == 503  # no worker heartbeat
    finally:
        api.stop()
        server.stop()


def test_hundreds_of_concurrent_requests_wait_for_a_redis_connection_not_503(bundle_dir):
    """redis-py's asyncio pool refused the 101st concurrent command ("Too many connections"), which the
    API answered with 503; requests now wait for a free connection of a bounded pool."""
    import asyncio

    server = start_redis("embedded")
    env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(bundle_dir), "LDIT_MAX_QUEUE_LENGTH": "5000"}
    api = start_service("api", env)  # no worker: /jobs only enqueues

    async def burst(n: int) -> list[int]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=api.url, limits=limits, timeout=120) as client:
            responses = await asyncio.gather(*(client.post("/jobs", json={"class_label": i % 10, "seed": i})
                                               for i in range(n)))
        return [r.status_code for r in responses]

    try:
        codes = asyncio.run(burst(400))
        assert codes.count(202) == 400, {c: codes.count(c) for c in set(codes)}
        assert server.client().xlen("ldit:jobs") == 400
    finally:
        api.stop()
        server.stop()

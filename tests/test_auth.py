"""API keys (stored hashed) and the per-key rate limit, against a running API and real Redis."""

from __future__ import annotations

import hashlib
import time

import httpx
import pytest

from service.http.auth import load_key_digests
from tests.service_harness import make_tiny_bundle, start_redis, start_service


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    bundle = make_tiny_bundle(root / "bundle")
    keys = root / "keys.txt"
    keys.write_text("# digests of accepted keys\n" + "\n".join(
        hashlib.sha256(k.encode()).hexdigest() for k in ("alpha-key", "beta-key")) + "\n")
    server = start_redis("embedded")
    env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(bundle), "LDIT_API_KEYS_FILE": str(keys),
           "LDIT_RATE_LIMIT_PER_MINUTE": "3"}
    api = start_service("api", env)
    yield api
    api.stop()
    server.stop()


def post(api, key=None, seed=1):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{api.url}/jobs", json={"class_label": 1, "seed": seed}, headers=headers)


def test_missing_or_wrong_key_is_401(secured):
    r = post(secured)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized" and r.headers["WWW-Authenticate"] == "Bearer"
    assert post(secured, "wrong-key").status_code == 401
    assert httpx.get(f"{secured.url}/jobs/x", headers={"Authorization": "Basic abc"}).status_code == 401
    assert httpx.get(f"{secured.url}/healthz").status_code == 200  # probes stay open


def test_rate_limit_is_per_key(secured):
    if time.time() % 60 > 57:  # the limit is a fixed one-minute window: don't straddle its edge
        time.sleep(60 - time.time() % 60 + 0.1)
    codes = [post(secured, "alpha-key", seed=s).status_code for s in range(4)]
    assert codes == [202, 202, 202, 429]
    limited = post(secured, "alpha-key", seed=9)
    assert limited.json()["error"] == "rate_limited" and 1 <= int(limited.headers["Retry-After"]) <= 60
    assert post(secured, "beta-key").status_code == 202  # another key has its own budget


def test_no_stack_traces_in_error_bodies(secured):
    r = httpx.post(f"{secured.url}/jobs", content=b"\xff\xfe", headers={"Authorization": "Bearer beta-key",
                                                                       "content-type": "application/json"})
    assert r.status_code in (401, 422, 429)
    assert "Traceback" not in r.text and "File \"" not in r.text


def test_key_file_validation(tmp_path):
    bad = tmp_path / "keys.txt"
    bad.write_text("plain-text-key\n")
    with pytest.raises(ValueError, match="SHA-256 hex digest"):
        load_key_digests(bad)
    bad.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no key digests"):
        load_key_digests(bad)


def test_cors_off_by_default(secured):
    r = httpx.options(f"{secured.url}/generate", headers={"Origin": "http://evil.example",
                                                          "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers

"""A checkpoint published into the model directory is picked up without failing a request."""

from __future__ import annotations

import threading
import time

import httpx

from model.bundle import load_bundle, read_spec
from tests.service_harness import make_tiny_bundle, start_redis, start_service
from tests.test_service import decode_png, psnr, reference


def test_hot_swap_under_load(tmp_path):
    live = make_tiny_bundle(tmp_path / "live", seed=0)
    old_version = read_spec(live).version()
    server = start_redis("embedded")
    env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(live), "LDIT_MODEL_WATCH_INTERVAL_S": "0.2"}
    api = start_service("api", env)
    worker = start_service("worker", env)
    codes, versions, stop = [], [], threading.Event()

    def load():
        seed = 0
        while not stop.is_set() and seed < 400:
            r = httpx.post(f"{api.url}/generate", json={"class_label": seed % 10, "seed": 5000 + seed}, timeout=60)
            codes.append(r.status_code)
            versions.append(r.headers.get("X-Model-Version"))
            seed += 1

    try:
        before = httpx.post(f"{api.url}/generate", json={"class_label": 4, "seed": 1}, timeout=60)
        assert before.headers["X-Model-Version"] == old_version
        clients = [threading.Thread(target=load) for _ in range(3)]
        for c in clients:
            c.start()
        time.sleep(1.0)
        make_tiny_bundle(live, seed=1)  # training publishes: weights first, manifest last
        new_version = read_spec(live).version()
        assert new_version != old_version
        for _ in range(300):
            if httpx.get(f"{api.url}/v1/model").json()["version"] == new_version and new_version in versions:
                break
            time.sleep(0.1)
        time.sleep(0.5)
        stop.set()
        for c in clients:
            c.join(60)
        assert codes and all(c == 200 for c in codes), codes
        assert old_version in versions and new_version in versions
        after = httpx.post(f"{api.url}/generate", json={"class_label": 4, "seed": 1}, timeout=60)
        assert after.headers["X-Model-Version"] == new_version and after.headers["X-Cache"] == "miss"
        assert psnr(decode_png(after.content), reference(load_bundle(live), [4], [1])[0]) >= 40
        assert after.content != before.content
    finally:
        stop.set()
        worker.stop()
        api.stop()
        server.stop()

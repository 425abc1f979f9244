"""Crashes, shutdowns, deadlines and poison jobs, with real processes and a real Redis."""

from __future__ import annotations

import time

import httpx
import pytest

from model.bundle import load_bundle
from service.store.jobs import GROUP, Job, Keys
from tests.service_harness import have_redis_server, make_tiny_bundle, start_redis, start_service
from tests.test_service import decode_png, psnr, reference

pytestmark = pytest.mark.skipif(not have_redis_server(), reason="Debian's redis-server is not installed")

KEYS = Keys("ldit")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle"))


def wait_jobs(api_url: str, ids: list[str], timeout: float = 180) -> dict[str, dict]:
    end, states = time.time() + timeout, {}
    while time.time() < end:
        states = {i: httpx.get(f"{api_url}/jobs/{i}").json() for i in ids}
        if all(s["status"] in ("done", "failed") for s in states.values()):
            return states
        time.sleep(0.2)
    raise AssertionError(f"jobs did not finish: {states}")


def test_sigkilled_worker_loses_no_accepted_request(bundle_dir):
    server = start_redis("debian")
    env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(bundle_dir), "LDIT_MAX_BATCH_SIZE": "8",
           "LDIT_VISIBILITY_TIMEOUT_MS": "1500", "LDIT_HEARTBEAT_INTERVAL_S": "0.3"}
    api = start_service("api", env)
    first = start_service("worker", {**env, "LDIT_WORKER_NAME": "doomed"})
    second = None
    try:
        seeds = list(range(12))
        ids = [httpx.post(f"{api.url}/jobs", json={"class_label": s % 10, "seed": s, "preset": "long"}).json()["id"]
               for s in seeds]
        r = server.client()
        for _ in range(400):  # wait until the first worker is mid-batch
            if any(r.hget(KEYS.job(i), "status") == b"running" for i in ids):
                break
            time.sleep(0.02)
        assert r.xpending(KEYS.stream, GROUP)["pending"] > 0
        first.stop("kill")
        second = start_service("worker", {**env, "LDIT_WORKER_NAME": "rescuer"})
        states = wait_jobs(api.url, ids)
        assert all(s["status"] == "done" for s in states.values()), states
        bundle = load_bundle(bundle_dir)
        expected = reference(bundle, [s % 10 for s in seeds], seeds, "long")
        for job_id, want in zip(ids, expected, strict=True):
            img = decode_png(httpx.get(f"{api.url}/jobs/{job_id}/image").content)
            assert psnr(img, want) >= 40
        assert r.xlen(KEYS.stream) == 0  # acknowledged and deleted
    finally:
        for p in (second, first, api):
            if p:
                p.stop("kill")
        server.stop()


def test_sigterm_finishes_in_flight_and_releases_the_rest(bundle_dir):
    server = start_redis("debian")
    env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(bundle_dir), "LDIT_MAX_BATCH_SIZE": "2"}
    api = start_service("api", env)
    worker = start_service("worker", env)
    try:
        ids = [httpx.post(f"{api.url}/jobs", json={"class_label": 1, "seed": s, "preset": "long"}).json()["id"]
               for s in range(6)]
        r = server.client()
        for _ in range(400):
            if any(r.hget(KEYS.job(i), "status") == b"running" for i in ids):
                break
            time.sleep(0.02)
        running = [i for i in ids if r.hget(KEYS.job(i), "status") == b"running"]
        assert running
        assert worker.stop("term", timeout=120) == 0
        for i in running:  # finished before exiting
            assert r.hget(KEYS.job(i), "status") == b"done"
        pending = r.xpending(KEYS.stream, GROUP)["pending"]
        assert pending == 0  # nothing left held by the stopped worker
        left = [i for i in ids if r.hget(KEYS.job(i), "status") != b"done"]
        assert r.xlen(KEYS.stream) == len(left)  # released back to the queue, not lost
        if left:
            worker = start_service("worker", env)
            assert all(s["status"] == "done" for s in wait_jobs(api.url, left).values())
    finally:
        worker.stop("kill")
        api.stop()
        server.stop()


def test_expired_jobs_get_a_clear_timeout_error(bundle_dir):
    server = start_redis("debian")
    env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(bundle_dir), "LDIT_REQUEST_TIMEOUT_S": "1"}
    api = start_service("api", env)
    worker = None
    try:
        job_id = httpx.post(f"{api.url}/jobs", json={"class_label": 2, "seed": 6}).json()["id"]
        time.sleep(1.2)
        worker = start_service("worker", env)
        state = wait_jobs(api.url, [job_id], timeout=30)[job_id]
        assert state["status"] == "failed" and state["error"] == "timeout"
        img = httpx.get(f"{api.url}/jobs/{job_id}/image")
        assert img.status_code == 504 and img.json()["error"] == "timeout"
    finally:
        if worker:
            worker.stop()
        api.stop()
        server.stop()


def test_poison_and_malformed_jobs_go_to_the_dead_letter_stream(bundle_dir):
    server = start_redis("debian")
    env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(bundle_dir), "LDIT_MAX_DELIVERIES": "2",
           "LDIT_VISIBILITY_TIMEOUT_MS": "300"}
    r = server.client()
    r.xgroup_create(KEYS.stream, GROUP, id="0", mkstream=True)
    spec_preset = load_bundle(bundle_dir).spec.presets["quick"]
    poison = Job(class_id=1, seed=1, preset=spec_preset, key="poison", deadline=time.time() + 600)
    r.hset(KEYS.job(poison.id), mapping={"status": "queued", "key": poison.key})
    r.xadd(KEYS.stream, poison.to_fields())
    # Two consumers take it in turn and die without acknowledging: delivered twice already.
    r.xreadgroup(GROUP, "ghost-1", {KEYS.stream: ">"}, count=1)
    time.sleep(0.35)
    r.xautoclaim(KEYS.stream, GROUP, "ghost-2", 300, count=1)
    r.xadd(KEYS.stream, {"garbage": "1"})  # malformed entry
    time.sleep(0.35)
    worker = start_service("worker", env)
    api = start_service("api", env)
    try:
        state = wait_jobs(api.url, [poison.id], timeout=30)[poison.id]
        assert state["status"] == "failed" and state["error"] == "dead_letter"
        for _ in range(100):
            if r.xlen(KEYS.dead_letters) >= 2:
                break
            time.sleep(0.1)
        dead = r.xrange(KEYS.dead_letters)
        assert len(dead) == 2
        assert any(f.get(b"id") == poison.id.encode() for _, f in dead)
        assert r.xlen(KEYS.stream) == 0
        # the worker goes on serving good jobs afterwards
        ok = httpx.post(f"{api.url}/generate", json={"class_label": 3, "seed": 3}, timeout=60)
        assert ok.status_code == 200
    finally:
        worker.stop()
        api.stop()
        server.stop()

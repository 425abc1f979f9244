"""Workers and readiness at the edges: a long pending list, a deleted stream, a stuck loop, a big keyspace,
no worker at all. A real API process and real workers (in this process, where a test must hold one
mid-step) against Debian's redis-server."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import httpx
import pytest

from model.bundle import load_bundle
from service.runtime import build_worker
from service.settings import Settings
from service.store.jobs import GROUP, Job, Keys
from tests.service_harness import have_redis_server, make_tiny_bundle, start_redis, start_service

pytestmark = pytest.mark.skipif(not have_redis_server(), reason="Debian's redis-server is not installed")

KEYS = Keys("ldit")
BEAT = {"heartbeat_interval_s": 0.2, "heartbeat_ttl_s": 1.5}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def stack(bundle_dir):
    """Redis and one API process; each test brings its own workers."""
    server = start_redis("debian")
    env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(bundle_dir), "LDIT_REQUEST_TIMEOUT_S": "20",
           "LDIT_HEARTBEAT_TTL_S": str(BEAT["heartbeat_ttl_s"])}
    api = start_service("api", env)
    yield api, server
    api.stop()
    server.stop()


@pytest.fixture
def fresh(stack):
    api, server = stack
    server.client().flushall()
    return api, server


@contextmanager
def worker_thread(server, bundle_dir, **overrides):
    """A Worker running in this process (so a test can hold its runner), stopped at the end."""
    settings = Settings(redis_url=server.url, model_dir=bundle_dir, **{"max_batch_size": 4, **BEAT, **overrides})
    worker = build_worker(settings, server.url)
    thread = threading.Thread(target=worker.run, name="test-worker", daemon=True)
    thread.start()
    ready = getattr(worker, "ready", None)
    assert ready.wait(60) if ready is not None else time.sleep(1.0) is None
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(60)


class GatedRunner:
    """The real runner, whose steps wait while the gate is closed: a worker loop stuck in a forward."""

    def __init__(self, runner):
        self.runner, self.gate, self.entered = runner, threading.Event(), threading.Event()
        self.gate.set()

    def step(self, plan):
        self.entered.set()
        self.gate.wait()
        return self.runner.step(plan)

    def decode(self, latents):
        return self.runner.decode(latents)

    def decode_async(self, latents):
        return self.runner.decode_async(latents)


def poll(fn, timeout: float, every: float = 0.1):
    end = time.time() + timeout
    while time.time() < end:
        value = fn()
        if value:
            return value
        time.sleep(every)
    return fn()


def test_generate_without_a_worker_is_503_at_once_and_jobs_still_queue(fresh):
    api, _ = fresh
    start = time.time()
    r = httpx.post(f"{api.url}/generate", json={"class_label": 1, "seed": 1}, timeout=10)
    assert r.status_code == 503, r.text
    assert time.time() - start < 5
    assert r.json()["error"] == "no_worker" and "worker" in r.json()["message"]
    assert int(r.headers["Retry-After"]) >= 1
    accepted = httpx.post(f"{api.url}/jobs", json={"class_label": 1, "seed": 2})
    assert accepted.status_code == 202 and accepted.json()["status"] == "queued"


def test_a_stuck_loop_withdraws_its_heartbeat(fresh, bundle_dir):
    api, server = fresh
    with worker_thread(server, bundle_dir) as worker:
        assert poll(lambda: httpx.get(f"{api.url}/readyz").status_code == 200, 10)
        gated = GatedRunner(worker.runner)
        worker.runner = gated
        gated.gate.clear()
        job = httpx.post(f"{api.url}/jobs", json={"class_label": 2, "seed": 3}).json()["id"]
        assert gated.entered.wait(10)
        # The heartbeat thread is alive, the loop is not: readiness must fail within the TTL (+ a beat).
        assert poll(lambda: httpx.get(f"{api.url}/readyz").status_code == 503, BEAT["heartbeat_ttl_s"] + 3)
        gated.gate.set()
        assert poll(lambda: httpx.get(f"{api.url}/readyz").status_code == 200, 10)
        assert poll(lambda: httpx.get(f"{api.url}/jobs/{job}").json()["status"] == "done", 30)


def test_worker_survives_a_deleted_stream_and_group(fresh, bundle_dir):
    api, server = fresh
    r = server.client()
    with worker_thread(server, bundle_dir, request_timeout_s=20) as worker:
        assert httpx.post(f"{api.url}/generate", json={"class_label": 1, "seed": 5}, timeout=30).status_code == 200
        r.delete(KEYS.stream)  # an idle worker is blocked in XREADGROUP: "UNBLOCKED the stream key no longer exists"
        time.sleep(0.8)
        after = httpx.post(f"{api.url}/generate", json={"class_label": 1, "seed": 6}, timeout=30)
        assert after.status_code == 200, after.text
        r.xgroup_destroy(KEYS.stream, GROUP)  # NOGROUP on the next read
        time.sleep(0.8)
        again = httpx.post(f"{api.url}/generate", json={"class_label": 1, "seed": 7}, timeout=30)
        assert again.status_code == 200, again.text
        assert worker.stop_event.is_set() is False
        assert httpx.get(f"{api.url}/readyz").status_code == 200


def test_readyz_reads_one_hash_whatever_the_keyspace(fresh, bundle_dir):
    api, server = fresh
    r = server.client()
    # 200k unrelated job keys (the old readiness SCANned them all on every probe)
    r.eval("for i = 1, 200000 do redis.call('SET', 'ldit:job:filler-' .. i, 'x') end", 0)
    with worker_thread(server, bundle_dir):
        r.config_resetstat()
        answers = [httpx.get(f"{api.url}/readyz") for _ in range(3)]
        stats = r.info("commandstats")
    assert all(a.status_code == 200 and a.json()["workers"] == 1 for a in answers), [a.text for a in answers]
    assert "cmdstat_scan" not in stats, stats.get("cmdstat_scan")
    assert stats["cmdstat_hgetall"]["calls"] >= 3


def test_reclaim_reaches_dead_jobs_behind_many_live_ones(fresh, bundle_dir):
    """XAUTOCLAIM scans at most COUNT x 10 pending entries per call: the cursor must be kept and advanced."""
    _, server = fresh
    r = server.client()
    r.xgroup_create(KEYS.stream, GROUP, id="0", mkstream=True)
    preset = load_bundle(bundle_dir).spec.presets["nocfg"]

    def add(n: int, consumer: str) -> list[Job]:
        jobs = [Job(class_id=i % 10, seed=1000 + i, preset=preset, key=f"{consumer}-{i}",
                    deadline=time.time() + 600) for i in range(n)]
        for j in jobs:
            r.hset(KEYS.job(j.id), mapping={"status": "queued", "key": j.key})
            r.xadd(KEYS.stream, j.to_fields())
        r.xreadgroup(GROUP, consumer, {KEYS.stream: ">"}, count=n)
        return jobs

    live = add(40, "alive")  # held by a live consumer that keeps them fresh
    dead = add(3, "dead")  # behind them: a consumer that died
    live_ids = [e["message_id"] for e in r.xpending_range(KEYS.stream, GROUP, "-", "+", 100, consumername="alive")]
    stop = threading.Event()

    def keep_alive():
        while not stop.is_set():
            r.xclaim(KEYS.stream, GROUP, "alive", 0, live_ids, justid=True)
            stop.wait(0.2)

    keeper = threading.Thread(target=keep_alive, daemon=True)
    keeper.start()
    try:
        time.sleep(1.2)  # the dead consumer's entries idle past the visibility timeout
        with worker_thread(server, bundle_dir, max_batch_size=2, visibility_timeout_ms=1000):
            done = poll(lambda: all(r.hget(KEYS.job(j.id), "status") == b"done" for j in dead), 20, 0.2)
        assert done, [r.hget(KEYS.job(j.id), "status") for j in dead]
        assert all(r.hget(KEYS.job(j.id), "status") == b"queued" for j in live)  # the live ones stayed put
    finally:
        stop.set()
        keeper.join(5)


class NaNRunner:
    """The real runner with a forward that overflowed: every latent it returns is NaN."""

    def __init__(self, runner):
        self.runner = runner

    def step(self, plan):
        x_next, seconds = self.runner.step(plan)
        return x_next * float("nan"), seconds

    def decode(self, latents):
        return self.runner.decode(latents)

    def decode_async(self, latents):
        return self.runner.decode_async(latents)


def test_a_non_finite_result_is_never_stored(fresh, bundle_dir):
    api, server = fresh
    r = server.client()
    body = {"class_label": 3, "seed": 9}
    with worker_thread(server, bundle_dir) as worker:
        real = worker.runner
        worker.runner = NaNRunner(real)
        bad = httpx.post(f"{api.url}/generate", json=body, timeout=30)
        assert bad.status_code == 500 and bad.json()["error"] == "non_finite", bad.text[:300]
        assert r.keys("ldit:result:*") == []  # no black image cached for an hour
        worker.runner = real
        good = httpx.post(f"{api.url}/generate", json=body, timeout=30)
        assert good.status_code == 200 and good.headers["X-Cache"] == "miss"

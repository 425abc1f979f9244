"""Admission under load: Redis connection pools, a Redis restart, work the workers cannot finish in time,
the queue limit under concurrency, and identical requests in flight. Real API processes (two replicas where
it matters), real workers, Debian's redis-server."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from service.store.capacity import FleetRate
from service.store.jobs import Keys
from tests.service_harness import have_redis_server, make_tiny_bundle, start_redis, start_service

pytestmark = pytest.mark.skipif(not have_redis_server(), reason="Debian's redis-server is not installed")

KEYS = Keys("ldit")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle"))


def burst(n: int, send) -> list[httpx.Response]:
    """n requests at once from one event loop: `send(client, i)` returns a coroutine."""

    async def run():
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return await asyncio.gather(*(send(client, i) for i in range(n)))

    return asyncio.run(run())


def wait_done(api_url: str, ids: list[str], timeout: float) -> dict[str, dict]:
    end, states = time.time() + timeout, {}
    while time.time() < end:
        states = {i: httpx.get(f"{api_url}/jobs/{i}").json() for i in ids}
        if all(s["status"] in ("done", "failed") for s in states.values()):
            break
        time.sleep(0.2)
    return states


def test_a_burst_waits_for_pooled_connections_instead_of_failing(bundle_dir):
    """200 concurrent submits and 150 cold status reads through a pool of 8 connections: no 503."""
    server = start_redis("debian")
    api = start_service("api", {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(bundle_dir),
                                "LDIT_REDIS_MAX_CONNECTIONS": "8", "LDIT_MAX_QUEUE_LENGTH": "1000"})
    try:
        submits = burst(200, lambda c, i: c.post(f"{api.url}/jobs", json={"class_label": i % 10, "seed": i}))
        assert [r.status_code for r in submits].count(202) == 200, {r.status_code: r.text for r in submits}
        ids = [r.json()["id"] for r in submits]
        api.stop()  # a cold pool: the reads open their connections all at once
        api = start_service("api", {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(bundle_dir)})
        reads = burst(150, lambda c, i: c.get(f"{api.url}/jobs/{ids[i]}"))
        assert [r.status_code for r in reads].count(200) == 150, {r.status_code: r.text for r in reads}
        clients = server.client().info("clients")["connected_clients"]
        assert clients <= 64 + 4  # the default pool bound (plus the test's own client)
    finally:
        api.stop()
        server.stop()


def test_pooled_connections_survive_a_redis_restart(bundle_dir):
    server = start_redis("debian")
    env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(bundle_dir), "LDIT_MAX_BATCH_SIZE": "8"}
    api = start_service("api", env)
    worker = start_service("worker", env)
    try:
        warm = burst(60, lambda c, i: c.get(f"{api.url}/jobs/warm-{i}"))  # fills the pool with connections
        assert {r.status_code for r in warm} == {404}
        with ThreadPoolExecutor(8) as pool:
            inflight = [pool.submit(httpx.post, f"{api.url}/generate", timeout=120,
                                    json={"class_label": s, "seed": 500 + s, "preset": "long"}) for s in range(8)]
            time.sleep(1.0)  # the eight are queued or running
            server.restart()  # same port, same append-only file; every pooled connection is now stale
            after = burst(60, lambda c, i: c.get(f"{api.url}/jobs/after-{i}"))
            ended = [f.exception() or f.result() for f in inflight]
        logs = {"api": api.lines[-15:], "worker": worker.lines[-15:]}  # a failure here names what the processes saw
        assert [r.status_code for r in after].count(404) == 60, ({r.status_code: r.text for r in after}, logs)
        assert [getattr(e, "status_code", repr(e)) for e in ended] == [200] * 8, (
            [getattr(e, "text", "")[:200] for e in ended], logs)
    finally:
        worker.stop("kill")
        api.stop()
        server.stop()


DEADLINE_S = 8.0  # LDIT_REQUEST_TIMEOUT_S of the admission test
HEADROOM = 0.8  # LDIT_ADMISSION_HEADROOM (the default)
FIT = 30  # jobs the test sizes to fit in one deadline at the measured rate


def fleet_rate(r) -> FleetRate | None:
    """The live workers' rate as the API's admission reads it from their heartbeats."""
    return FleetRate.of([json.loads(v).get("rate") for v in r.hvals(KEYS.workers)])


def wait_ended(r, ids: list[str], timeout: float) -> dict[str, dict]:
    """Each job's status fields once all have ended, read straight from Redis (no load on the API)."""
    end = time.monotonic() + timeout
    while True:
        pipe = r.pipeline(transaction=False)
        for i in ids:
            pipe.hmget(KEYS.job(i), ["status", "error"])
        states = {i: {"status": (s or b"").decode(), "error": (e or b"").decode()} for i, (s, e)
                  in zip(ids, pipe.execute(), strict=True)}
        if all(s["status"] in ("done", "failed") for s in states.values()) or time.monotonic() > end:
            return states
        time.sleep(0.25)


SIM_SLOW = {"name": "slow-device", "source": "tests/test_admission.py: a device slower than this CPU runs the tiny model",
            "dit_ms": {"1": 12.0, "4": 20.0}, "decode_ms": {"1": 5.0, "4": 8.0}}
SIM_FAST = {"name": "fast-device", "source": "tests/test_admission.py: a device faster than this CPU runs the tiny model",
            "dit_ms": {"1": 0.2, "4": 0.3}, "decode_ms": {"1": 0.2, "4": 0.3}}


@pytest.mark.parametrize("device", ["this-cpu", "slow-device", "fast-device"])
def test_admission_refuses_what_cannot_finish_before_its_deadline(bundle_dir, tmp_path, device):
    """The load is sized from the rate the worker measured and published, so the test means the same on
    any machine (this CPU, and simulated devices slower and faster than it): jobs for about twice what fits
    in a deadline arrive at once; the admission must refuse some, and at least 95% of the ones it accepts
    must finish before their deadline. (A fixed load was all accepted on a faster CPU.)"""
    server = start_redis("debian")
    env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(bundle_dir), "LDIT_MAX_BATCH_SIZE": "4",
           "LDIT_REQUEST_TIMEOUT_S": str(DEADLINE_S), "LDIT_ADMISSION_HEADROOM": str(HEADROOM),
           "LDIT_MAX_QUEUE_LENGTH": "1000"}
    if device != "this-cpu":  # a simulated accelerator (engines/simulated.py) slower or faster than this CPU
        profile = tmp_path / f"{device}.json"
        profile.write_text(json.dumps(SIM_SLOW if device == "slow-device" else SIM_FAST))
        env |= {"LDIT_BACKEND": "simulated", "LDIT_SIMULATED_PROFILE": str(profile)}
    api = start_service("api", env)
    worker = start_service("worker", env)
    r = server.client()
    try:
        # Full batches first, so the worker measures them on this (possibly busy) machine and publishes that.
        warm = burst(8, lambda c, i: c.post(f"{api.url}/generate", timeout=60, json={
            "preset": "nocfg", "steps": 50, "class_label": i, "seed": 900 + i}))
        assert [w.status_code for w in warm] == [200] * 8, [w.text[:200] for w in warm]
        time.sleep(1.5)  # a heartbeat carries the measured rate
        rate = fleet_rate(r)
        assert rate is not None and rate.rows_per_s > 0
        # Size the jobs so that about FIT of them fit in the admission's budget at that rate (nocfg: one
        # row per step), then send twice as many as fit, at once.
        budget_rows = HEADROOM * DEADLINE_S * rate.rows_per_s
        steps = int(min(1000, max(3, budget_rows / FIT + 1)))
        fit = budget_rows / (steps - 1)
        n = max(2 * FIT, int(2 * fit))
        body = {"preset": "nocfg", "steps": steps}
        answers = burst(n, lambda c, i: c.post(f"{api.url}/jobs", json={**body, "class_label": i % 10, "seed": i}))
        accepted = [a.json()["id"] for a in answers if a.status_code == 202]
        refused = [a for a in answers if a.status_code == 429]
        assert len(accepted) + len(refused) == n, {a.status_code: a.text for a in answers}
        assert all(a.json()["error"] == "over_capacity" and 1 <= int(a.headers["Retry-After"]) <= 60 for a in refused)
        states = wait_ended(r, accepted, DEADLINE_S + 10)
        late = [i for i, s in states.items() if s["status"] != "done"]
        print(f"{device}: {rate.rows_per_s:.0f} rows/s measured, {steps} steps a job, {fit:.1f} fit, {n} sent, "
              f"{len(accepted)} accepted, {len(late)} not done in time: {[states[i] for i in late][:3]}")
        # Some are refused; and the admission accepts about what the measured rate says fits (more when
        # jobs end while the burst is still arriving), not far fewer.
        assert refused and len(accepted) >= fit / 2, (len(accepted), len(refused), fit)
        assert len(late) <= len(accepted) // 20, (len(late), len(accepted))
    finally:
        worker.stop("kill")
        api.stop()
        server.stop()


def test_queue_limit_holds_under_concurrency(bundle_dir):
    server = start_redis("debian")
    env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(bundle_dir), "LDIT_MAX_QUEUE_LENGTH": "10"}
    apis = [start_service("api", env) for _ in range(2)]  # two replicas race for the last places
    try:
        answers = burst(80, lambda c, i: c.post(f"{apis[i % 2].url}/jobs", json={"class_label": 1, "seed": i}))
        codes = [r.status_code for r in answers]
        assert codes.count(202) == 10 and codes.count(429) == 70, codes
        assert server.client().xlen(KEYS.stream) == 10
    finally:
        for api in apis:
            api.stop()
        server.stop()


def test_identical_requests_in_flight_are_computed_once(bundle_dir):
    server = start_redis("debian")
    env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(bundle_dir), "LDIT_MAX_BATCH_SIZE": "8"}
    apis = [start_service("api", env) for _ in range(2)]
    worker = start_service("worker", env)
    r = server.client()
    try:
        r.config_resetstat()
        body = {"class_label": 4, "seed": 77, "preset": "long"}
        answers = burst(20, lambda c, i: c.post(f"{apis[i % 2].url}/generate", json=body))
        assert [a.status_code for a in answers] == [200] * 20, [a.text[:200] for a in answers]
        assert len({a.content for a in answers}) == 1
        assert r.info("commandstats")["cmdstat_xadd"]["calls"] == 1  # one job in the queue, 19 followers
        # asynchronous jobs coalesce too, and each keeps its own id
        body = {"class_label": 5, "seed": 78, "preset": "long"}
        jobs = burst(6, lambda c, i: c.post(f"{apis[i % 2].url}/jobs", json=body))
        ids = [j.json()["id"] for j in jobs]
        assert len(set(ids)) == 6
        states = wait_done(apis[0].url, ids, timeout=60)
        assert all(s["status"] == "done" for s in states.values()), states
        images = {httpx.get(f"{apis[1].url}/jobs/{i}/image").content for i in ids}
        assert len(images) == 1
        assert r.info("commandstats")["cmdstat_xadd"]["calls"] == 2
    finally:
        worker.stop("kill")
        for api in apis:
            api.stop()
        server.stop()


def test_the_capacity_model_in_numbers():
    from model.sampling import SamplerPreset
    from service.store.capacity import FleetRate, TickModel, admission_limits, retry_after_s, row_steps

    guided = SamplerPreset(num_steps=11, cfg_scale=4.0, cfg_interval_start=0.5)  # 10 steps, 5 of them guided
    assert row_steps(guided) == 15 and row_steps(guided, upto=5) == 5 and row_steps(SamplerPreset(num_steps=5)) == 4
    ticks = TickModel(max_rows=8)
    ticks.calibrate({1: 0.010, 8: 0.024})  # a bare forward: 8 ms + 2 ms per row
    for _ in range(200):
        ticks.observe(8, 0.048)  # live ticks at full width take twice the bare forward
    fit = ticks.published()
    assert abs(fit["a"] + 8 * fit["b"] - 0.048) < 1e-3
    rate = FleetRate.of([fit, fit])  # two such workers
    assert abs(rate.rows_per_s - 2 * 8 / 0.048) < 1 and abs(rate.full_tick_s - 0.048) < 1e-3
    limits = admission_limits(rate, steps=100, budget_s=10.0)  # own steps at full width: 4.8 s
    assert abs(limits.max_work - (10.0 - 4.8) * rate.rows_per_s) < 5 and limits.alone_fits
    assert retry_after_s(rate, limits.max_work + 2.5 * rate.rows_per_s, limits) == 3
    assert not admission_limits(rate, steps=1000, budget_s=10.0).alone_fits
    assert admission_limits(None, steps=100, budget_s=10.0) is None
    # What is published is what the worker measured at full width, once it has run full batches; narrower
    # ticks (here 3x their bare forward) scale the line only before that.
    ticks = TickModel(max_rows=8)
    ticks.calibrate({1: 0.010, 8: 0.024})
    for _ in range(100):
        ticks.observe(1, 0.030)
    assert abs(ticks.published()["a"] - 3 * 0.008) < 1e-6
    for _ in range(100):
        ticks.observe(8, 0.048)
    fit = ticks.published()
    assert abs(fit["a"] + 8 * fit["b"] - 0.048) < 1e-6
    # The averages span the last couple of seconds of ticks, not the last few ticks: one tick five times
    # slower among many moves them by its share of the time, a slower machine for a while all the way.
    ticks.observe(8, 0.240)
    assert 0.048 * 1.05 < ticks.published()["a"] + 8 * ticks.published()["b"] < 0.048 * 1.15
    for _ in range(100):
        ticks.observe(8, 0.096)
    assert abs(ticks.published()["a"] + 8 * ticks.published()["b"] - 0.096) < 0.005

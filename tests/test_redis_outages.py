"""Live progress and waiting requests across Redis outages, with real processes: a queue no worker has
read yet, a Redis that restarts with its data (append-only file), and one that comes back empty."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest

from tests.service_harness import _spawn_redis_server, have_redis_server, make_tiny_bundle, start_redis, start_service

pytestmark = pytest.mark.skipif(not have_redis_server(), reason="Debian's redis-server is not installed")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle"))


def outage(server, down_s: float, keep_data: bool = True) -> None:
    """Stop the Redis server, leave it down `down_s`, start it again on the same port: with its
    append-only file, or empty (as a Redis without persistence comes back)."""
    server.stop()
    if not keep_data:
        for path in server.workdir.iterdir():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    time.sleep(down_s)
    server.proc = _spawn_redis_server(server.port, server.workdir)


class Stream(threading.Thread):
    """Reads one SSE stream to its end in the background: (arrival, event, data) and how it ended."""

    def __init__(self, url: str, timeout: float = 60):
        super().__init__(daemon=True)
        self.url, self.timeout = url, timeout
        self.events: list[tuple[float, str, dict]] = []
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        name = None
        try:
            with httpx.stream("GET", self.url, timeout=self.timeout) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        self.events.append((time.monotonic(), name, json.loads(line[6:])))
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err

    def first(self, timeout: float) -> tuple[float, str, dict] | None:
        end = time.monotonic() + timeout
        while not self.events and self.is_alive() and time.monotonic() < end:
            time.sleep(0.02)
        return self.events[0] if self.events else None

    @property
    def kinds(self) -> list[str]:
        return [e for _, e, _ in self.events]


def test_a_queued_job_streams_before_any_worker_ran(bundle_dir):
    """Fresh Redis, no worker ever started (no consumer group): the stream says `queued` with the position
    unknown and stays open; a worker that starts later runs the job and the same stream says `done`."""
    server = start_redis("debian")
    env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(bundle_dir)}
    api = start_service("api", env)
    worker = None
    try:
        job = httpx.post(f"{api.url}/jobs", json={"class_label": 1, "seed": 1}).json()
        stream = Stream(f"{api.url}/jobs/{job['id']}/events")
        first = stream.first(timeout=10)
        assert first is not None and stream.error is None, (stream.events, repr(stream.error))
        assert first[1] == "queued" and first[2]["position"] is None and first[2]["estimated_start_s"] is None, first
        time.sleep(1.5)
        assert stream.is_alive(), (stream.events, repr(stream.error))  # still open, waiting for a worker
        worker = start_service("worker", env)
        stream.join(60)
        assert stream.error is None and stream.kinds[-1] == "done", (stream.events, repr(stream.error))
    finally:
        if worker:
            worker.stop("kill")
        api.stop()
        server.stop()


def test_streams_survive_a_redis_restart(bundle_dir):
    """Redis down 3 s (append-only file on, so every job survives): each stream, of a running job or of a
    queued one, waits, reads again and goes on to `done`; none ends as a truncated body."""
    server = start_redis("debian")
    env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(bundle_dir), "LDIT_MAX_BATCH_SIZE": "2",
           "LDIT_MAX_QUEUE_DELAY_MS": "0"}
    api = start_service("api", env)
    worker = start_service("worker", env)
    try:
        ids = [httpx.post(f"{api.url}/jobs", json={"class_label": i, "seed": 40 + i, "preset": "long",
                                                   "steps": 1000}).json()["id"] for i in range(6)]
        streams = [Stream(f"{api.url}/jobs/{i}/events", timeout=90) for i in ids]
        for s in streams:
            assert s.first(timeout=20) is not None, (s.events, repr(s.error))
        end = time.monotonic() + 20
        while "progress" not in streams[0].kinds and time.monotonic() < end:
            time.sleep(0.05)
        assert "progress" in streams[0].kinds and streams[-1].kinds == ["queued"]  # some run, some wait
        outage(server, down_s=3.0)
        for s in streams:
            s.join(90)
        for s in streams:
            assert s.error is None and not s.is_alive(), (s.kinds, repr(s.error))
            assert s.kinds[-1] == "done", s.events[-3:]
        assert {httpx.get(f"{api.url}/jobs/{i}").json()["status"] for i in ids} == {"done"}
    finally:
        worker.stop("kill")
        api.stop()
        server.stop()


def test_jobs_lost_with_an_empty_redis_fail_at_once(bundle_dir):
    """Redis comes back without its data: waiting /generate requests whose jobs are gone are answered at
    once (503 `lost`, saying why) instead of after their deadline, and a stream of a lost job ends with
    `failed` saying so. A job a worker still holds may finish (200) instead."""
    server = start_redis("debian")
    env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(bundle_dir), "LDIT_MAX_BATCH_SIZE": "1",
           "LDIT_MAX_QUEUE_DELAY_MS": "0", "LDIT_REQUEST_TIMEOUT_S": "60"}
    api = start_service("api", env)
    worker = start_service("worker", env)
    answers: dict[int, httpx.Response | BaseException] = {}

    def generate(i: int) -> None:
        try:
            answers[i] = httpx.post(f"{api.url}/generate", timeout=30,
                                    json={"class_label": i, "seed": 70 + i, "preset": "long", "steps": 1000})
        except BaseException as err:  # noqa: BLE001 - reported by the test
            answers[i] = err

    try:
        callers = [threading.Thread(target=generate, args=(i,), daemon=True) for i in range(4)]
        for c in callers:
            c.start()
        queued = httpx.post(f"{api.url}/jobs", json={"class_label": 9, "seed": 99, "preset": "long"}).json()
        stream = Stream(f"{api.url}/jobs/{queued['id']}/events", timeout=60)
        assert stream.first(timeout=20) is not None, (stream.events, repr(stream.error))
        time.sleep(1.0)  # one job running (batch of 1), the others queued behind it
        outage(server, down_s=1.0, keep_data=False)
        back = time.monotonic()
        for c in callers:
            c.join(30)
        stream.join(30)
        waited = time.monotonic() - back
        lost = [a for a in answers.values() if isinstance(a, httpx.Response) and a.status_code == 503]
        assert all(isinstance(a, httpx.Response) and a.status_code in (200, 503) for a in answers.values()), {
            i: (a.status_code, a.text[:200]) if isinstance(a, httpx.Response) else repr(a) for i, a in answers.items()}
        assert len(lost) >= 3, [a.status_code for a in answers.values()]  # at most the running one finishes
        for a in lost:
            body = a.json()
            assert body["error"] == "lost" and "Redis" in body["message"] and a.headers.get("Retry-After"), a.text
        assert waited < 10, waited  # at once, not after the 60 s deadline
        assert stream.error is None and stream.kinds[-1] == "failed", (stream.events, repr(stream.error))
        assert stream.events[-1][2]["error"] == "lost", stream.events[-1]
    finally:
        worker.stop("kill")
        api.stop()
        server.stop()

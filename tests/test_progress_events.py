"""Live progress over Server-Sent Events, read by a real HTTP client across two API replicas.

One Redis server, one worker, two API processes: jobs go in through one API and their
events are read from the other (the worker publishes through Redis, not to an API).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from tests.service_harness import have_redis_server, make_tiny_bundle, start_redis, start_service
from tests.test_service import decode_png, scrape


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    bundle = make_tiny_bundle(tmp_path_factory.mktemp("bundle"))
    server = start_redis("debian" if have_redis_server() else "embedded")
    env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(bundle), "LDIT_MAX_BATCH_SIZE": "2",
           "LDIT_MAX_QUEUE_DELAY_MS": "0"}
    a, b = start_service("api", env), start_service("api", env)
    worker = start_service("worker", env)
    yield a, b
    worker.stop()
    a.stop()
    b.stop()
    server.stop()


def read_events(url: str, timeout: float = 120) -> list[tuple[float, str, dict]]:
    """(arrival time, event, data) until the server ends the stream."""
    events, name = [], None
    with httpx.stream("GET", url, timeout=timeout) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((time.monotonic(), name, json.loads(line[6:])))
    return events


def test_progress_then_done_across_replicas(replicas):
    a, b = replicas
    # 999 steps: long enough for several progress events (at most 4 a second) however quick the
    # worker's steps are; 199 steps of the tiny model could finish between two of them.
    job = httpx.post(f"{a.url}/jobs", json={"class_label": 3, "seed": 5, "preset": "long", "steps": 1000}).json()
    events = read_events(f"{b.url}/jobs/{job['id']}/events")
    kinds = [e for _, e, _ in events]
    assert kinds[-1] == "done" and set(kinds) <= {"queued", "progress", "done"}, kinds
    steps = [d["step"] for _, e, d in events if e == "progress"]
    assert len(steps) >= 2 and steps == sorted(steps) and steps[-1] < 999
    assert all(d["steps"] == 999 and d["id"] == job["id"] for _, e, d in events if e == "progress")
    # rate-limited: progress events at most 4 a second
    times = [t for t, e, _ in events if e == "progress"]
    assert len(times) <= 4 * (times[-1] - times[0]) + 2
    done = events[-1][2]
    assert done["image_url"] == f"/jobs/{job['id']}/image" and done["compute_ms"] > 0
    img = httpx.get(b.url + done["image_url"])
    assert img.status_code == 200 and decode_png(img.content).shape == (32, 32, 3)
    # a finished job's stream says done at once and ends
    assert [e for _, e, _ in read_events(f"{a.url}/jobs/{job['id']}/events", timeout=10)] == ["done"]


def test_queued_position_counts_down(replicas):
    a, b = replicas
    ahead = [httpx.post(f"{a.url}/jobs", json={"class_label": 1, "seed": 100 + i, "preset": "long"}).json()
             for i in range(6)]
    job = httpx.post(f"{a.url}/jobs", json={"class_label": 2, "seed": 9, "preset": "long"}).json()
    events = read_events(f"{b.url}/jobs/{job['id']}/events")
    queued = [d for _, e, d in events if e == "queued"]
    assert queued and queued[0]["position"] >= 2, events[:3]
    positions = [d["position"] for d in queued]
    assert positions == sorted(positions, reverse=True)
    assert any(d["estimated_start_s"] is not None and d["estimated_start_s"] > 0 for d in queued)
    assert [e for _, e, _ in events][-1] == "done"
    for j in ahead:
        assert httpx.get(f"{a.url}/jobs/{j['id']}").json()["status"] == "done"


def test_stream_ends_when_the_client_leaves(replicas):
    a, b = replicas
    for i in range(4):
        httpx.post(f"{a.url}/jobs", json={"class_label": 4, "seed": 300 + i, "preset": "long"})
    job = httpx.post(f"{a.url}/jobs", json={"class_label": 4, "seed": 399, "preset": "long"}).json()
    gauge = "ldit_sse_streams"
    with httpx.stream("GET", f"{b.url}/jobs/{job['id']}/events", timeout=30) as r:
        lines = r.iter_lines()  # held: dropping the iterator would close the stream early
        assert next(line for line in lines if line.startswith("data: "))
        assert scrape(f"{b.url}/metrics")[gauge] == 1
    deadline = time.monotonic() + 10
    while scrape(f"{b.url}/metrics")[gauge] != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert scrape(f"{b.url}/metrics")[gauge] == 0


def test_unknown_job_events_is_404(replicas):
    a, _ = replicas
    r = httpx.get(f"{a.url}/jobs/nope/events")
    assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_done_arrives_at_once_after_the_last_progress(replicas):
    """8 streams of 100-step jobs in a row: each ends with `done` within 1 s of its last progress event
    (the stream used to sleep out its 15 s keep-alive when the job ended during its 0.2 s coalescing pause)."""
    a, b = replicas
    gaps = []
    for i in range(8):
        job = httpx.post(f"{a.url}/jobs", json={"class_label": i % 10, "seed": 800 + i, "preset": "long",
                                                "steps": 100}).json()
        opened = time.monotonic()
        events = read_events(f"{b.url}/jobs/{job['id']}/events", timeout=60)
        assert events[-1][1] == "done", events
        before = [t for t, e, _ in events[:-1]]
        gaps.append(round(events[-1][0] - max([opened, *before]), 3))
    assert max(gaps) < 1.0, gaps


def test_readme_and_openapi_agree_on_steps_and_the_progress_rate(replicas):
    """The API table and the OpenAPI text say the same: how many progress events a second (what the
    worker publishes), and that `steps` counts grid points (N points: progress `of` N - 1)."""
    from service.worker.loop import PROGRESS_INTERVAL_S

    a, _ = replicas
    rate = round(1 / PROGRESS_INTERVAL_S)
    spec = httpx.get(f"{a.url}/openapi.json").json()
    events_text = spec["paths"]["/jobs/{job_id}/events"]["get"]["responses"]["200"]["description"]
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| GET | `/jobs/{id}/events`"))
    assert re.findall(r"at most (\d+) a second", events_text) == [str(rate)], events_text
    assert re.findall(r"at most (\d+) a second", row) == [str(rate)], row
    steps_text = spec["components"]["schemas"]["GenerateRequest"]["properties"]["steps"]["description"]
    assert "N points = N-1 steps" in steps_text, steps_text
    assert "N points = N-1 steps" in readme and "`steps`" in readme.split("N points = N-1 steps")[0][-300:], \
        "the README must say what `steps` counts, in the OpenAPI's words"


def test_estimated_start_before_any_image_finished():
    """Regression (clean-clone CI run, 2026-12-04): a fresh worker has delivered no image yet, so the estimate
    was None in every `queued` event of a fast run; its calibrated speed (heartbeat `rate`) now answers."""
    from service.http.routes.events import estimated_start_s

    fresh = [{"images_per_s": 0.0, "rate": {"a": 0.01, "b": 0.001, "max_rows": 8}}]  # 8 rows per 18 ms
    older = [(b"1-0", {b"cost": b"100"}), (b"2-0", {b"cost": b"300"})]  # 200 row-steps each on average
    assert estimated_start_s(3, older, fresh) == round(3 * 200 / (8 / 0.018), 2)
    assert estimated_start_s(3, older, [{**fresh[0], "images_per_s": 2.0}]) == 1.5  # delivered speed wins
    assert estimated_start_s(3, older, []) is None  # no live worker: nothing to estimate from
    assert estimated_start_s(3, older, [{"images_per_s": 0.0}]) is None  # no calibration either

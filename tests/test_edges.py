"""Security and operations at the edges: forwarded headers, slow and idle clients, aborted uploads, whose job
is whose, and an embedded Redis that must not outlive a killed service. Real uvicorn, raw sockets."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.service_harness import make_tiny_bundle, start_service


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def guarded(bundle_dir):
    """All-in-one with a per-client rate limit, short client timeouts, a small connection cap, info logs."""
    sp = start_service("all", {"LDIT_MODEL_DIR": str(bundle_dir), "LDIT_RATE_LIMIT_PER_MINUTE": "3",
                               "LDIT_HEADER_TIMEOUT_S": "1", "LDIT_KEEP_ALIVE_TIMEOUT_S": "1",
                               "LDIT_MAX_HTTP_CONNECTIONS": "20", "LDIT_LOG_LEVEL": "info"})
    yield sp
    sp.stop()


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def connect(url: str) -> socket.socket:
    sock = socket.create_connection(host_port(url), timeout=10)
    return sock


def read_to_close(sock: socket.socket, timeout: float = 5) -> bytes:
    """Everything the server sends until it closes the connection (an answer may come in pieces)."""
    sock.settimeout(timeout)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """Whether the server closes the connection within `seconds` (sending `trickle` a byte at a time)."""
    end = time.time() + seconds
    sock.settimeout(0.25)
    while time.time() < end:
        try:
            if trickle:
                sock.sendall(trickle[:1])
                trickle = trickle[1:] or b"x"
            data = sock.recv(65536)
            if data == b"":
                return True
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


def outside_window_edge() -> None:
    if time.time() % 60 > 54:  # the rate limit is a fixed one-minute window: don't straddle its edge
        time.sleep(60 - time.time() % 60 + 0.1)


def test_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy(guarded, bundle_dir):
    outside_window_edge()
    codes = [httpx.post(f"{guarded.url}/jobs", json={"class_label": 1, "seed": i},
                        headers={"X-Forwarded-For": f"203.0.113.{i}"}).status_code for i in range(8)]
    assert codes == [202] * 3 + [429] * 5, codes
    proxied = start_service("all", {"LDIT_MODEL_DIR": str(bundle_dir), "LDIT_RATE_LIMIT_PER_MINUTE": "3",
                                    "LDIT_TRUSTED_PROXIES": "127.0.0.1"})
    try:
        outside_window_edge()
        post = lambda ip, seed: httpx.post(f"{proxied.url}/jobs", json={"class_label": 1, "seed": seed},  # noqa: E731
                                           headers={"X-Forwarded-For": ip}).status_code
        assert [post("203.0.113.7", s) for s in range(4)] == [202, 202, 202, 429]
        assert post("203.0.113.8", 10) == 202  # behind the trusted proxy, another client has its own budget
    finally:
        proxied.stop()


def test_silent_and_slow_clients_are_dropped(guarded):
    idle = connect(guarded.url)
    assert closed_within(idle, 4), "a connection that sends nothing must be closed"
    slowloris = connect(guarded.url)
    slowloris.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    assert closed_within(slowloris, 4, trickle=b"X-Slow: " + b"a" * 100), "a trickled request head must be cut off"
    kept = connect(guarded.url)
    kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200 OK" in kept.recv(65536)
    assert closed_within(kept, 4), "an idle keep-alive connection must be closed"
    body = connect(guarded.url)
    body.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: 100\r\n\r\n{\"class")
    answer = read_to_close(body)
    assert b" 408 " in answer.split(b"\r\n")[0] and b"request_timeout" in answer, answer[:300]


def test_connections_beyond_the_cap_get_503_and_are_closed(guarded):
    held = [connect(guarded.url) for _ in range(20)]
    try:
        answer = read_to_close(connect(guarded.url))
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b" 503 " in head.split(b"\r\n")[0] and b"retry-after: 1" in head.lower(), answer[:300]
        assert json.loads(body)["error"] == "overloaded"
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    assert httpx.get(f"{guarded.url}/healthz").status_code == 200  # room again once they are gone


def test_aborted_uploads_log_no_errors(guarded):
    before = len(guarded.lines)
    for _ in range(20):
        sock = connect(guarded.url)
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 1000\r\n\r\n{\"class_label\": 1")
        sock.close()
    time.sleep(1.0)
    assert httpx.get(f"{guarded.url}/healthz").status_code == 200
    lines = guarded.lines[before:]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert not [r for r in records if r["level"] in ("error", "critical")], lines[:10]
    assert not any("Traceback" in line for line in lines)
    assert sum(r["msg"] == "client went away" for r in records) <= 20


def test_jobs_belong_to_the_key_that_made_them(bundle_dir, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("\n".join(hashlib.sha256(k.encode()).hexdigest() for k in ("alpha-key", "beta-key")) + "\n")
    sp = start_service("all", {"LDIT_MODEL_DIR": str(bundle_dir), "LDIT_API_KEYS_FILE": str(keys),
                               "LDIT_PROTECT_METRICS": "true", "LDIT_PROTECT_DOCS": "true"})
    alpha, beta = ({"Authorization": f"Bearer {k}"} for k in ("alpha-key", "beta-key"))
    try:
        job = httpx.post(f"{sp.url}/jobs", json={"class_label": 2, "seed": 4}, headers=alpha).json()["id"]
        for _ in range(200):
            if httpx.get(f"{sp.url}/jobs/{job}", headers=alpha).json()["status"] == "done":
                break
            time.sleep(0.05)
        assert httpx.get(f"{sp.url}/jobs/{job}/image", headers=alpha).status_code == 200
        assert httpx.get(f"{sp.url}/jobs/{job}", headers=beta).status_code == 404
        assert httpx.get(f"{sp.url}/jobs/{job}/image", headers=beta).status_code == 404
        # the same request by another key is its own job (served from the shared cache)
        other = httpx.post(f"{sp.url}/jobs", json={"class_label": 2, "seed": 4}, headers=beta).json()
        assert other["status"] == "done" and httpx.get(f"{sp.url}/jobs/{other['id']}/image", headers=beta).status_code == 200
        assert httpx.get(f"{sp.url}/jobs/{other['id']}", headers=alpha).status_code == 404
        for path in ("/metrics", "/openapi.json", "/docs"):
            assert httpx.get(f"{sp.url}{path}").status_code == 401, path
            assert httpx.get(f"{sp.url}{path}", headers=alpha).status_code == 200, path
        assert httpx.get(f"{sp.url}/healthz").status_code == 200  # probes stay open
    finally:
        sp.stop()


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # a zombie has exited (no init here may reap it at once)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process table from /proc (Linux)")
def test_embedded_redis_dies_with_a_killed_service(bundle_dir):
    sp = start_service("all", {"LDIT_MODEL_DIR": str(bundle_dir)})
    try:
        redis_pids = [p for p in children(sp.proc.pid)
                      if b"redis-server" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(redis_pids) == 1, children(sp.proc.pid)
        title = Path(f"/proc/{redis_pids[0]}/cmdline").read_bytes().decode()  # "redis-server unixsocket:<dir>/redis.sock"
        data_dir = Path(title.split("unixsocket:")[1].split()[0].strip("\0")).parent
        assert data_dir.is_dir()
    finally:
        sp.stop("kill")
    end = time.time() + 10
    while time.time() < end and not (gone(redis_pids[0]) and not data_dir.exists()):
        time.sleep(0.1)
    assert gone(redis_pids[0]), "the embedded redis-server outlived its SIGKILLed parent"
    assert not data_dir.exists(), f"{data_dir} left behind"


BODY_DEADLINE_S = 2.0  # LDIT_BODY_TIMEOUT_S of the `door` service
CHUNKED_HEAD = (b"POST /jobs HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                b"transfer-encoding: chunked\r\n\r\n")
DRIP = b"1\r\n \r\n"  # one body byte as one chunk


@pytest.fixture(scope="module")
def door(bundle_dir):
    """An API with a cap of 100 connections, a 2 s deadline for a whole body and 5 s for a request head,
    so a body sent a byte a second is cut by the body's deadline, not by the gap between its bytes."""
    from tests.service_harness import have_redis_server, start_redis

    server = start_redis("debian" if have_redis_server() else "embedded")
    sp = start_service("api", {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(bundle_dir),
                               "LDIT_MAX_HTTP_CONNECTIONS": "100", "LDIT_HEADER_TIMEOUT_S": "5",
                               "LDIT_BODY_TIMEOUT_S": str(BODY_DEADLINE_S)})
    yield sp
    sp.stop()
    server.stop()


def drip_until_answered(sock: socket.socket, seconds: float) -> bytes:
    """Send a body byte a second until the server answers and closes (or `seconds` pass); what it sent."""
    end, got = time.monotonic() + seconds, []
    sock.settimeout(0.2)
    next_drip = 0.0
    while time.monotonic() < end:
        if time.monotonic() >= next_drip:
            try:
                sock.sendall(DRIP)
            except OSError:
                pass
            next_drip = time.monotonic() + 1.0
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not data:
            break
        got.append(data)
    return b"".join(got)


def test_a_dripping_body_gets_408_at_the_body_deadline(door):
    """A chunked body sent a byte a second: each gap is within the head timeout, the whole body is not
    within its deadline: 408 once the deadline passes (it used to hold the connection for hours)."""
    sock = connect(door.url)
    try:
        sock.sendall(CHUNKED_HEAD)
        start = time.monotonic()
        answer = drip_until_answered(sock, BODY_DEADLINE_S + 6)
        took = time.monotonic() - start
    finally:
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b" 408 " in head.split(b"\r\n")[0], answer[:300]
    err = json.loads(body)
    assert err["error"] == "request_timeout" and err["detail"][0]["field"] == "body", err
    assert took < BODY_DEADLINE_S + 1.5, took


def test_dripping_bodies_at_the_cap_keep_no_one_out_past_the_body_deadline(door):
    """100 chunked bodies dripping a byte a second fill the cap of 100; a fresh client is let in within
    the body deadline plus a second, and every dripper got its 408."""
    drippers = [connect(door.url) for _ in range(100)]
    stop = threading.Event()
    answers: dict[int, bytes] = {}

    def drip(i: int, sock: socket.socket) -> None:
        answers[i] = drip_until_answered(sock, BODY_DEADLINE_S + 8)

    try:
        for s in drippers:
            s.sendall(CHUNKED_HEAD)
        start = time.monotonic()
        threads = [threading.Thread(target=drip, args=(i, s), daemon=True) for i, s in enumerate(drippers)]
        for t in threads:
            t.start()
        let_in = None
        while let_in is None and time.monotonic() - start < BODY_DEADLINE_S + 6:
            try:
                if httpx.get(f"{door.url}/healthz", timeout=2).status_code == 200:
                    let_in = time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join(15)
    finally:
        for s in drippers:
            s.close()
    assert let_in is not None and let_in <= BODY_DEADLINE_S + 1, let_in
    timed_out = sum(b" 408 " in a.split(b"\r\n")[0] for a in answers.values())
    assert timed_out == 100, {a[:40] for a in answers.values()}


def test_the_connection_cap_answers_with_a_real_503(door):
    """Beyond the cap, a client reads a 503 with Retry-After even when its body follows its head a moment
    later (as a streamed body does): the server must read the request before closing, or the close turns
    its answer into a connection reset."""
    body = json.dumps({"class_label": 1, "seed": 1}).encode()
    held = [connect(door.url) for _ in range(100)]
    try:
        outcomes = []
        for i in range(20):
            sock = connect(door.url)
            try:
                sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n" % len(body))
                time.sleep(0.05 * (i % 2))  # half of them send the body a moment after the head
                sock.sendall(body)
                answer = read_to_close(sock)
                head, _, text = answer.partition(b"\r\n\r\n")
                outcomes.append((head.split(b" ")[1], b"retry-after: 1" in head.lower(), json.loads(text)["error"]))
            except OSError as err:
                outcomes.append(repr(err))
            finally:
                sock.close()
    finally:
        for s in held:
            s.close()
    assert outcomes == [(b"503", True, "overloaded")] * 20, outcomes

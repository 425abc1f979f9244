"""Sample sets that clean up after themselves and survive a full disk, against real processes.

One Redis server, one worker and two API processes (the second with API keys and a short
LDIT_BATCH_TTL_S) share three volumes: `default` (LDIT_BATCH_DIR), `small` (a 1 MiB tmpfs
the test fills) and `flaky` (a plain directory whose writes fail with ENOSPC once the test
says so, through a `pwrite` wrapper in the worker: sitecustomize.py below). The tmpfs needs
mount(2) (root, or CAP_SYS_ADMIN): where it cannot be mounted, only the tmpfs test skips, with
that reason, and the wrapper test still makes the worker meet ENOSPC mid-set.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from service.store.jobs import GROUP, Keys
from tests.service_harness import REPO, free_port, have_redis_server, start_redis, start_service

IMAGE_BYTES = 32 * 32 * 3  # the demo model's images
BUDGET = 10_000_000  # LDIT_BATCH_MAX_BYTES of both APIs
SHORT_TTL_S = 4  # LDIT_BATCH_TTL_S of the second API
KEYS = Keys()

PWRITE_WRAPPER = '''
# Test hook (tests/test_batch_lifecycle.py): pwrite into a file under $TEST_ENOSPC_DIR fails with
# ENOSPC once $TEST_ENOSPC_DIR/FULL exists, as on a volume that has just filled up.
import errno, os
_dir = os.path.realpath(os.environ.get("TEST_ENOSPC_DIR", "/nonexistent"))
_pwrite = os.pwrite
def _full_pwrite(fd, data, offset):
    if os.path.exists(os.path.join(_dir, "FULL")) and os.readlink(f"/proc/self/fd/{fd}").startswith(_dir + "/"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _pwrite(fd, data, offset)
os.pwrite = _full_pwrite
'''


def mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a tmpfs at `path`; None, or why it could not be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"mount failed: {err!r}"
    return None if out.returncode == 0 else f"mount -t tmpfs failed ({out.stderr.strip() or out.returncode})"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    dirs = {"default": root / "batches", "small": root / "small", "flaky": root / "flaky"}
    for d in dirs.values():
        d.mkdir()
    no_tmpfs = mount_tmpfs(dirs["small"], "1m")
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PWRITE_WRAPPER)
    keys_file = root / "keys"
    keys_file.write_text("".join(hashlib.sha256(k.encode()).hexdigest() + "\n" for k in ("alice", "bob")))
    server = start_redis("debian" if have_redis_server() else "embedded")
    env = {"LDIT_REDIS_URL": server.url, "LDIT_BATCH_DIR": str(dirs["default"]),
           "LDIT_BATCH_VOLUMES": f"small={dirs['small']},flaky={dirs['flaky']}",
           "LDIT_BATCH_MAX_BYTES": str(BUDGET), "LDIT_BATCH_SWEEP_INTERVAL_S": "0.5",
           "LDIT_VISIBILITY_TIMEOUT_MS": "1500", "LDIT_MAX_QUEUE_DELAY_MS": "0"}
    metrics_port = free_port()
    pythonpath = os.pathsep.join([str(hook), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    procs = {}
    try:
        procs["worker"] = start_service("worker", {**env, "LDIT_WORKER_NAME": "w1", "PYTHONPATH": pythonpath,
                                                   "TEST_ENOSPC_DIR": str(dirs["flaky"]),
                                                   "LDIT_METRICS_PORT": str(metrics_port)})
        procs["api"] = start_service("api", env)
        procs["keyed"] = start_service("api", {**env, "LDIT_API_KEYS_FILE": str(keys_file),
                                               "LDIT_BATCH_TTL_S": str(SHORT_TTL_S)})
        yield {"api": procs["api"].url, "keyed": procs["keyed"].url, "dirs": dirs, "no_tmpfs": no_tmpfs,
               "redis": server.client(), "worker_metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    finally:
        for p in procs.values():
            p.stop()
        server.stop()
        if no_tmpfs is None:
            subprocess.run(["umount", "-l", str(dirs["small"])], check=False)


def post_set(url: str, body: dict, headers: dict | None = None) -> dict:
    r = httpx.post(f"{url}/batches", json=body, headers=headers)
    assert r.status_code == 202, r.text
    return r.json()


def status(url: str, batch_id: str, headers: dict | None = None) -> dict:
    r = httpx.get(f"{url}/batches/{batch_id}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(check, timeout: float, what: str, interval: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"not within {timeout} s: {what}")


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def set_keys(r: redis.Redis, batch_id: str) -> list[str]:
    """Which of the set's records still exist in Redis."""
    found = [k for k in (KEYS.batch(batch_id), KEYS.batch_done(batch_id), KEYS.batch_lease(batch_id)) if r.exists(k)]
    if r.hexists(KEYS.batch_held, batch_id):
        found.append("held")
    if r.zscore(KEYS.batches, batch_id) is not None:
        found.append("zset")
    return found


def queued_entries(r: redis.Redis, batch_id: str) -> int:
    return sum(1 for _, f in r.xrange(KEYS.batch_stream) if f.get(b"batch") == batch_id.encode())


def worker_active(r: redis.Redis) -> int:
    return json.loads(r.hget(KEYS.workers, "w1"))["active"]


def test_delete_mid_set_frees_file_and_keys_and_the_worker_drops_its_samples(stack):
    api, r, root = stack["api"], stack["redis"], stack["dirs"]["default"]
    b = post_set(api, {"classes": [1, 2], "per_class": 100, "steps": 50})  # 50 steps: samples stay active
    wait_for(lambda: status(api, b["id"])["done"] >= 5, 120, "5 images of the set")
    before = httpx.get(stack["worker_metrics"]).text
    assert (root / b["id"] / "images.u8").is_file()
    wait_for(lambda: worker_active(r) > 0, 5, "a heartbeat with the set's samples active")

    gone = httpx.delete(f"{api}/batches/{b['id']}")
    assert gone.status_code == 200, gone.text
    body = gone.json()
    assert body["status"] == "deleted" and body["freed_bytes"] == 200 * IMAGE_BYTES and body["dropped_jobs"] > 0
    assert not (root / b["id"]).exists()
    assert set_keys(r, b["id"]) == []
    assert queued_entries(r, b["id"]) == 0
    # the worker drops what it held: its next plans run nothing of the set, nothing stays pending
    wait_for(lambda: worker_active(r) == 0 and r.xpending(KEYS.batch_stream, GROUP)["pending"] == 0, 10,
             "the worker's active samples and pending entries of the deleted set to go")
    after = httpx.get(stack["worker_metrics"]).text
    assert metric(after, "ldit_batch_samples_dropped_total") > metric(before, "ldit_batch_samples_dropped_total")
    written = metric(after, "ldit_batch_images_written_total")
    time.sleep(1.0)
    assert metric(httpx.get(stack["worker_metrics"]).text, "ldit_batch_images_written_total") == written
    assert not (root / b["id"]).exists() and set_keys(r, b["id"]) == []  # nothing wrote it back

    assert httpx.delete(f"{api}/batches/{b['id']}").status_code == 404
    for path in ("", "/samples.npz", "/images.tar"):
        assert httpx.get(f"{api}/batches/{b['id']}{path}").status_code == 404


def test_sets_are_owned_by_their_key_and_expire_after_the_ttl(stack):
    api, r, root = stack["keyed"], stack["redis"], stack["dirs"]["default"]
    alice, bob = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}
    b = post_set(api, {"classes": [5], "per_class": 4, "steps": 4}, alice)
    assert httpx.delete(f"{api}/batches/{b['id']}").status_code == 401
    assert httpx.get(f"{api}/batches/{b['id']}", headers=bob).status_code == 404
    assert httpx.delete(f"{api}/batches/{b['id']}", headers=bob).status_code == 404  # not bob's: untouched
    st = wait_for(lambda: (s := status(api, b["id"], alice))["status"] != "running" and s, 60, "the set to finish")
    assert (st["status"], st["done"]) == ("done", 4), st
    ttl = r.ttl(KEYS.batch(b["id"]))
    assert 0 < ttl <= SHORT_TTL_S  # counted from its completion (2 x TTL while it ran)
    assert httpx.get(f"{api}/batches/{b['id']}/samples.npz", headers=alice).status_code == 200
    assert (root / b["id"] / "images.u8").is_file()

    wait_for(lambda: not (root / b["id"]).exists(), SHORT_TTL_S + 10, "the expired set's file to be swept")
    assert httpx.get(f"{api}/batches/{b['id']}", headers=alice).status_code == 404
    wait_for(lambda: set_keys(r, b["id"]) == [], 5, "its reservation to be released")


def test_orphaned_files_are_swept_and_live_sets_and_other_files_are_not(stack):
    api, r, root = stack["api"], stack["redis"], stack["dirs"]["default"]
    orphan = root / ("b" + "0" * 23)  # as left by a crash between removing a set's records and its file
    orphan.mkdir()
    (orphan / "images.u8").write_bytes(b"\0" * 4096)
    (root / "notes.txt").write_text("not a set")
    (root / "notaset").mkdir()
    r.hset(KEYS.batch_held, "b" + "1" * 23, json.dumps({"bytes": 4096, "volume": "default"}))  # file never made
    live = post_set(api, {"classes": [0], "per_class": 30, "steps": 8})
    wait_for(lambda: not orphan.exists(), 10, "the orphaned file to be swept")
    wait_for(lambda: not r.hexists(KEYS.batch_held, "b" + "1" * 23), 5, "the stale reservation to be released")
    assert (root / "notes.txt").is_file() and (root / "notaset").is_dir()
    st = wait_for(lambda: (s := status(api, live["id"]))["status"] != "running" and s, 60, "the live set")
    assert (st["status"], st["done"]) == ("done", 30) and (root / live["id"] / "images.u8").is_file()
    assert httpx.delete(f"{api}/batches/{live['id']}").status_code == 200


def test_a_set_larger_than_the_budget_or_the_volume_is_refused_at_post(stack):
    api, r = stack["api"], stack["redis"]
    kept = post_set(api, {"classes": [7], "per_class": 10, "steps": 4})
    held = sum(json.loads(v)["bytes"] for v in r.hvals(KEYS.batch_held))
    refused = httpx.post(f"{api}/batches", json={"classes": "all", "per_class": 400})  # 12.3 MB > 10 MB
    assert refused.status_code == 507, refused.text
    err = refused.json()
    assert err["error"] == "insufficient_storage" and "LDIT_BATCH_MAX_BYTES" in err["message"]
    d = err["detail"][0]
    assert (d["field"], d["type"], d["need_bytes"], d["room_bytes"]) == (
        "per_class", "no_room_budget", 4000 * IMAGE_BYTES, BUDGET - held), err
    assert f"{BUDGET - held:,}" in err["message"]
    assert held == sum(json.loads(v)["bytes"] for v in r.hvals(KEYS.batch_held))  # nothing reserved
    text = httpx.get(f"{api}/metrics").text
    assert metric(text, "ldit_batch_bytes") == held
    assert metric(text, "ldit_batch_sets", '{state="running"}') + metric(text, "ldit_batch_sets", '{state="done"}') \
        >= 1
    if stack["no_tmpfs"] is None:  # 400 images fit in the budget but not on the 1 MiB volume
        small = httpx.post(f"{api}/batches", json={"classes": "all", "per_class": 40, "volume": "small"})
        assert small.status_code == 507 and small.json()["detail"][0]["type"] == "no_room_volume", small.text
        assert "'small' has room for" in small.json()["message"]
    bad = httpx.post(f"{api}/batches", json={"classes": "all", "per_class": 1, "volume": "nope"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "volume", bad.text
    assert httpx.delete(f"{api}/batches/{kept['id']}").status_code == 200


@pytest.mark.parametrize("volume", ["small", "flaky"])
def test_a_full_disk_fails_its_set_only(stack, volume):
    """ENOSPC mid-set: that set fails with the reason, /generate answers, a set on another volume completes."""
    if volume == "small" and stack["no_tmpfs"]:
        pytest.skip(f"no tmpfs to fill ({stack['no_tmpfs']}); the 'flaky' case covers ENOSPC with a pwrite wrapper")
    api, r, vol, root = stack["api"], stack["redis"], stack["dirs"][volume], stack["dirs"]["default"]
    before = httpx.get(stack["worker_metrics"]).text
    a = post_set(api, {"classes": "all", "per_class": 20, "steps": 8, "volume": volume})
    b = post_set(api, {"classes": [3, 4], "per_class": 30, "seed_start": 500, "steps": 4})
    wait_for(lambda: status(api, a["id"])["done"] >= 10, 120, "10 images of the set on the volume to fill")
    full = fill(vol) if volume == "small" else (vol / "FULL").touch()
    try:
        for seed in range(3):
            g = httpx.post(f"{api}/generate", json={"class_label": 6, "seed": 900 + seed, "steps": 4}, timeout=60)
            assert g.status_code == 200 and g.headers["content-type"] == "image/png", g.text
        sa = wait_for(lambda: (s := status(api, a["id"]))["status"] != "running" and s, 120, "the set to fail")
        assert sa["status"] == "failed" and sa["error"] == "disk_full", sa
        assert "No space left on device" in sa["message"] and sa["done"] < 200, sa
        assert httpx.get(f"{api}/batches/{a['id']}/samples.npz").json()["message"] == sa["message"]
        assert 0 < r.ttl(KEYS.batch(a["id"])) <= 7 * 24 * 3600  # it expires from its failure
        sb = wait_for(lambda: (s := status(api, b["id"]))["status"] != "running" and s, 120, "the other set")
        assert (sb["status"], sb["done"], sb["failed"]) == ("done", 60, 0), sb
        z = httpx.get(f"{api}/batches/{b['id']}/samples.npz", timeout=60)
        with np.load(io.BytesIO(z.content)) as npz:
            assert len({img.tobytes() for img in npz["arr_0"]}) == 60  # every image there, none blank
        after = httpx.get(stack["worker_metrics"]).text
        errors = '{reason="disk_full"}'
        assert metric(after, "ldit_batch_write_errors_total", errors) > metric(before, "ldit_batch_write_errors_total",
                                                                                errors)
        wait_for(lambda: r.xpending(KEYS.batch_stream, GROUP)["pending"] == 0 and queued_entries(r, a["id"]) == 0,
                 10, "the stopped set's jobs to be dropped")
    finally:
        (full or vol / "FULL").unlink(missing_ok=True)
    for batch_id in (a["id"], b["id"]):
        assert httpx.delete(f"{api}/batches/{batch_id}").status_code == 200
        assert not (stack["dirs"][volume] / batch_id).exists() and not (root / batch_id).exists()


def fill(volume: Path) -> Path:
    """Take every free byte of the volume with a ballast file."""
    ballast = volume / "ballast"
    with open(ballast, "wb", buffering=0) as f:
        try:
            while f.write(b"\xff" * 4096):
                pass
        except OSError:  # ENOSPC: full
            pass
    st = os.statvfs(volume)
    assert st.f_bavail == 0, "the tmpfs still has room"
    return ballast


def test_a_failed_set_reserves_no_bytes(stack):
    """A set stopped by a full disk holds nothing once it has failed: with the disk freed, a set that needs
    the failed set's bytes of the budget is accepted (it was refused with 507 for the whole TTL)."""
    api, r, vol = stack["api"], stack["redis"], stack["dirs"]["flaky"]
    a = post_set(api, {"classes": "all", "per_class": 20, "steps": 8, "volume": "flaky"})
    wait_for(lambda: status(api, a["id"])["done"] >= 5, 120, "5 images of the set")
    (vol / "FULL").touch()
    try:
        sa = wait_for(lambda: (s := status(api, a["id"]))["status"] != "running" and s, 120, "the set to fail")
        assert sa["status"] == "failed" and sa["error"] == "disk_full", sa
    finally:
        (vol / "FULL").unlink()
    others = sum(json.loads(v)["bytes"] for k, v in r.hgetall(KEYS.batch_held).items() if k.decode() != a["id"])
    per_class = (BUDGET - others) // IMAGE_BYTES  # fits beside the running and finished sets, not beside `a`
    assert (per_class + 1) * IMAGE_BYTES + others > BUDGET - 200 * IMAGE_BYTES
    b = httpx.post(f"{api}/batches", json={"classes": [0], "per_class": per_class, "steps": 2})
    assert b.status_code == 202, b.text
    assert status(api, a["id"])["error"] == "disk_full"  # the failed set's record stays, with its reason
    for batch_id in (a["id"], b.json()["id"]):
        assert httpx.delete(f"{api}/batches/{batch_id}").status_code == 200


def test_a_set_past_its_ttl_fails_with_timeout(stack):
    """A set that cannot finish within LDIT_BATCH_TTL_S fails saying `timeout`, with a message (both were
    null)."""
    api, alice = stack["keyed"], {"Authorization": "Bearer alice"}
    b = post_set(api, {"classes": [2], "per_class": 24, "steps": 1000}, alice)
    st = wait_for(lambda: (s := status(api, b["id"], alice))["status"] != "running" and s, SHORT_TTL_S + 60,
                  "the set to time out")
    assert st["status"] == "failed" and st["failed"] > 0, st
    assert st["error"] == "timeout" and "LDIT_BATCH_TTL_S" in st["message"], st
    assert httpx.delete(f"{api}/batches/{b['id']}", headers=alice).status_code == 200


def test_a_small_set_reports_a_sensible_rate(stack):
    """Six images that share their batches: images/s is the set's images over the time it ran, not over the
    milliseconds between its first and last image (1721 images/s for a set of six that took a second)."""
    api = stack["api"]
    posted = time.time()
    b = post_set(api, {"classes": [1, 2], "per_class": 3, "steps": 200})
    last_running = None
    while (st := status(api, b["id"]))["status"] == "running":
        last_running = time.time()
        time.sleep(0.02)
    ended = time.time()
    assert st["status"] == "done" and st["done"] == 6, st
    assert last_running is not None and last_running - posted > 0.2, "the set must run long enough to be timed"
    rate = st["images_per_s"]
    assert rate is not None and 6 / (ended - posted) <= rate <= 1.5 * 6 / (last_running - posted), (
        rate, ended - posted, last_running - posted)
    assert st["eta_s"] == 0.0
    assert httpx.delete(f"{api}/batches/{b['id']}").status_code == 200

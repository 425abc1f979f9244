"""Sample sets (POST /batches) against real processes and a real Redis server.

The shipped demo model at 4 grid points (3 steps), so 200 images take seconds: the set is
read back from the .npz with numpy and compared with the same images requested one by
one; a worker is killed (SIGKILL) and the API restarted mid-set, and the set still finishes
with every image counted once.
"""

from __future__ import annotations

import asyncio
import io
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis

from model.bundle import load_bundle
from model.generate import generate, main
from service.batches import sets as batches
from service.settings import DEMO_MODEL_DIR
from service.store.jobs import Keys
from tests.service_harness import have_redis_server, start_redis, start_service
from tests.test_service import decode_png

STEPS = 4  # grid points: 3 Euler steps, enough to make distinct digits
PER_CLASS = 20  # x 10 classes = 200 images


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    server = start_redis("debian" if have_redis_server() else "embedded")
    env = {"LDIT_REDIS_URL": server.url, "LDIT_BATCH_DIR": str(tmp_path_factory.mktemp("batches")),
           "LDIT_VISIBILITY_TIMEOUT_MS": "1500", "LDIT_MAX_QUEUE_DELAY_MS": "0"}
    procs = {"api": start_service("api", env), "worker": start_service("worker", {**env, "LDIT_WORKER_NAME": "w1"})}
    yield procs, env, server
    for p in procs.values():
        p.stop()
    server.stop()


def wait_done(url: str, batch_id: str, timeout: float = 240) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = httpx.get(f"{url}/batches/{batch_id}").json()
        if st["status"] != "running":
            return st
        time.sleep(0.2)
    raise AssertionError(f"set {batch_id} still running: {st}")


def test_sample_set_survives_a_killed_worker_and_an_api_restart(cluster):
    procs, env, server = cluster
    api = procs["api"]
    r = httpx.post(f"{api.url}/batches", json={"classes": "all", "per_class": PER_CLASS, "seed_start": 1000,
                                               "steps": STEPS})
    assert r.status_code == 202, r.text
    b = r.json()
    assert b["total"] == 10 * PER_CLASS and b["samples_url"].endswith("/samples.npz")
    assert httpx.get(f"{api.url}{b['samples_url']}").status_code == 409  # not finished yet

    # kill the only worker once it has done part of the set; kill the API too
    while (st := httpx.get(f"{api.url}{b['status_url']}").json())["done"] < 20:
        time.sleep(0.05)
    assert st["status"] == "running" and st["done"] < st["total"], st
    procs["worker"].stop("kill")
    procs["api"].stop("kill")
    # a set the dead API never got to append (its jobs go in when the next API starts)
    orphan = asyncio.run(half_made_set(server.url, env["LDIT_BATCH_DIR"]))

    procs["worker"] = start_service("worker", {**env, "LDIT_WORKER_NAME": "w2"})
    procs["api"] = api = start_service("api", env)
    st = wait_done(api.url, b["id"])
    assert (st["status"], st["done"], st["failed"], st["enqueued"]) == ("done", 200, 0, 200), st
    assert st["images_per_s"] > 0 and st["eta_s"] == 0.0
    other = wait_done(api.url, orphan)
    assert (other["status"], other["done"]) == ("done", 20), other

    # the .npz, read with numpy
    z = httpx.get(f"{api.url}{b['samples_url']}", timeout=60)
    assert z.status_code == 200 and z.headers["content-type"] == "application/octet-stream"
    with np.load(io.BytesIO(z.content)) as npz:
        arr, labels = npz["arr_0"], npz["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (200, 32, 32, 3)
    assert labels.tolist() == [c for c in range(10) for _ in range(PER_CLASS)]
    assert len({a.tobytes() for a in arr}) == 200  # every image made, none left blank

    # the same images requested one by one (none is in the result cache: the set bypasses it)
    def single(i):
        body = {"class_label": i // PER_CLASS, "seed": 1000 + i % PER_CLASS, "steps": STEPS}
        resp = httpx.post(f"{api.url}/generate", json=body, timeout=120)
        assert resp.status_code == 200 and resp.headers["X-Cache"] == "miss", resp.text
        return decode_png(resp.content)

    with ThreadPoolExecutor(16) as pool:
        singles = np.stack(list(pool.map(single, range(200))))
    diff = np.abs(singles.astype(int) - arr.astype(int))
    same = sum(int(d.max() == 0) for d in diff)
    print(f"max |pixel difference| {diff.max()}, identical images {same}/200")
    assert diff.max() <= 1 and same >= 190  # equal up to float rounding of different batch shapes

    # the PNGs, named by class and seed, equal to the .npz
    t = httpx.get(f"{api.url}{b['images_url']}", timeout=60)
    assert t.status_code == 200 and t.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(t.content)) as tar:
        names = tar.getnames()
        assert names[:2] == ["class0_seed1000.png", "class0_seed1001.png"] and len(names) == 200
        assert names[-1] == f"class9_seed{1000 + PER_CLASS - 1}.png"
        for i in (0, 57, 199):
            assert np.array_equal(decode_png(tar.extractfile(names[i]).read()), arr[i])


async def half_made_set(redis_url: str, batch_dir: str) -> str:
    """A set recorded by an API that died before appending any of its jobs."""
    r = aioredis.Redis.from_url(redis_url)
    spec = load_bundle(DEMO_MODEL_DIR).spec
    b = batches.BatchSpec(id=batches.new_batch_id(), classes=[3, 4], per_class=10, seed_start=0, preset_name="digits",
                          preset=spec.presets["digits"].replace(num_steps=STEPS), shape=(32, 32, 3),
                          model_version=spec.version(), created_at=time.time())
    await batches.create(r, Keys(), b, batch_dir, 3600)
    await r.aclose()
    return b.id


def test_interactive_requests_run_ahead_of_a_set(cluster):
    procs, *_ = cluster
    api = procs["api"]
    b = httpx.post(f"{api.url}/batches", json={"classes": [1, 2], "per_class": 40, "steps": 12}).json()
    while httpx.get(f"{api.url}{b['status_url']}").json()["done"] < 5:
        time.sleep(0.05)
    for seed in range(3):
        r = httpx.post(f"{api.url}/generate", json={"class_label": 5, "seed": 70 + seed, "steps": 8}, timeout=60)
        # it shared no forward with the set's samples: they wait while it runs
        assert r.status_code == 200 and r.headers["X-Batch-Size"] == "1", dict(r.headers)
    st = httpx.get(f"{api.url}{b['status_url']}").json()
    assert st["status"] == "running" and 0 < st["done"] < 80  # the set was under way all along
    assert wait_done(api.url, b["id"])["status"] == "done"


@pytest.mark.parametrize(("body", "field"), [
    ({"classes": ["nope"], "per_class": 1}, "classes"),
    ({"classes": [], "per_class": 1}, "classes"),
    ({"classes": "some", "per_class": 1}, "classes"),
    ({"classes": "all", "per_class": 0}, "per_class"),
    ({"classes": "all", "per_class": 20000}, "per_class"),  # 200,000 images > LDIT_MAX_BATCH_IMAGES
    ({"classes": "all", "per_class": 1, "seed_start": -1}, "seed_start"),
    ({"classes": "all", "per_class": 2, "seed_start": 2**63 - 1}, "seed_start"),
    ({"classes": "all", "per_class": 1, "preset": "nope"}, "preset"),
])
def test_bad_sets_are_refused_naming_the_field(cluster, body, field):
    procs, *_ = cluster
    r = httpx.post(f"{procs['api'].url}/batches", json=body)
    assert r.status_code == 422, r.text
    assert field in {d["field"] for d in r.json()["detail"]}


def test_unknown_set_is_404(cluster):
    procs, *_ = cluster
    for path in ("", "/samples.npz", "/images.tar"):
        assert httpx.get(f"{procs['api'].url}/batches/nope{path}").status_code == 404


def test_offline_npz_matches_the_sampler(tmp_path):
    out = tmp_path / "set.npz"
    assert main(["--classes", "2,7", "--per-class", "3", "--seed-start", "5", "--steps", str(STEPS),
                 "--npz", str(out)]) == 0
    with np.load(out) as npz:
        arr, labels = npz["arr_0"], npz["arr_1"]
    assert labels.tolist() == [2, 2, 2, 7, 7, 7]
    bundle = load_bundle(DEMO_MODEL_DIR)
    want = generate(bundle, labels.tolist(), [5, 6, 7] * 2, bundle.spec.presets["digits"].replace(num_steps=STEPS))
    assert np.abs(arr.astype(int) - want.astype(int)).max() <= 1
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.u8"))

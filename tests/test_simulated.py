"""The simulated backend: timing profiles, the engine's shapes, waits and images, and the whole service on it."""

from __future__ import annotations

import io
import json
import re
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from engines import EngineError, load_engine
from engines.simulated import SimulatedEngine, crop_pool
from engines.timing_profile import CostCurve, ProfileError, TimingProfile, load_profile, shipped_profiles
from loadtest.chaos import simulated_references
from model.bundle import load_bundle
from service.settings import DEMO_MODEL_DIR, REPO_ROOT, Settings
from service.store.jobs import Job, Keys
from service.worker.runner import Runner
from service.worker.scheduler import Scheduler
from tests.service_harness import have_redis_server, start_redis, start_service

SHIPPED = sorted(shipped_profiles())


def profile(**over) -> TimingProfile:
    raw = {"name": "t", "source": "test", "dit_ms": {"1": 9.0, "32": 10.5, "64": 19.0}, "decode_ms": {"1": 2.0},
           **over}
    return TimingProfile.from_dict(raw)


@pytest.fixture(scope="module")
def demo():
    return load_bundle(DEMO_MODEL_DIR)


# -- profiles --------------------------------------------------------------------------------------
def test_cost_curve_interpolates_and_extends_linearly():
    curve = profile().dit_ms  # the example: {"1": 9.0, "32": 10.5, "64": 19.0}
    assert curve(1) == 9.0 and curve(32) == 10.5 and curve(64) == 19.0
    assert curve(16) == pytest.approx(9.0 + 1.5 * 15 / 31)
    assert curve(48) == pytest.approx(14.75)
    assert curve(128) == pytest.approx(19.0 + 8.5 * 2)  # the last segment, extended
    flat = CostCurve.parse({"8": 4.0}, "decode_ms")
    assert flat(1) == flat(8) == flat(100) == 4.0  # one point: flat; below the first point: flat
    assert CostCurve.parse({"4": 2.0, "8": 6.0}, "x")(2) == 2.0


@pytest.mark.parametrize(("raw", "message"), [
    ({"decode_ms": {"1": 1}}, "missing 'dit_ms'"),
    ({"dit_ms": {"1": 1}, "decode_ms": {"0": 1}}, "positive integer"),
    ({"dit_ms": {"one": 1}, "decode_ms": {"1": 1}}, "not an integer"),
    ({"dit_ms": {"1": -1}, "decode_ms": {"1": 1}}, "dit_ms[1]"),
    ({"dit_ms": {"1": "fast"}, "decode_ms": {"1": 1}}, "dit_ms[1]"),
    ({"dit_ms": {}, "decode_ms": {"1": 1}}, "non-empty"),
    ({"dit_ms": {"1": 1}, "decode_ms": {"1": 1}, "decoder_ms": {"1": 1}}, "unknown keys ['decoder_ms']"),
    ({"dit_ms": {"1": 1}, "decode_ms": {"1": 1}, "image_size": 3}, "image_size"),
    ({"dit_ms": {"1": 1}, "decode_ms": {"1": 1}, "images": "/nonexistent/pic.png"}, "does not exist"),
])
def test_bad_profiles_are_refused_naming_the_key(raw, message):
    with pytest.raises(ProfileError, match=re.escape(message)):
        TimingProfile.from_dict(raw)


def test_profile_references(tmp_path):
    with pytest.raises(ProfileError, match="needs a timing profile"):
        load_profile(None)
    with pytest.raises(ProfileError, match="xl1-256-h200-measured"):  # the error lists the shipped ones
        load_profile("no-such-profile")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="not a readable JSON"):
        load_profile(bad)
    good = tmp_path / "mine.json"
    good.write_text(json.dumps({"dit_ms": {"1": 1.5}, "decode_ms": {"1": 1.0}}))
    assert load_profile(str(good)).name == "mine"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_say_where_their_numbers_come_from(name):
    p = load_profile(name)
    assert p.name == name and p.image_size == 256
    assert len(p.source) > 40 and ("measured" in p.source or "FLOP" in p.source)
    sizes = [n for n, _ in p.dit_ms.points]
    assert min(sizes) == 1 and max(sizes) >= 64
    assert all(a[1] <= b[1] for a, b in zip(p.dit_ms.points, p.dit_ms.points[1:], strict=False))


def test_measured_profile_is_the_h200_table_in_the_docs():
    """The shipped curve and docs/benchmarks.md's H200 table are the same numbers."""
    p = load_profile("xl1-256-h200-measured")
    assert "measured by scripts/gpu_check.sh on an NVIDIA H200, 2026-11-30" in p.source
    doc = (REPO_ROOT / "docs" / "benchmarks.md").read_text()

    def row(label):
        cells = re.search(rf"^\| {label} \|(.+)\|$", doc, re.M).group(1).split("|")
        return [float(c) for c in cells]

    rows, dit, images, dec = row("rows"), row("DiT ms"), row("images"), row("decoder ms")
    assert [(int(r), m) for r, m in zip(rows, dit, strict=True)] == list(p.dit_ms.points)
    assert [(int(n), m) for n, m in zip(images, dec, strict=True)] == list(p.decode_ms.points)


# -- the engine ------------------------------------------------------------------------------------
def test_shapes_dtypes_and_images(demo):
    eng = SimulatedEngine(demo, profile(), max_rows=8)
    c, h, w = demo.spec.latent_shape
    v = eng.velocity(torch.randn(5, c, h, w), torch.rand(5), torch.zeros(5, dtype=torch.long))
    assert v.shape == (5, c, h, w) and v.dtype == torch.float32 and not v.any()
    with pytest.raises(RuntimeError):  # a broadcast view: nobody can write into it by accident
        v.add_(1)
    z = torch.randn(3, c, h, w)
    images = eng.decode(z)
    size = demo.spec.image_size
    assert images.shape == (3, size, size, 3) and images.dtype == torch.uint8 and images.device.type == "cpu"
    assert torch.equal(eng.decode(z), images)  # same latent, same image
    assert eng.info.backend == "simulated" and "timing profile t" in eng.info.detail
    with pytest.raises(ValueError, match="do not match"):
        eng.velocity(torch.randn(2, c + 1, h, w), torch.rand(2), torch.zeros(2, dtype=torch.long))


def test_images_are_crops_of_the_bundle_samples_or_photos(demo):
    sheet = np.asarray(Image.open(DEMO_MODEL_DIR / "samples.png").convert("RGB"))
    pool = crop_pool([DEMO_MODEL_DIR / "samples.png"], 64, count=4, seed=3)
    for crop in pool:  # each crop is a window of the sample sheet
        hits = np.argwhere((sheet[:-63, :-63] == crop[0, 0]).all(axis=-1))
        assert any(np.array_equal(sheet[y:y + 64, x:x + 64], crop) for y, x in hits)
    eng = SimulatedEngine(demo, profile(image_size=256, images="photos"), max_rows=8)
    z = torch.randn(16, *demo.spec.latent_shape)
    images = eng.decode(z).numpy()
    assert images.shape == (16, 256, 256, 3)
    assert len({im.tobytes() for im in images}) >= 8  # different latents mostly get different crops
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, format="PNG", compress_level=6)
    assert buf.tell() > 40_000  # a photograph: a PNG as heavy as a real 256x256 image, not a flat tile


def test_work_queues_like_a_stream_and_waiting_costs_no_cpu(demo):
    """velocity() enqueues dit_ms(rows) (per max_rows chunk) and returns; synchronize() sleeps it off."""
    eng = SimulatedEngine(demo, profile(dit_ms={"1": 100.0, "8": 150.0}, decode_ms={"1": 50.0, "8": 100.0}),
                          max_rows=8)
    c, h, w = demo.spec.latent_shape
    start, cpu0 = time.perf_counter(), time.thread_time()
    eng.velocity(torch.zeros(11, c, h, w), torch.rand(11), torch.zeros(11, dtype=torch.long))
    assert eng.device_queue.busy_s == pytest.approx(0.150 + eng.profile.dit_ms(3) / 1000)
    eng.synchronize()
    eng.decode(torch.zeros(2, c, h, w))
    wall, cpu = time.perf_counter() - start, time.thread_time() - cpu0
    modelled = 0.150 + eng.profile.dit_ms(3) / 1000 + eng.profile.decode_ms(2) / 1000
    assert eng.device_queue.busy_s == pytest.approx(modelled)
    assert wall >= modelled - 0.002  # the host really waited for the simulated device
    assert cpu < 0.25 * modelled, f"waiting burned {cpu:.3f} s of CPU for {modelled:.3f} s of simulated work"


class CountingEngine(SimulatedEngine):
    """Records when the runner waits for which step's mark."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.events: list[str] = []

    def mark(self):
        k = sum(e.startswith("mark") for e in self.events)
        self.events.append(f"mark {k}")
        wait = super().mark()

        def waited():
            wait()
            self.events.append(f"wait {k}")

        return waited


@pytest.mark.parametrize("run_ahead", [0, 1])
def test_runner_runs_ahead_of_the_device_by_at_most_run_ahead_steps(demo, run_ahead):
    eng = CountingEngine(demo, profile(dit_ms={"1": 30.0, "4": 60.0}), max_rows=4)
    runner = Runner(eng, demo.stats, demo.null_class, run_ahead=run_ahead)
    sched = Scheduler(4, demo.spec.latent_shape, device=eng.device)
    preset = demo.spec.presets["digits"]  # guided on every step: 2 rows per sample
    for i in range(2):
        sched.admit(Job(class_id=i, seed=i, preset=preset, key=str(i), deadline=time.time() + 60))
    seconds = []
    for _ in range(3):
        plan = sched.schedule()
        assert plan.rows == 4
        x_next, secs = runner.step(plan)
        seconds.append(secs)
        sched.commit(plan, x_next, secs)
    if run_ahead == 0:  # every step waits for itself
        assert eng.events == ["mark 0", "wait 0", "mark 1", "wait 1", "mark 2", "wait 2"]
        assert min(seconds) >= 0.060 - 0.002
    else:  # step k waits for step k-1: the host prepared step k while the device ran k-1
        assert eng.events == ["mark 0", "mark 1", "wait 0", "mark 2", "wait 1"]
        assert sum(seconds) >= 2 * 0.060 - 0.002  # two forwards were waited for
    images, _ = runner.decode([s.x for s in sched.active])
    assert images.shape == (2, *([demo.spec.image_size] * 2), 3)
    assert not runner._in_flight and eng.device_queue.busy_s == pytest.approx(0.180 + eng.profile.decode_ms(2) / 1000)


def test_backend_choice_and_device(demo):
    eng = load_engine(demo, "simulated", simulated_profile="b1-256-h200-derived", max_rows=16)
    assert isinstance(eng, SimulatedEngine) and eng.image_size == 256 and eng.info.max_rows == 16
    with pytest.raises(EngineError, match="runs on the CPU"):
        load_engine(demo, "simulated", device="cuda", simulated_profile="b1-256-h200-derived")
    with pytest.raises(ProfileError, match="LDIT_SIMULATED_PROFILE"):
        load_engine(demo, "simulated")
    assert Settings(backend="simulated", simulated_profile="x").backend == "simulated"


# -- the service on it -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", SHIPPED)
def test_service_on_each_shipped_profile_answers_with_a_png_and_says_simulated(name):
    svc = start_service("all", {"LDIT_BACKEND": "simulated", "LDIT_SIMULATED_PROFILE": name,
                                "LDIT_MODEL_DIR": str(DEMO_MODEL_DIR), "LDIT_MAX_BATCH_SIZE": "16"})
    try:
        r = httpx.post(f"{svc.url}/generate", json={"class_label": 3, "seed": 11}, timeout=60)
        assert r.status_code == 200, r.text
        img = Image.open(io.BytesIO(r.content))
        img.load()
        assert img.format == "PNG" and img.size == (256, 256)
        # Pixel-exact what the chaos run's judge expects of a simulated worker (the same crop, any process).
        want = simulated_references(load_bundle(DEMO_MODEL_DIR), name, [(3, 11, "digits", 0)])[(3, 11, "digits", 0)]
        assert np.array_equal(np.asarray(img.convert("RGB")), want)
        card = httpx.get(f"{svc.url}/v1/model").json()
        assert card["api"]["backend"] == "simulated" and card["resolution"] == 256
        assert [(w["backend"], w["simulated_profile"], w["image_size"]) for w in card["workers"]] == [
            ("simulated", name, 256)]
        metrics = httpx.get(f"{svc.url}/metrics").text
        assert re.search(rf'ldit_engine_info\{{[^}}]*backend="simulated"[^}}]*simulated_profile="{name}"', metrics)
        assert any("SIMULATED BACKEND" in line and name in line for line in svc.lines)
    finally:
        assert svc.stop() == 0


@pytest.mark.skipif(not have_redis_server(), reason="Debian's redis-server is not installed")
def test_worker_heartbeat_says_simulated(tmp_path):
    server = start_redis("debian")
    env = {"LDIT_BACKEND": "simulated", "LDIT_SIMULATED_PROFILE": "xl1-256-h200-measured",
           "LDIT_MODEL_DIR": str(DEMO_MODEL_DIR), "LDIT_REDIS_URL": server.url, "LDIT_WORKER_NAME": "sim-1"}
    worker = start_service("worker", env)
    try:
        beat = json.loads(server.client().hget(Keys("ldit").workers, "sim-1"))
        assert beat["backend"] == "simulated" and beat["simulated_profile"] == "xl1-256-h200-measured"
        assert beat["image_size"] == 256
    finally:
        worker.stop()
        server.stop()

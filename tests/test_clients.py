"""The clients people already have, against a real API + worker + redis-server (the shipped demo model):

* the official `openai` Python package through `client.images.generate(...)` (POST /v1/images/generations),
* the installed `ldit` command (ldit_client/), on a pseudo-terminal where its progress bars matter,
* WebP and JPEG answers of /generate and /jobs/{id}/image (Accept with q-values, `output_format`, 406),
  and the result cache keyed on the format.
"""

from __future__ import annotations

import _thread
import base64
import fcntl
import hashlib
import io
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from ldit_client.api import Client
from ldit_client.cli import interrupted
from service import image_formats
from tests.service_harness import REPO, have_redis_server, start_redis, start_service

KEY = "clients-test-key"
OTHER_KEY = "someone-else"
STEPS = 4  # grid points: 3 Euler steps of the demo model, fast on 2 cores
LDIT = Path(sys.executable).parent / "ldit"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("".join(hashlib.sha256(k.encode()).hexdigest() + "\n" for k in (KEY, OTHER_KEY)))
    server = start_redis("debian" if have_redis_server() else "embedded")
    env = {"LDIT_REDIS_URL": server.url, "LDIT_API_KEYS_FILE": str(keys), "LDIT_MAX_QUEUE_DELAY_MS": "0",
           "LDIT_BATCH_DIR": str(tmp_path_factory.mktemp("batches"))}
    api = start_service("api", env)
    worker = start_service("worker", {**env, "LDIT_WORKER_NAME": "w1"})
    yield api, server
    worker.stop()
    api.stop()
    server.stop()


@pytest.fixture(scope="module")
def http(cluster):
    api, _ = cluster
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def sdk(cluster):
    api, _ = cluster
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def pixels(blob: bytes, fmt: str) -> np.ndarray:
    with Image.open(io.BytesIO(blob)) as im:
        assert im.format == fmt, im.format
        return np.asarray(im.convert("RGB"))


def generate_png(http: httpx.Client, label: str, seed: int) -> bytes:
    r = http.post("/generate", json={"class_label": label, "seed": seed, "steps": STEPS})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    return r.content


# -- the OpenAI SDK ---------------------------------------------------------------------------------
def test_openai_sdk_b64_json_png_n3_equals_generate(sdk, http):
    resp = sdk.images.generate(prompt="7", n=3, extra_body={"seed": 4200, "steps": STEPS})
    assert resp.created > 0 and resp.output_format == "png" and resp.size == "32x32"
    assert [d.revised_prompt for d in resp.data] == ["7"] * 3
    assert [d.model_extra["seed"] for d in resp.data] == [4200, 4201, 4202]
    images = [base64.b64decode(d.b64_json) for d in resp.data]
    assert len({i for i in images}) == 3  # three seeds, three images
    for seed, blob in zip((4200, 4201, 4202), images, strict=True):
        assert blob == generate_png(http, "7", seed)  # the same seed gives the same pixels (one cache)
        assert pixels(blob, "PNG").shape == (32, 32, 3)


def test_openai_sdk_webp_decodes_to_the_pngs_pixels(sdk, http):
    resp = sdk.images.generate(prompt="3", output_format="webp", response_format="b64_json",
                               extra_body={"seed": 11, "steps": STEPS})
    assert resp.output_format == "webp" and len(resp.data) == 1
    webp = base64.b64decode(resp.data[0].b64_json)
    assert np.array_equal(pixels(webp, "WEBP"), pixels(generate_png(http, "3", 11), "PNG"))


def test_openai_sdk_url_n3_points_at_the_jobs_image(sdk, http, cluster):
    api, _ = cluster
    resp = sdk.images.generate(prompt="5", n=3, response_format="url", output_format="webp",
                               extra_body={"seed": 500, "steps": STEPS})
    assert len(resp.data) == 3
    for i, d in enumerate(resp.data):
        assert d.b64_json is None and d.url.startswith(f"{api.url}/jobs/") and d.url.endswith("/image")
        r = httpx.get(d.url, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/webp"  # the format asked for
        assert np.array_equal(pixels(r.content, "WEBP"), pixels(generate_png(http, "5", 500 + i), "PNG"))
        assert httpx.get(d.url, headers={"Authorization": f"Bearer {OTHER_KEY}"}).status_code == 404  # its key's
        png = httpx.get(d.url, headers={"Authorization": f"Bearer {KEY}", "Accept": "image/png"})
        assert png.headers["content-type"] == "image/png"  # Accept still chooses


def test_openai_sdk_bad_prompt_is_a_bad_request_with_our_message(sdk):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.images.generate(prompt="a photo of a cat", extra_body={"steps": STEPS})
    err = caught.value
    assert err.status_code == 400 and err.param == "prompt" and err.type == "invalid_request_error"
    assert "unknown class name 'a photo of a cat'" in err.body["message"]
    assert "this model's classes are ['0', '1'," in err.body["message"]  # the closest classes: all ten


def test_openai_sdk_bad_key_is_an_authentication_error(cluster):
    api, _ = cluster
    bad = openai.OpenAI(base_url=f"{api.url}/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.images.generate(prompt="7")
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"


@pytest.mark.parametrize(("kwargs", "param", "says"), [
    ({"size": "1024x1024"}, "size", "this model makes 32x32"),
    ({"n": 11}, "n", "less than or equal to 10"),
    ({"output_format": "gif"}, "output_format", "'png', 'webp' or 'jpeg'"),
    ({"background": "transparent"}, "background", "opaque"),
    ({"extra_body": {"negative_prompt": "x"}}, "negative_prompt", "Unknown parameter"),
    ({"extra_body": {"steps": 1}}, "steps", "greater than or equal to 2"),
    ({"extra_body": {"preset": "nope"}}, "preset", "unknown preset"),
    ({"extra_body": {"stream": True}}, "stream", "streaming is not supported"),
    ({"extra_body": {"partial_images": 2}}, "partial_images", "need streaming"),
    ({"extra_body": {"frame_count": 4}}, "frame_count", "GIF output"),
])
def test_openai_sdk_refuses_what_does_not_apply(sdk, kwargs, param, says):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.images.generate(prompt="7", **kwargs)
    assert caught.value.param == param and says in caught.value.body["message"], caught.value.body


def test_openai_fields_that_do_not_apply_are_ignored(sdk, http):
    resp = sdk.images.generate(prompt="2", model="gpt-image-1", quality="high", style="vivid", moderation="low",
                               background="opaque", size="32x32", user="u-1", output_compression=100,
                               extra_body={"seed": 8, "steps": STEPS})
    assert base64.b64decode(resp.data[0].b64_json) == generate_png(http, "2", 8)


def test_openapi_shows_the_endpoint_and_the_formats(http):
    spec = http.get("/openapi.json").json()
    op = spec["paths"]["/v1/images/generations"]["post"]
    assert "ImagesRequest" in op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert "400" in op["responses"] and "OpenAIError" in str(op["responses"]["400"])
    for path, method in (("/generate", "post"), ("/jobs/{job_id}/image", "get")):
        responses = spec["paths"][path][method]["responses"]
        assert set(responses["200"]["content"]) == {"image/png", "image/webp", "image/jpeg"}
        assert "406" in responses
    body = spec["components"]["schemas"]["GenerateRequest"]["properties"]
    assert "output_format" in body and "output_compression" in body


# -- formats on /generate and /jobs -------------------------------------------------------------------
def test_generate_answers_webp_and_jpeg_by_accept_and_body(http, cluster):
    _, server = cluster
    png = generate_png(http, "4", 77)
    want = pixels(png, "PNG")
    r = http.post("/generate", json={"class_label": "4", "seed": 77, "steps": STEPS}, headers={"Accept": "image/webp"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/webp" and r.headers["vary"] == "Accept"
    assert np.array_equal(pixels(r.content, "WEBP"), want)
    r = http.post("/generate", json={"class_label": "4", "seed": 77, "steps": STEPS},
                  headers={"Accept": "image/png;q=0.5, image/jpeg;q=0.9, */*;q=0.1"})
    assert r.headers["content-type"] == "image/jpeg"
    assert image_formats.psnr(pixels(r.content, "JPEG"), want) > 30
    r = http.post("/generate", json={"class_label": "4", "seed": 77, "steps": STEPS, "output_format": "jpeg",
                                     "output_compression": 40})
    assert r.headers["content-type"] == "image/jpeg"
    small = r.content
    r = http.post("/generate", json={"class_label": "4", "seed": 77, "steps": STEPS, "output_format": "jpeg"})
    assert len(small) < len(r.content)  # the quality is honoured, and keyed on in the cache

    # the encoded images are cached beside the PNG, one key per format and quality
    keys = {k.decode().rsplit(":", 1)[1] for k in server.client().keys("ldit:result:*:*")}
    assert {"webp", "jpeg-q90", "jpeg-q40"} <= keys
    before = metric(http, 'ldit_image_format_answers_total{cache="hit",format="webp"}')
    again = http.post("/generate", json={"class_label": "4", "seed": 77, "steps": STEPS},
                      headers={"Accept": "image/webp"})
    assert again.headers["content-type"] == "image/webp" and np.array_equal(pixels(again.content, "WEBP"), want)
    assert metric(http, 'ldit_image_format_answers_total{cache="hit",format="webp"}') == before + 1


def metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


@pytest.mark.parametrize(("headers", "body", "says"), [
    ({"Accept": "application/json"}, {}, "accepts none of them"),
    ({"Accept": "image/png"}, {"output_format": "webp"}, "output_format"),
])
def test_generate_406_for_what_we_cannot_make(http, headers, body, says):
    r = http.post("/generate", json={"class_label": "1", "seed": 1, "steps": STEPS, **body}, headers=headers)
    assert r.status_code == 406, r.text
    assert r.json()["error"] == "not_acceptable" and says in r.json()["message"]
    assert r.json()["detail"][0]["field"] == "accept"


def test_generate_refuses_a_bad_format_naming_the_field(http):
    r = http.post("/generate", json={"class_label": "1", "seed": 1, "output_format": "gif"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "output_format"
    r = http.post("/generate", json={"class_label": "1", "seed": 1, "output_compression": 101})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "output_compression"


def test_job_image_in_the_jobs_format_unless_accept_says_otherwise(http):
    job = http.post("/jobs", json={"class_label": "6", "seed": 3, "steps": STEPS, "output_format": "webp"}).json()
    for _ in range(600):
        if http.get(job["status_url"]).json()["status"] == "done":
            break
        time.sleep(0.05)
    r = http.get(job["image_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/webp"
    assert http.get(job["image_url"], headers={"Accept": "image/png"}).headers["content-type"] == "image/png"
    assert http.get(job["image_url"], headers={"Accept": "text/html"}).status_code == 406


# -- the ldit command -----------------------------------------------------------------------------------
def ldit_env(api_url: str) -> dict[str, str]:
    # PYTHONPATH: the checkout under test, whatever the venv's editable install points at
    return {**os.environ, "LDIT_URL": api_url, "LDIT_API_KEY": KEY, "PYTHONPATH": str(REPO),
            "COLUMNS": "120"}


def ldit(api_url: str, *args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    assert LDIT.is_file(), f"{LDIT} is not installed: run scripts/setup.sh (pip install -e .)"
    return subprocess.run([str(LDIT), *args], env=ldit_env(api_url), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


class Pty:
    """A command on a pseudo-terminal (its stdin, stdout and stderr), read as it runs."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                                     close_fds=True)
        os.close(slave)
        self.master, self.out = master, b""

    def read_until(self, pattern: str, timeout: float = 120) -> re.Match:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = re.search(pattern.encode(), self.out)
            if m:
                return m
            self._read(0.2)
        raise AssertionError(f"no {pattern!r} in {self.out[-2000:]!r}")

    def _read(self, wait: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], wait)
        if ready:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return False
            if not data:
                return False
            self.out += data
        return True

    def write(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait(self, timeout: float = 300) -> int:
        end = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < end:
            self._read(0.1)
        while self._read(0.05):
            pass
        os.close(self.master)
        return self.proc.wait(5)


def npz_of(http: httpx.Client, batch_id: str) -> tuple[np.ndarray, np.ndarray]:
    r = http.get(f"/batches/{batch_id}/samples.npz")
    assert r.status_code == 200, r.text
    with np.load(io.BytesIO(r.content)) as z:
        return z["arr_0"], z["arr_1"]


def test_ldit_generate(cluster, http, tmp_path):
    api, _ = cluster
    done = ldit(api.url, "generate", "7", "--seed", "42", "--steps", str(STEPS), "-o", "seven.png", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "wrote seven.png" in done.stdout
    assert (tmp_path / "seven.png").read_bytes() == generate_png(http, "7", 42)
    done = ldit(api.url, "generate", "7", "--seed", "42", "--steps", str(STEPS), "--format", "webp",
                "-o", "seven.webp", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(pixels((tmp_path / "seven.webp").read_bytes(), "WEBP"),
                          pixels(generate_png(http, "7", 42), "PNG"))
    done = ldit(api.url, "generate", "2", "--seed", "10", "-n", "4", "--steps", str(STEPS), "-o", "two.png",
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for seed in range(10, 14):
        assert (tmp_path / f"two_{seed}.png").read_bytes() == generate_png(http, "2", seed)


def test_ldit_errors_are_one_line(cluster, tmp_path):
    api, _ = cluster
    done = ldit(api.url, "generate", "zebra", cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldit: error: HTTP 422 invalid_request: unknown class name 'zebra'")
    done = subprocess.run([str(LDIT), "--api-key", "wrong", "generate", "7"], env=ldit_env(api.url),
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.strip() == "ldit: error: HTTP 401 unauthorized: invalid API key"
    done = subprocess.run([str(LDIT), "--url", "http://127.0.0.1:9", "status"], env=ldit_env(api.url),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.startswith("ldit: error: cannot reach http://127.0.0.1:9")


def test_ldit_status(cluster):
    api, _ = cluster
    done = ldit(api.url, "status")
    assert done.returncode == 0, done.stderr
    assert "lightningdit-digits-demo" in done.stdout and "10 classes" in done.stdout
    assert "workers  1 live" in done.stdout and "w1:" in done.stdout
    assert re.search(r"queue    \d+ interactive jobs", done.stdout)


def test_ldit_sample_writes_the_sets_npz(cluster, http, tmp_path):
    api, _ = cluster
    done = ldit(api.url, "sample", "--classes", "all", "--per-class", "3", "--seed-start", "0", "--steps",
                str(STEPS), "-o", "samples.npz", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    batch_id = re.search(r"set (b\w+): 30 images", done.stderr).group(1)
    assert "%|" not in done.stderr  # not a terminal: no bars
    with np.load(tmp_path / "samples.npz") as z:
        arr, labels = z["arr_0"], z["arr_1"]
    want_arr, want_labels = npz_of(http, batch_id)
    assert arr.shape == (30, 32, 32, 3) and np.array_equal(arr, want_arr) and np.array_equal(labels, want_labels)


def test_ldit_sample_interrupt_leave_then_resume_with_bars_on_a_terminal(cluster, http, tmp_path):
    api, _ = cluster
    # 40 images of 29 steps, 8 at a time (16 rows a forward): several seconds, finished in waves
    term = Pty([str(LDIT), "sample", "--classes", "all", "--per-class", "4", "--steps", "30", "-o", "part.npz",
                "--poll", "0.2"], ldit_env(api.url), tmp_path)
    batch_id = term.read_until(r"set (b\w+): 40 images").group(1).decode()
    term.read_until(r"set b\w{0,12}: +\d+%\|.*\| *[1-9]\d*/40 \[")  # the bar, with progress drawn
    term.proc.send_signal(signal.SIGINT)  # Ctrl-C
    term.read_until(r"Cancel set b\w+ .* or leave it running\?")
    term.write("leave\n")
    assert term.wait() == 130
    out = term.out.decode(errors="replace")
    assert f"set {batch_id} left running; resume with: ldit sample --resume {batch_id} -o part.npz" in out
    assert "img/s" in out and "\r" in out  # a bar redrawn in place, with its rate
    assert not (tmp_path / "part.npz").exists()
    assert http.get(f"/batches/{batch_id}").json()["status"] == "running"  # left running

    term = Pty([str(LDIT), "sample", "--resume", batch_id, "-o", "resumed.npz", "--poll", "0.2"],
               ldit_env(api.url), tmp_path)
    assert term.wait(600) == 0, term.out[-2000:]
    out = term.out.decode(errors="replace")
    assert f"resuming set {batch_id}" in out and "download" in out and "wrote resumed.npz (40 images" in out
    with np.load(tmp_path / "resumed.npz") as z:
        arr, labels = z["arr_0"], z["arr_1"]
    want_arr, want_labels = npz_of(http, batch_id)
    assert np.array_equal(arr, want_arr) and np.array_equal(labels, want_labels)
    assert labels.tolist() == [c for c in range(10) for _ in range(4)]


def test_ldit_sample_interrupt_cancel_deletes_the_set(cluster, http, tmp_path):
    api, _ = cluster
    proc = subprocess.Popen([str(LDIT), "sample", "--per-class", "50", "--steps", "60", "-o", "x.npz",
                             "--on-interrupt", "cancel", "--poll", "0.2"], env=ldit_env(api.url), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()
    batch_id = re.search(r"set (b\w+): 500 images", first).group(1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"cancelled set {batch_id}" in err
    assert http.get(f"/batches/{batch_id}").status_code == 404


def test_ldit_cancel_works_after_a_ctrl_c_that_landed_in_httpcores_pool_lock(cluster, http, tmp_path):
    """Regression (CI of stop 30: `ldit sample --on-interrupt cancel` hung after Ctrl-C, never exiting).

    A KeyboardInterrupt raised just as httpcore's pool takes its non-reentrant thread lock leaves the
    lock taken, and every later request on that pool (the cancel's DELETE, the close at exit) waits
    forever. Made deterministic here: Ctrl-C becomes pending while the pool's lock is contended, so it
    is raised the moment a request in this (the main) thread gets the lock.
    """
    api, _ = cluster
    client = Client(api.url, KEY, 30)
    batch_id = client.json("POST", "/batches", json={"classes": [1], "per_class": 50, "steps": 60})["id"]
    pool_lock = client.http._transport._pool._optional_thread_lock._lock  # httpcore 1.x: the lock a Ctrl-C leaks
    pool_lock.acquire()

    def ctrl_c_then_let_go():
        time.sleep(1.0)  # the main thread waits on the lock by now
        _thread.interrupt_main()
        time.sleep(0.1)
        pool_lock.release()

    threading.Thread(target=ctrl_c_then_let_go, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        client.json("GET", f"/batches/{batch_id}")
    ended = []

    def cancel_then_close():  # what `ldit sample --on-interrupt cancel` does next, then click at exit
        try:
            interrupted(client, batch_id, tmp_path / "x.npz", "cancel")
        except SystemExit as exit_:
            ended.append(exit_.code)
        client.close()
        ended.append("closed")

    worker = threading.Thread(target=cancel_then_close, daemon=True)
    worker.start()
    worker.join(60)
    assert ended == [130, "closed"], f"the cancel (or the close) waited on the pool lock: {ended}"
    assert http.get(f"/batches/{batch_id}").status_code == 404


def test_ldit_watch_draws_the_steps_and_downloads(cluster, http, tmp_path):
    api, _ = cluster
    job = http.post("/jobs", json={"class_label": "8", "seed": 5, "steps": 120}).json()  # seconds: watched mid-way
    term = Pty([str(LDIT), "watch", job["id"], "-o", "eight.png"], ldit_env(api.url), tmp_path)
    assert term.wait(300) == 0, term.out[-2000:]
    out = term.out.decode(errors="replace")
    assert re.search(r"\d+/119 \[", out), out[-1500:]  # the step bar (120 grid points: 119 steps)
    assert f"job {job['id']} done" in out and "wrote eight.png" in out
    assert (tmp_path / "eight.png").read_bytes() == http.get(job["image_url"]).content

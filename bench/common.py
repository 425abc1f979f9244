"""Shared pieces of the benchmarks: the two models, timing, FLOP counting, GEMM peaks, machine info.

Models:
* "demo": the shipped demo bundle (checkpoints/demo) when it exists, else a random-weight
  bundle of the same architecture (engines.random_bundle.DEMO_DIT) with its preset.
* "b1": LightningDiT-B/1 at 16x16x32 latents, random weights, paired with a small random
  f4 VA-VAE decoder (64x64 images; the decoder is irrelevant to DiT throughput), preset
  800ep shortened to 25 grid points.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from engines.flops import counted_flops  # noqa: E402
from engines.random_bundle import DEMO_DIT, DEMO_VAE_DDCONFIG, make_random_bundle, perturb_  # noqa: E402
from model.bundle import ModelBundle, load_bundle, write_bundle  # noqa: E402
from model.latents import LatentStats  # noqa: E402
from model.lightningdit import LightningDiT, lightningdit_config  # noqa: E402
from model.sampling import PRESETS, SamplerPreset, time_grid  # noqa: E402
from model.vavae import VAVAE  # noqa: E402

DEMO_DIR = REPO / "checkpoints" / "demo"
B1_PRESET = PRESETS["800ep"].replace(num_steps=25)
B1_VAE_DDCONFIG = dict(DEMO_VAE_DDCONFIG, z_channels=32, attn_resolutions=[])
THREADS = int(os.environ.get("LDIT_BENCH_THREADS", "2"))


def log(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class Model:
    key: str  # "demo" | "b1"
    label: str  # for tables
    root: Path  # bundle dir (the service loads it too)
    bundle: ModelBundle
    preset: SamplerPreset
    note: str = ""


def make_b1_bundle(root: Path, preset: SamplerPreset = B1_PRESET) -> Path:
    cfg = lightningdit_config("LightningDiT-B/1")
    torch.manual_seed(0)
    dit = LightningDiT(**cfg).eval()
    perturb_(dit, 1, big=0.05, small=0.02)
    vae = VAVAE(32, B1_VAE_DDCONFIG).eval()
    perturb_(vae, 2, big=0.02, small=0.02)
    stats = LatentStats(torch.zeros(32), torch.ones(32))
    return write_bundle(root, dit, cfg, vae, stats, name="B1-random", class_names=[str(i) for i in range(1000)],
                        presets={"bench": preset}, default_preset="bench")


def load_model(key: str, tmp: Path) -> Model:
    if key == "b1":
        root = make_b1_bundle(tmp / "b1")
        return Model("b1", "LightningDiT-B/1 16x16 (random)", root, load_bundle(root), B1_PRESET,
                     "random weights; small random f4 VA-VAE decoder (64x64 images)")
    if key == "demo":
        if (DEMO_DIR / "model.json").is_file():
            b = load_bundle(DEMO_DIR)
            return Model("demo", f"demo ({b.spec.name})", DEMO_DIR, b, b.spec.presets[b.spec.default_preset],
                         "shipped demo bundle checkpoints/demo")
        root = make_random_bundle(tmp / "demo", DEMO_DIT, DEMO_VAE_DDCONFIG, name="demo-sized-random")
        b = load_bundle(root)
        return Model("demo", "demo-sized DiT (random)", root, b, b.spec.presets[b.spec.default_preset],
                     "checkpoints/demo absent: random weights of the demo architecture (engines.random_bundle)")
    raise ValueError(f"unknown model {key!r}")


def guided_steps(preset: SamplerPreset) -> int:
    grid = time_grid(preset.num_steps, preset.timestep_shift)
    return sum(preset.guided_at(float(t)) for t in grid[:-1])


def rows_per_image(preset: SamplerPreset, official: bool) -> int:
    steps = preset.num_steps - 1
    if not preset.uses_cfg:
        return steps
    return 2 * steps if official else steps + guided_steps(preset)


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def dit_flops_per_row(bundle: ModelBundle) -> int:
    """Counted on the meta device, attention included (engines/flops.py; a CPU count misses it)."""
    return int(counted_flops(bundle.spec.dit_config))


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def gemm_peaks(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best-of-`repeats` GFLOP/s of an n^3 matmul in fp32 and bf16 (2 n^3 FLOPs)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    flops = 2 * n**3
    with torch.inference_mode():
        out = {"fp32": flops / best_of(lambda: a @ b, repeats) / 1e9}
        ab, bb = a.bfloat16(), b.bfloat16()
        out["bf16"] = flops / best_of(lambda: ab @ bb, repeats) / 1e9
    return out


def machine() -> dict:
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "loadavg": [round(x, 2) for x in load]}


def setup_threads() -> None:
    torch.set_num_threads(THREADS)


def progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, mininterval=1.0, file=sys.stderr)


def in_thread(fn, *args, **kwargs):
    """Run fn in a fresh thread and return its result (re-raising its exception).

    The service's worker runs torch in a non-main thread. On this shared 2-core machine,
    small-op torch code called from the main thread with 2 OpenMP threads ran 7-10x slower
    than the same code from a non-main thread (OpenMP barrier spinning while the other
    core is taken by other processes), so the benchmarks call torch the way the worker does.
    """
    import threading

    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller
            box["error"] = err

    t = threading.Thread(target=target, name="bench")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")

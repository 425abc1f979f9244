#!/usr/bin/env python
"""The GPU verification kit's steps (scripts/gpu_check.sh runs each one under its own time cap).

    python -m bench.gpu_check STEP --out DIR [--dry-run]

Steps, each writing DIR/STEP.json (`summary` merges them into DIR/summary.json):
* env:      the card, driver, torch/CUDA versions, and a measured bf16 matmul peak.
* xl:       LightningDiT-XL/1 (random weights) in fp32, bf16 and fp16, eager and with CUDA
            graphs: error against fp32, ms per forward at 16 and 64 rows, TFLOP/s and MFU
            against the bf16 peak, and the full 800ep recipe for 32 images (images/s)
            through the serving scheduler and runner, decode included.
* xl_compiled: the same for bf16 with the blocks compiled (regional compilation: one inductor graph for
            every block and bucket), with and without CUDA graphs on top, plus the compile time (its own
            step and time cap: compilation may be slow).
* vae:      the f16d32 VA-VAE decoder (random weights) in fp32, bf16, fp16: finite, PSNR, ms/image.
* service:  the all-in-one service on the device (embedded Redis, shipped demo model), 32
            concurrent /generate requests, each PNG against the same image made offline.
* tensorrt: build_engine.py's TensorRT route where `tensorrt` imports; skipped with the reason.

--dry-run runs every step at tiny sizes on the CPU (what CI runs, so the kit cannot rot);
the numbers it prints are meaningless, the code paths are the same.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from engines.random_bundle import perturb_  # noqa: E402
from engines.torch_backend import TorchEngine  # noqa: E402
from model.bundle import BundleSpec, ModelBundle, load_bundle  # noqa: E402
from model.latents import LatentStats  # noqa: E402
from model.lightningdit import LightningDiT, lightningdit_config  # noqa: E402
from model.sampling import PRESETS, initial_noise, sample  # noqa: E402
from model.vavae import VAVAE, VAVAE_CONFIGS  # noqa: E402

# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s), for MFU next to the measured one.
DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.05, "L4": 121.0}
TINY_DIT = dict(lightningdit_config("LightningDiT-B/1"), hidden_size=64, depth=2, num_heads=4, input_size=4,
                in_channels=8, num_classes=10)
TINY_VAE = dict(VAVAE_CONFIGS["f16d32"]["ddconfig"], ch=32, ch_mult=[1, 2], z_channels=8, attn_resolutions=[],
                resolution=16, num_res_blocks=1)


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", flush=True)


def device_for(dry: bool) -> torch.device:
    if dry:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible to torch; use --dry-run on a CPU machine")
    return torch.device("cuda", torch.cuda.current_device())


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_ms(fn, dev: torch.device, iters: int, warmup: int = 2) -> float:
    """Mean milliseconds per call: CUDA events on the GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    sync(dev)
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1000 / iters


def bf16_peak_tflops(dev: torch.device, dry: bool) -> float:
    n = 256 if dry else 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, dev, iters=3 if dry else 20, warmup=1 if dry else 3)
    return 2 * n**3 / (ms / 1000) / 1e12


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


# -- steps --------------------------------------------------------------------------------------
def step_env(a) -> dict:
    dev = device_for(a.dry_run)
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": str(dev), "dry_run": a.dry_run}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        out.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                   multiprocessors=p.multi_processor_count, gpu_count=torch.cuda.device_count())
        try:
            out["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as err:
            out["nvidia_smi"] = f"unavailable: {err}"
    out["bf16_matmul_tflops"] = round(bf16_peak_tflops(dev, a.dry_run), 1)
    out["datasheet_bf16_tflops"] = datasheet_peak(out.get("gpu", ""))
    return out


def datasheet_peak(name: str) -> float | None:
    return next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)


def xl_bundle(dry: bool) -> ModelBundle:
    """LightningDiT-XL/1 + the f16d32 VA-VAE decoder with random (perturbed) weights, built on the host."""
    cfg = TINY_DIT if dry else lightningdit_config("LightningDiT-XL/1")
    ddconfig = TINY_VAE if dry else VAVAE_CONFIGS["f16d32"]["ddconfig"]
    return random_model_bundle(cfg, ddconfig, "xl-random" if not dry else "tiny-random")


def random_model_bundle(cfg: dict, ddconfig: dict, name: str) -> ModelBundle:
    """A DiT of config `cfg` and a VA-VAE of `ddconfig`, random (perturbed) weights, in memory only."""
    torch.manual_seed(0)
    dit = LightningDiT(**cfg).eval()
    perturb_(dit, 1, big=0.05, small=0.02)
    vae = VAVAE(ddconfig["z_channels"], ddconfig).eval()
    perturb_(vae, 2, big=0.01, small=0.01)
    c = cfg["in_channels"]
    spec = BundleSpec(root=Path(tempfile.gettempdir()), name=name,
                      dit_config=cfg, dit_checkpoint=Path("-"), vae_embed_dim=ddconfig["z_channels"],
                      vae_ddconfig=ddconfig, vae_checkpoint=Path("-"), latent_stats=Path("-"), latent_multiplier=1.0,
                      class_names=[str(i) for i in range(cfg["num_classes"])], presets=dict(PRESETS),
                      default_preset="800ep")
    return ModelBundle(spec, dit, vae, LatentStats(torch.zeros(c), torch.ones(c)))


def recipe_images_per_s(engine, bundle: ModelBundle, images: int, max_rows: int, preset_name: str) -> dict:
    """The full recipe through the serving Scheduler + Runner (step-level batching, decode included)."""
    from service.store.jobs import Job
    from service.worker.runner import Runner
    from service.worker.scheduler import Scheduler

    runner = Runner(engine, bundle.stats, bundle.null_class)
    sched = Scheduler(max_rows, bundle.spec.latent_shape, "step", device=engine.device)
    preset = bundle.spec.presets[preset_name]
    from collections import deque

    waiting = deque(Job(class_id=i % bundle.spec.num_classes, seed=i, preset=preset, key=str(i),
                        deadline=time.time() + 1e6) for i in range(images))
    done, forwards, rows = 0, 0, 0
    t0 = time.perf_counter()
    while waiting or sched.active:
        sched.admit_waiting(waiting)
        plan = sched.schedule()
        x_next, secs = runner.step(plan)
        forwards += 1
        rows += plan.rows
        finished = sched.commit(plan, x_next, secs)
        if finished:
            imgs, _ = runner.decode([s.x for s in finished])
            done += len(imgs)
    seconds = time.perf_counter() - t0
    return {"images": done, "seconds": round(seconds, 3), "images_per_s": round(done / seconds, 3),
            "forwards": forwards, "mean_rows": round(rows / forwards, 1), "preset": preset_name}


def bench_config(bundle: ModelBundle, dev: torch.device, precision: str, graphs: bool, compiled: bool,
                 ref: dict | None, peak: float, flops_row: float, a) -> dict:
    label = f"{precision}{' graphs' if graphs else ''}{' compiled' if compiled else ''}"
    max_rows = 8 if a.dry_run else 64
    sizes = (2, 8) if a.dry_run else (16, 64)
    t_load = time.perf_counter()
    engine = TorchEngine(bundle, str(dev), precision, max_rows, compile=compiled, cuda_graphs=graphs)
    res = {"config": label}
    if compiled:
        # The first call compiles the block graph (inductor: Triton on CUDA, C++ on the CPU); with graphs
        # it also captures bucket 1. Every other bucket reuses the graph (tests/test_compiled.py).
        t_first = time.perf_counter()
        with torch.inference_mode():
            engine.velocity(torch.zeros(1, *bundle.spec.latent_shape, device=dev), torch.full((1,), 0.5, device=dev),
                            torch.zeros(1, dtype=torch.long, device=dev))
        sync(dev)
        res["compile_s"] = round(time.perf_counter() - t_first, 1)
        log(f"xl {label}: compiled in {res['compile_s']} s (first call)")
    engine.warmup()
    sync(dev)
    res["setup_s"] = round(time.perf_counter() - t_load, 1)
    if dev.type == "cuda":
        res["gpu_mem_gib"] = round(torch.cuda.memory_allocated(dev) / 2**30, 2)
    g = torch.Generator().manual_seed(7)
    inputs = {}
    for rows in sizes:
        x = torch.randn(rows, *bundle.spec.latent_shape, generator=g).to(dev)
        t = torch.rand(rows, generator=g).to(dev)
        y = torch.randint(0, bundle.spec.num_classes, (rows,), generator=g).to(dev)
        inputs[rows] = (x, t, y)
        with torch.inference_mode():
            out = engine.velocity(x, t, y)
            ms = time_ms(lambda x=x, t=t, y=y, e=engine: e.velocity(x, t, y), dev, iters=2 if a.dry_run else 10)
        finite = bool(torch.isfinite(out).all())
        tflops = flops_row * rows / (ms / 1000) / 1e12
        res[f"rows{rows}"] = {"ms": round(ms, 3), "tflops": round(tflops, 1), "mfu": round(tflops / peak, 3),
                              "finite": finite}
        if ref is not None:
            res[f"rows{rows}"]["rel_err_vs_fp32"] = rel_err(out, ref[rows])
        else:
            res.setdefault("_outputs", {})[rows] = out.float()
    if graphs or (compiled and not a.dry_run):
        # every bucket: the cost curve dit_ms(rows) that capacity planning (a simulated engine) needs
        res["sweep_ms"] = {}
        for rows in engine.warmup_rows() if compiled else engine.graphs.buckets:
            x, t, y = (v[:1].expand(rows, *v.shape[1:]).contiguous() for v in inputs[sizes[0]])
            with torch.inference_mode():
                res["sweep_ms"][rows] = round(time_ms(lambda x=x, t=t, y=y, e=engine: e.velocity(x, t, y), dev,
                                                      iters=3 if a.dry_run else 10), 3)
    if getattr(a, "profile", False) and dev.type == "cuda" and precision != "fp32":
        res["top_kernels"], res["kernel_shares"] = top_kernels(engine, inputs[sizes[0]])
        a.profile = compiled and not graphs  # once is enough (xl_compiled: also the graphs configuration)
    if precision != "fp32" and (graphs or compiled or a.dry_run):
        images = 4 if a.dry_run else 32
        preset = "800ep"
        if a.dry_run:
            bundle.spec.presets["800ep-dry"] = PRESETS["800ep"].replace(num_steps=6)
            preset = "800ep-dry"
        res["recipe"] = recipe_images_per_s(engine, bundle, images, max_rows, preset)
    else:
        res["recipe"] = ("skipped: fp32 runs the per-forward timings only (about 10x slower than bf16 on a GPU)"
                         if precision == "fp32" else "skipped: measured for the CUDA-graph configuration")
    log(f"xl {label}: " + json.dumps({k: v for k, v in res.items() if k != "_outputs"}))
    if precision == "fp32":
        engine.dit.to("cpu")  # the fp32 engine moved the bundle's own module; later configs convert on the host
    engine.close()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return res


def kernel_category(name: str) -> str:
    """matmul | attention | elementwise/other, from a CUDA kernel's name (cuBLAS, cuDNN, flash, Triton)."""
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "_mm_", "matmul", "wgmma")):
        return "matmul"
    return "elementwise/other"


def top_kernels(engine, inputs, count: int = 15) -> tuple[list[dict], dict]:
    """The device kernels that take the time of three forwards (torch.profiler), largest first, and the
    share of device time by kernel_category."""
    from torch.profiler import ProfilerActivity, profile

    x, t, y = inputs
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            engine.velocity(x, t, y)
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    total = sum(e.self_device_time_total for e in rows) or 1.0
    rows.sort(key=lambda e: e.self_device_time_total, reverse=True)
    shares = {"matmul": 0.0, "attention": 0.0, "elementwise/other": 0.0}
    for e in rows:
        shares[kernel_category(e.key)] += e.self_device_time_total / total
    top = [{"kernel": e.key[:120], "calls": e.count, "ms_per_forward": round(e.self_device_time_total / 3000, 3),
            "share": round(e.self_device_time_total / total, 3)} for e in rows[:count]]
    return top, {k: round(v, 3) for k, v in shares.items()}


def parse_configs(text: str) -> list[tuple[str, bool, bool]]:
    """"fp32,bf16+graphs,bf16+compiled" -> [(precision, graphs, compiled), ...]"""
    out = []
    for item in text.split(","):
        parts = item.strip().split("+")
        out.append((parts[0], "graphs" in parts[1:], "compiled" in parts[1:]))
    return out


def step_xl(a, configs=None) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    dev = device_for(a.dry_run)
    t0 = time.perf_counter()
    bundle = xl_bundle(a.dry_run)
    c, h, w = bundle.spec.latent_shape
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        bundle.dit(torch.randn(1, c, h, w), torch.rand(1), torch.zeros(1, dtype=torch.long))
    flops_row = counter.get_total_flops()
    peak = bf16_peak_tflops(dev, a.dry_run)
    out = {"model": bundle.spec.name, "params": sum(p.numel() for p in bundle.dit.parameters()),
           "gflop_per_row": round(flops_row / 1e9, 2), "bf16_peak_measured_tflops": round(peak, 1),
           "build_s": round(time.perf_counter() - t0, 1), "configs": []}
    half = "fp16" if dev.type == "cuda" else "bf16"  # fp16 is CUDA-only in the torch backend
    if getattr(a, "configs", None):
        configs = parse_configs(a.configs)
    configs = configs or [("fp32", False, False), ("bf16", False, False), ("bf16", True, False),
                          (half, False, False), (half, True, False)]
    ref = None
    for precision, graphs, compiled in configs:
        if graphs and dev.type != "cuda":
            out["configs"].append({"config": f"{precision} graphs", "skipped": "CUDA graphs need a GPU (dry run)"})
            continue
        try:
            res = bench_config(bundle, dev, precision, graphs, compiled, ref, peak, flops_row, a)
            if ref is None and precision == "fp32":
                ref = res.pop("_outputs")
            out["configs"].append(res)
        except Exception as err:  # noqa: BLE001 - one failing configuration must not hide the others
            traceback.print_exc()
            out["configs"].append({"config": f"{precision}{' graphs' if graphs else ''}{' compiled' if compiled else ''}",
                                   "error": f"{type(err).__name__}: {err}"})
    return out


def step_xl_compiled(a) -> dict:
    """Regional compilation (engines.torch_backend.RegionalCompiledDiT): bf16 compiled, and compiled with CUDA
    graphs per bucket on top (the candidate GPU default), against eager fp32; the dry run compiles on the CPU."""
    a.configs = None
    a.profile = True  # the "after" kernel profile (the xl step's --profile is the "before")
    configs = [("fp32", False, False), ("bf16", False, True)]
    if not a.dry_run:
        configs.append(("bf16", True, True))
    return step_xl(a, configs)


def step_vae(a) -> dict:
    dev = device_for(a.dry_run)
    ddconfig = TINY_VAE if a.dry_run else VAVAE_CONFIGS["f16d32"]["ddconfig"]
    torch.manual_seed(0)
    vae = VAVAE(ddconfig["z_channels"], ddconfig).eval()
    perturb_(vae, 2, big=0.01, small=0.01)
    vae = vae.to(dev)
    n, hw = (2, 4) if a.dry_run else (8, 16)
    z = torch.randn(n, ddconfig["z_channels"], hw, hw, generator=torch.Generator().manual_seed(3)).to(dev)
    from model.latents import to_uint8

    out, ref = {"images": n, "image_size": hw * 2 ** (len(ddconfig["ch_mult"]) - 1), "precisions": {}}, None
    for precision in ("fp32", "bf16", "fp16"):
        if precision == "fp16" and dev.type != "cuda":
            out["precisions"][precision] = {"skipped": "fp16 decode is CUDA-only"}
            continue
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

        def decode(dtype=dtype):
            ctx = torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 else torch.inference_mode()
            with torch.inference_mode(), ctx:
                return vae.decode(z).float()

        img = decode()
        finite = float(torch.isfinite(img).float().mean())
        u8 = to_uint8(img).cpu().numpy()
        ms = time_ms(decode, dev, iters=1 if a.dry_run else 5)
        res = {"finite_fraction": finite, "ms_per_image": round(ms / n, 3), "max_abs": float(img.abs().max())}
        if ref is None:
            ref = u8
        else:
            res["psnr_vs_fp32_db"] = round(float(psnr(u8, ref)), 2)
        out["precisions"][precision] = res
        log(f"vae {precision}: {res}")
    # the cost curve decode_ms(images) of the default (fp32) decoder, for capacity planning
    out["fp32_sweep_ms"] = {}
    for count in (1, 2) if a.dry_run else (1, 4, 16, 32):
        zz = torch.randn(count, *z.shape[1:], device=dev)
        with torch.inference_mode():
            out["fp32_sweep_ms"][count] = round(time_ms(lambda zz=zz: vae.decode(zz), dev, iters=1 if a.dry_run else 5), 3)
    log(f"vae fp32 sweep: {out['fp32_sweep_ms']}")
    return out


def _post(url: str, body: dict) -> tuple[int, bytes, dict]:
    import httpx

    r = httpx.post(url + "/generate", json=body, timeout=300)
    return r.status_code, r.content, dict(r.headers)


def offline_images(bundle_dir: Path, dev: torch.device, precision: str, graphs: bool, requests: list[dict],
                   preset_name: str) -> list[np.ndarray]:
    """Each request's image made alone (batch of one) by the sampler on the same engine configuration."""
    bundle = load_bundle(bundle_dir)
    engine = TorchEngine(bundle, str(dev), precision, 16, cuda_graphs=graphs)
    engine.warmup()
    preset = bundle.spec.presets[preset_name]
    stats = bundle.stats.to(dev)
    images = []
    with torch.inference_mode():
        for req in requests:
            noise = initial_noise(req["seed"], bundle.spec.latent_shape)[None].to(dev)
            x = sample(engine.velocity, noise, torch.tensor([req["class_label"]], device=dev), preset,
                       bundle.null_class)
            images.append(engine.decode(stats.denormalize(x))[0].numpy())
    return images


def step_service(a) -> dict:
    from PIL import Image

    from service.launcher import start_service

    dev = device_for(a.dry_run)
    bundle_dir = REPO / "checkpoints" / "demo"
    preset = load_bundle(bundle_dir).spec.default_preset
    n = 8 if a.dry_run else 32
    requests = [{"class_label": i % 10, "seed": 1000 + i} for i in range(n)]
    configs = [("fp32", False)] if a.dry_run else [("fp32", False), ("bf16", True)]
    if getattr(a, "configs", None):
        configs = [(p, g) for p, g, _ in parse_configs(a.configs)]
    out = {"device": str(dev), "requests": n, "preset": preset, "configs": []}
    for precision, graphs in configs:
        label = f"{precision}{' graphs' if graphs else ''}"
        env = {"LDIT_DEVICE": dev.type if dev.index is None else f"cuda:{dev.index}", "LDIT_PRECISION": precision,
               "LDIT_CUDA_GRAPHS": "true" if graphs else "false", "LDIT_MODEL_DIR": str(bundle_dir),
               "LDIT_MAX_BATCH_SIZE": "16", "LDIT_REQUEST_TIMEOUT_S": "240", "LDIT_REDIS_URL": ""}
        res: dict = {"config": label}
        t0 = time.perf_counter()
        svc = start_service("all", env, timeout=240)
        try:
            import httpx

            deadline = time.time() + 240
            while time.time() < deadline:
                if httpx.get(svc.url + "/readyz", timeout=10).status_code == 200:
                    break
                time.sleep(0.2)
            res["ready_s"] = round(time.perf_counter() - t0, 1)
            t1 = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                answers = list(pool.map(lambda body, url=svc.url: _post(url, body), requests))
            res["wall_s"] = round(time.perf_counter() - t1, 2)
            statuses = [s for s, _, _ in answers]
            res["statuses"] = {str(k): statuses.count(k) for k in sorted(set(statuses))}
            served = [np.asarray(Image.open(io.BytesIO(body)).convert("RGB")) if s == 200 else None
                      for s, body, _ in answers]
            res["max_batch_size_header"] = max(int(h.get("x-batch-size", 0)) for _, _, h in answers)
            res["model"] = httpx.get(svc.url + "/v1/model", timeout=10).json()
        finally:
            res["exit_code"] = svc.stop()
        offline = offline_images(bundle_dir, dev, precision, graphs, requests, preset)
        diffs = [None if s is None else int(np.abs(s.astype(int) - o.astype(int)).max())
                 for s, o in zip(served, offline, strict=True)]
        ok = [d for d in diffs if d is not None]
        res.update(identical=sum(d == 0 for d in ok), compared=len(ok),
                   max_abs_pixel_diff=max(ok) if ok else None,
                   min_psnr_db=round(min(psnr(s, o) for s, o in zip(served, offline, strict=True) if s is not None), 2)
                   if ok else None)
        res["pass"] = bool(len(ok) == n and (res["max_abs_pixel_diff"] <= 1 if precision == "fp32"
                                             else res["min_psnr_db"] >= 30))
        log(f"service {label}: {json.dumps({k: v for k, v in res.items() if k != 'model'})}")
        out["configs"].append(res)
    return out


def step_tensorrt(a) -> dict:
    from engines.trt_build import tensorrt_status

    ok, reason = tensorrt_status()
    if not ok:
        return {"skipped": reason}
    with tempfile.TemporaryDirectory(prefix="ldit-trt-") as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(REPO / "build_engine.py"), "--output-dir", tmp, "--max-rows", "16"],
                              capture_output=True, text=True, timeout=600)
        manifest = Path(tmp) / "manifest.json"
        return {"status": reason, "exit_code": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
                "tail": proc.stdout[-3000:] + proc.stderr[-2000:],
                "check": json.loads(manifest.read_text()).get("tensorrt", {}).get("check") if manifest.is_file()
                else None}


def step_summary(a) -> dict:
    summary = {"dry_run": a.dry_run, "steps": {}}
    for path in sorted(a.out.glob("*.json")):
        if path.name != "summary.json":
            summary["steps"][path.stem] = json.loads(path.read_text())
    rcs = a.out / "rc.txt"
    if rcs.is_file():
        summary["exit_codes"] = dict(line.split() for line in rcs.read_text().splitlines() if line.strip())
    return summary


STEPS = {"env": step_env, "xl": step_xl, "xl_compiled": step_xl_compiled, "vae": step_vae, "service": step_service,
         "tensorrt": step_tensorrt, "summary": step_summary}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=sorted(STEPS))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--configs", default=None, help="xl: e.g. fp32,bf16+graphs,fp16+graphs (default: all)")
    p.add_argument("--profile", action="store_true", help="xl: top device kernels of the first low-precision config")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.dry_run:
        torch.set_num_threads(1)  # tiny sizes; one thread is steadier on a shared CPU
    t0 = time.perf_counter()
    box: dict = {}

    def run():  # the worker runs torch off the main thread too (see bench/common.in_thread)
        try:
            box["result"] = STEPS[a.step](a)
        except BaseException as err:  # noqa: BLE001 - reported in the step's JSON
            traceback.print_exc()
            box["result"] = {"error": f"{type(err).__name__}: {err}"}

    th = threading.Thread(target=run, name=f"gpu_check-{a.step}")
    th.start()
    th.join()
    result = box["result"]
    result["step_seconds"] = round(time.perf_counter() - t0, 1)
    name = "summary.json" if a.step == "summary" else f"{a.step}.json"
    (a.out / name).write_text(json.dumps(result, indent=2, default=str))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""The GPU verification kit's steps (scripts/gpu_check.sh runs each one under its own time cap).

    python -m bench.gpu_check STEP [--result FILE | --out DIR] [--dry-run]

Each step writes its JSON to FILE (default DIR/STEP.json) as it goes, so what a step measured
survives its time cap; the kit appends each step's file to its output folder's steps.jsonl when
the step ends, and `summary` (with --steps) turns that file into summary.json.

* env:      the card, driver, torch/CUDA versions, the measured bf16 matmul peak and the datasheet's.
* pytest_gpu: `pytest -m gpu` over the GPU tests, with the failures and skips named.
* xl, xl_compiled: LightningDiT-XL/1 (random weights), bench/gpu_xl.py: eager with and without CUDA
            graphs; regional compilation. Error against fp32, ms at 16 and 64 rows, MFU against the
            datasheet peak, every bucket's cost, the 800ep recipe in images/s, a kernel profile, and
            the low-precision recipes' errors.
* vae:      the f16d32 VA-VAE decoder (random weights) in fp32, bf16, fp16: finite, PSNR, ms/image.
* service:  the all-in-one service on the device (embedded Redis, shipped demo model), 32
            concurrent /generate requests, each PNG against the same image made offline; fp32 and
            the GPU default (fp16 + CUDA graphs).
* tensorrt: build_engine.py's TensorRT route where `tensorrt` imports; skipped with the reason.

--dry-run runs every step at tiny sizes on the CPU (what CI runs, so the kit cannot rot);
the numbers it prints are meaningless, the code paths are the same.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import re
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

from bench.gpu_util import (  # noqa: E402
    TINY_VAE,
    StepResult,
    bf16_peak_tflops,
    datasheet_peak,
    device_for,
    log,
    time_ms,
)
from bench.gpu_xl import step_xl, step_xl_compiled  # noqa: E402
from engines.random_bundle import perturb_  # noqa: E402
from engines.torch_backend import TorchEngine  # noqa: E402
from model.bundle import load_bundle  # noqa: E402
from model.sampling import initial_noise, sample  # noqa: E402
from model.vavae import VAVAE, VAVAE_CONFIGS  # noqa: E402
from service.image_formats import psnr  # noqa: E402

GPU_TESTS = ("tests/test_engines.py", "tests/test_gpu.py", "tests/test_gpu_engine.py")


# -- steps (each takes the parsed arguments and a StepResult to save partial results to) -----------
def step_env(a, saver) -> dict:
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


def step_vae(a, saver) -> dict:
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
        saver.save(out)
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


def step_service(a, saver) -> dict:
    from PIL import Image

    from service.launcher import start_service

    dev = device_for(a.dry_run)
    bundle_dir = REPO / "checkpoints" / "demo"
    preset = load_bundle(bundle_dir).spec.default_preset
    n = 8 if a.dry_run else 32
    requests = [{"class_label": i % 10, "seed": 1000 + i} for i in range(n)]
    # fp32, and the GPU default: fp16 (closest low precision, engines/lowp_dit.py) with CUDA graphs and
    # compiled blocks. --configs: e.g. "fp32,fp16+graphs,fp16+graphs+compiled".
    configs = [("fp32", False, False)] if a.dry_run else [("fp32", False, False), ("fp16", True, True)]
    if a.configs:
        configs = [(item.split("+")[0], "graphs" in item.split("+")[1:], "compiled" in item.split("+")[1:])
                   for item in a.configs.split(",")]
    out = {"device": str(dev), "requests": n, "preset": preset, "configs": []}
    for precision, graphs, compiled in configs:
        label = f"{precision}{' graphs' if graphs else ''}{' compiled' if compiled else ''}"
        env = {"LDIT_DEVICE": dev.type if dev.index is None else f"cuda:{dev.index}", "LDIT_PRECISION": precision,
               "LDIT_CUDA_GRAPHS": "true" if graphs else "false", "LDIT_COMPILE": "true" if compiled else "false",
               "LDIT_MODEL_DIR": str(bundle_dir),
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
        log(f"service {label}: {json.dumps({k: v for k, v in res.items() if k != 'model'}, default=str)}")
        out["configs"].append(res)
        saver.save(out)
    return out


def step_tensorrt(a, saver) -> dict:
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


def step_pytest_gpu(a, saver) -> dict:
    """`pytest -m gpu` in a subprocess (its output goes to the log), with the outcome line, the failures and
    the skips with their reasons in the JSON. Exit 5 (nothing collected) counts as a failure."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider", *GPU_TESTS]
    saver.save({"command": " ".join(cmd), "running": True})
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    code = proc.wait()
    outcome = next((ln.strip("= ") for ln in reversed(lines) if re.search(r"\b(passed|failed|skipped|error|no tests)", ln)),
                   "")
    out = {"command": " ".join(cmd), "exit_code": code, "outcome": outcome,
           "failed": [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))],
           "skipped": [ln for ln in lines if ln.startswith("SKIPPED")]}
    if code:
        out["error"] = f"pytest exited {code}"
    return out


def step_summary(a, saver) -> dict:
    """summary.json from the kit's steps.jsonl (the kit itself runs bench/kit_summary.py: no torch import)."""
    from bench.kit_summary import summarize

    return summarize(a.steps, a.dry_run)


STEPS = {"env": step_env, "pytest_gpu": step_pytest_gpu, "xl": step_xl, "xl_compiled": step_xl_compiled,
         "vae": step_vae, "service": step_service, "tensorrt": step_tensorrt, "summary": step_summary}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=sorted(STEPS))
    p.add_argument("--out", type=Path, default=None, help="write DIR/STEP.json (when --result is not given)")
    p.add_argument("--result", type=Path, default=None, help="write the step's JSON here, as it grows")
    p.add_argument("--steps", type=Path, default=None, help="summary: the kit's steps.jsonl")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--configs", default=None,
                   help="xl/xl_compiled: e.g. fp32,bf16+graphs,fp16+graphs+recipe; service: fp32,fp16+graphs")
    a = p.parse_args(argv)
    result_path = a.result or (a.out / ("summary.json" if a.step == "summary" else f"{a.step}.json") if a.out else None)
    if result_path is None:
        p.error("give --result FILE or --out DIR")
    result_path.parent.mkdir(parents=True, exist_ok=True)
    saver = StepResult(result_path)
    if a.dry_run:
        torch.set_num_threads(1)  # tiny sizes; one thread is steadier on a shared CPU
    t0 = time.perf_counter()
    box: dict = {}

    def run():  # the worker runs torch off the main thread too (see bench/common.in_thread)
        try:
            box["result"] = STEPS[a.step](a, saver)
        except BaseException as err:  # noqa: BLE001 - reported in the step's JSON
            traceback.print_exc()
            box["result"] = {"error": f"{type(err).__name__}: {err}"}

    th = threading.Thread(target=run, name=f"gpu_check-{a.step}")
    th.start()
    th.join()
    result = box["result"]
    result["step_seconds"] = round(time.perf_counter() - t0, 1)
    saver.save(result)
    if a.step == "summary":  # the one file meant to be read by people: indented
        result_path.write_text(json.dumps(json.loads(result_path.read_text()), indent=2))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    raise SystemExit(main())

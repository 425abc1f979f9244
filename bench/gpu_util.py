"""What the GPU kit's steps share: devices, timing, peaks and MFU, and the step result file.

A step's result is written as it grows (`StepResult.save`), compact and atomically, so a step that its
time cap kills still leaves everything it measured before; scripts/gpu_check.sh appends that file to
the output folder's steps.jsonl when the step ends, however it ends.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from model.lightningdit import lightningdit_config
from model.vavae import VAVAE_CONFIGS

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s; fp16's are the same on
# these parts. MFU is against these; the fraction of the measured 8192^3 matmul is reported next to it.
# Matched in order against torch's device name: the PCIe/NVL variants before the SXM part they contain.
DATASHEET_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.5), ("H200 NVL", 835.5), ("H100", 989.4),
                         ("H200", 989.4), ("A100", 312.0), ("L40S", 362.05), ("L4", 121.0))
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


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


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


def datasheet_peak(name: str) -> float | None:
    return next((v for k, v in DATASHEET_BF16_TFLOPS if k in name), None)


def utilisation(tflops: float, datasheet: float | None, measured: float) -> dict:
    """MFU against the datasheet's dense peak (None where the part is unknown, e.g. the CPU dry run) and,
    separately, the fraction of the matmul peak measured on this device in the same step."""
    return {"mfu": None if not datasheet else round(tflops / datasheet, 3),
            "of_measured_matmul_peak": round(tflops / measured, 3)}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def plain(value):
    """JSON-safe: numpy scalars as Python numbers, non-finite floats as strings ("inf"), keys as strings."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class StepResult:
    """A step's JSON on disk, rewritten whole (one line, atomically) each time `save` is called."""

    def __init__(self, path: Path | None):
        self.path = path

    def save(self, result: dict) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(plain(result)))
        os.replace(tmp, self.path)

"""(a) Official sampling structure vs our offline sampler, and (c) achieved FLOP/s.

Official structure (what the release's sample loop does): one request at a time, every
step a batch-doubled `forward_with_cfg` (cond + uncond rows on every step, the
unconditional half thrown away outside the CFG interval), fp32 eager PyTorch.

Ours: `model.sampling.sample` over a batch of requests (unconditional rows only for
guided samples, i.e. inside the interval) on an engine (torch fp32, torch bf16,
onnxruntime fp32). Both sample the DiT only (no VAE decode), same weights and preset.
"""

from __future__ import annotations

import time

import torch

from bench.common import Model, dit_flops_per_row, log, progress, rows_per_image
from model.sampling import initial_noise, sample, time_grid


def _noise(model: Model, seeds) -> torch.Tensor:
    return torch.stack([initial_noise(s, model.bundle.spec.latent_shape) for s in seeds])


@torch.inference_mode()
def official_sample(model: Model, seed: int, label: int, bar=None) -> torch.Tensor:
    """One image the way the official loop computes it: [x, x] through forward_with_cfg every step."""
    dit, preset, null = model.bundle.dit, model.preset, model.bundle.null_class
    x = _noise(model, [seed])
    y = torch.tensor([label, null]) if preset.uses_cfg else torch.tensor([label])
    grid = time_grid(preset.num_steps, preset.timestep_shift)
    for n in range(len(grid) - 1):
        t = grid[n].expand(len(y))
        if preset.uses_cfg:
            v = dit.forward_with_cfg(torch.cat([x, x]), t, y, preset.cfg_scale,
                                     cfg_interval=preset.cfg_interval_start is not None,
                                     cfg_interval_start=preset.cfg_interval_start or 0.0)[:1]
        else:
            v = dit(x, t, y)
        x = x + (grid[n + 1] - grid[n]) * v
        if bar is not None:
            bar.update(1)
    return x[0]


def run_official(model: Model, images: int) -> dict:
    bar = progress(images * (model.preset.num_steps - 1), f"{model.key} official fp32")
    t0 = time.perf_counter()
    out = [official_sample(model, s, s % model.bundle.spec.num_classes, bar) for s in range(images)]
    secs = time.perf_counter() - t0
    bar.close()
    return {"images": images, "seconds": secs, "images_per_s": images / secs, "first": out[0],
            "rows": images * rows_per_image(model.preset, official=True)}


def run_ours(model: Model, engine, images: int, batch: int, desc: str) -> dict:
    steps = model.preset.num_steps - 1
    bar = progress(steps * -(-images // batch), f"{model.key} {desc} b{batch}")
    first = None
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, images, batch):
            seeds = list(range(start, min(images, start + batch)))
            noise = _noise(model, seeds).to(engine.device)
            labels = torch.tensor([s % model.bundle.spec.num_classes for s in seeds], device=engine.device)
            x = sample(engine.velocity, noise, labels, model.preset, model.bundle.null_class,
                       progress=lambda *_: bar.update(1))
            if first is None:
                first = x[0].float().cpu()
    secs = time.perf_counter() - t0
    bar.close()
    return {"images": images, "seconds": secs, "images_per_s": images / secs, "first": first,
            "rows": images * rows_per_image(model.preset, official=False)}


def make_engines(model: Model, names: list[str], max_rows: int, tmp) -> dict:
    """name -> factory; ORT gets ONNX artifacts exported to tmp (dynamic batch)."""
    from engines.torch_backend import TorchEngine

    out = {}
    for name in names:
        if name == "torch-fp32":
            out[name] = lambda: TorchEngine(model.bundle, "cpu", "fp32", max_rows)
        elif name == "torch-bf16":
            out[name] = lambda: TorchEngine(model.bundle, "cpu", "bf16", max_rows)
        elif name == "onnxruntime":
            def ort():
                from engines import load_engine
                from engines.artifacts import export_and_validate, write_onnx_manifest

                d = tmp / f"onnx-{model.key}"
                report = export_and_validate(model.bundle, d, batch_sizes=(1,))
                write_onnx_manifest(model.bundle, d, report, profile={"min": 1, "opt": max_rows, "max": max_rows})
                return load_engine(model.bundle, "onnxruntime", "cpu", engine_dir=d, max_rows=max_rows)
            out[name] = ort
        else:
            raise ValueError(f"unknown engine {name!r}")
    return out


def compare(model: Model, official_images: int, our_images: int, batch: int, engines: list[str], max_rows: int,
            tmp, flops_row: int) -> dict:
    """Images/s of each structure, speedups over the official one, achieved GFLOP/s."""
    log(f"[offline] {model.label}: preset {model.preset}; rows/image official "
        f"{rows_per_image(model.preset, True)}, ours {rows_per_image(model.preset, False)}")
    res = {"official fp32": run_official(model, official_images)}
    ref = res["official fp32"]["first"]
    for name, make in make_engines(model, engines, max_rows, tmp).items():
        log(f"[offline] {model.key}: loading {name}")
        eng = make()
        # warm-up: one small forward per distinct row count the sampler will use
        with torch.inference_mode():
            c, h, w = model.bundle.spec.latent_shape
            for r in sorted({batch, 2 * batch} if model.preset.uses_cfg else {batch}):
                eng.velocity(torch.randn(r, c, h, w), torch.rand(r), torch.zeros(r, dtype=torch.long))
        res[name] = run_ours(model, eng, our_images, batch, name)
        eng.close()
    base = res["official fp32"]["images_per_s"]
    for r in res.values():
        r["speedup"] = r["images_per_s"] / base
        r["gflops_per_s"] = r["rows"] * flops_row / r["seconds"] / 1e9
        r["max_abs_diff_vs_official"] = float((r.pop("first").float() - ref).abs().max())
    return res


def count_row_flops(model: Model) -> int:
    return dit_flops_per_row(model.bundle)

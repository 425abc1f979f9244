#!/usr/bin/env python
"""Engine benchmark (CPU, and CUDA/TensorRT where present): forward time, GFLOP/s and % of measured GEMM peak.

    python bench/engines.py --quick          # under ~2 minutes on 2 threads
    python bench/engines.py                  # batches 1,4,8,16, ORT for B/1 too, the full-size decoder
    python bench/engines.py --write-docs     # also replace the "## Engines (CPU)" section of docs/benchmarks.md

Models (random weights): LightningDiT-B/1 at 16x16x32 latents, a demo-sized DiT
(8x8 latents) and their VA-VAE decoders. FLOPs are counted with
torch.utils.flop_counter (a multiply-add = 2 FLOPs). Peaks are 2048^3 matmuls in
fp32 and bf16, measured in the same run before and after the model timings (the
machine is shared: ratios measured side by side are what count). Image quality of
bf16: PSNR of uint8 images against fp32 through the sampler.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import count_flops, dit_flops_per_row  # noqa: E402
from bench.common import make_b1_bundle as common_b1_bundle  # noqa: E402
from engines.random_bundle import DEMO_DIT, DEMO_VAE_DDCONFIG, make_random_bundle  # noqa: E402
from engines.torch_backend import TorchEngine  # noqa: E402
from model.bundle import load_bundle  # noqa: E402
from model.sampling import SamplerPreset, initial_noise, sample  # noqa: E402

# f4 decoder with 32 latent channels for B/1's 16x16x32 latents (64x64 images), as small as the demo's.
B1_VAE_DDCONFIG = dict(DEMO_VAE_DDCONFIG, z_channels=32, attn_resolutions=[16])


def log(msg: str) -> None:
    print(msg, flush=True)


def best_time(fn, repeats: int) -> float:
    with torch.inference_mode():
        fn()  # warm-up: allocations, oneDNN kernel creation
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(times)  # the least disturbed run: other processes share these cores


def gemm_peaks(repeats: int) -> dict:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    flops = 2 * 2048**3
    out = {"fp32": flops / best_time(lambda: a @ b, repeats) / 1e9}
    ab, bb = a.bfloat16(), b.bfloat16()
    out["bf16"] = flops / best_time(lambda: ab @ bb, repeats) / 1e9
    return out


def make_b1_bundle(root: Path) -> Path:
    return common_b1_bundle(root, SamplerPreset(num_steps=6, cfg_scale=4.0, cfg_interval_start=0.1, timestep_shift=0.3))


def engines_for(bundle, with_ort: bool, tmp: Path, max_rows: int) -> dict:
    out = {
        "torch fp32": lambda: TorchEngine(bundle, "cpu", "fp32", max_rows),
        "torch bf16 autocast": lambda: TorchEngine(bundle, "cpu", "bf16", max_rows, bf16_mode="autocast"),
        "torch bf16 weights": lambda: TorchEngine(bundle, "cpu", "bf16", max_rows),
    }
    if with_ort:
        def ort():
            from engines import load_engine
            from engines.artifacts import export_and_validate, write_onnx_manifest

            d = tmp / f"onnx-{bundle.spec.name}"
            report = export_and_validate(bundle, d, batch_sizes=(1,))
            write_onnx_manifest(bundle, d, report, profile={"min": 1, "opt": 1, "max": max_rows})
            return load_engine(bundle, "onnxruntime", "cpu", engine_dir=d, max_rows=max_rows)
        out["onnxruntime fp32"] = ort
    if torch.cuda.is_available():
        out["torch cuda fp16 + graphs"] = lambda: TorchEngine(bundle, "cuda", "fp16", max_rows, cuda_graphs=True)
    return out


def images(engine, bundle, n: int = 2) -> torch.Tensor:
    preset = bundle.spec.presets[bundle.spec.default_preset]
    noise = torch.stack([initial_noise(s, bundle.spec.latent_shape) for s in range(n)]).to(engine.device)
    labels = torch.arange(n, device=engine.device) % bundle.spec.num_classes
    with torch.inference_mode():
        x = sample(engine.velocity, noise, labels, preset, bundle.null_class)
        return engine.decode(bundle.stats.denormalize(x))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(255.0**2 / mse)).item()


def bench_model(label: str, bundle, batches, repeats, with_ort, tmp, peaks_ref: dict, rows_out: list) -> dict:
    vae = bundle.vae
    c, h, w = bundle.spec.latent_shape
    flops_row = dit_flops_per_row(bundle)
    flops_img = count_flops(lambda: vae.decode(torch.randn(1, c, h, w)))
    log(f"{label}: {flops_row / 1e9:.2f} GFLOP per DiT row, {flops_img / 1e9:.2f} GFLOP per decode")
    quality = {}
    ref_images = None
    for name, make in engines_for(bundle, with_ort, tmp, max(batches)).items():
        log(f"  {label} / {name}: loading")
        engine = make()
        dev = engine.device
        for rows in batches:
            g = torch.Generator().manual_seed(rows)
            x = torch.randn(rows, c, h, w, generator=g).to(dev)
            t = torch.rand(rows, generator=g).to(dev)
            y = torch.randint(0, bundle.spec.num_classes, (rows,), generator=g).to(dev)
            sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
            sec = best_time(lambda e=engine, x=x, t=t, y=y, s=sync: (e.velocity(x, t, y), s()), repeats)
            gflops = flops_row * rows / sec / 1e9
            peak = peaks_ref["bf16"] if "bf16" in name else peaks_ref["fp32"]
            row = dict(model=label, part="DiT", backend=name, rows=rows, ms=sec * 1e3, gflops=gflops,
                       pct_fp32_peak=100 * gflops / peaks_ref["fp32"], pct_bf16_peak=100 * gflops / peaks_ref["bf16"],
                       pct_own_peak=100 * gflops / peak)
            rows_out.append(row)
            log(f"    DiT rows={rows:<3d} {sec * 1e3:9.1f} ms {gflops:7.1f} GFLOP/s "
                f"({row['pct_fp32_peak']:.0f}% fp32 peak, {row['pct_bf16_peak']:.0f}% bf16 peak)")
        zb = min(4, max(batches))
        z = torch.randn(zb, c, h, w).to(dev)
        sec = best_time(lambda e=engine, z=z: e.decode(z), max(1, repeats - 1))
        gflops = flops_img * zb / sec / 1e9
        rows_out.append(dict(model=label, part="VAE decode", backend=name, rows=zb, ms=sec * 1e3, gflops=gflops,
                             pct_fp32_peak=100 * gflops / peaks_ref["fp32"],
                             pct_bf16_peak=100 * gflops / peaks_ref["bf16"]))
        log(f"    decode n={zb} {sec * 1e3:9.1f} ms {gflops:7.1f} GFLOP/s")
        img = images(engine, bundle)
        if ref_images is None:
            ref_images = img
        else:
            quality[name] = psnr(ref_images, img)
            log(f"    sampler images vs torch fp32: PSNR {quality[name]:.1f} dB")
        engine.close()
    return {"flops_row": flops_row, "flops_decode": flops_img, "psnr_vs_fp32": quality}


def markdown(result: dict, command: str) -> str:
    p0, p1 = result["peaks_before"], result["peaks_after"]
    lines = [
        "## Engines (CPU)",
        "",
        f"Machine: {result['cpu']}, {result['threads']} threads (torch.set_num_threads), shared with other "
        f"processes (1-min load average {result['load'][0]:.1f} at start, {result['load'][1]:.1f} at end); "
        f"torch {result['torch']}. Command: `{command}` ({result['seconds']:.0f} s).",
        "",
        f"GEMM peaks (2048^3 matmul, best of runs, before / after the model runs): fp32 "
        f"{p0['fp32']:.0f} / {p1['fp32']:.0f} GFLOP/s, bf16 {p0['bf16']:.0f} / {p1['bf16']:.0f} GFLOP/s; "
        f"percentages use the larger of each pair. "
        "Times are the best of the repeats (least disturbed by other processes).",
        "",
        "| model | part | backend | rows | ms | GFLOP/s | % fp32 peak | % bf16 peak |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['part']} | {r['backend']} | {r['rows']} | {r['ms']:.1f} | "
                     f"{r['gflops']:.0f} | {r['pct_fp32_peak']:.0f} | {r['pct_bf16_peak']:.0f} |")
    lines += ["", "Image quality through the sampler (uint8 PSNR against torch fp32, same seeds):", ""]
    for model, info in result["models"].items():
        q = ", ".join(f"{k} {v:.1f} dB" for k, v in info["psnr_vs_fp32"].items())
        lines.append(f"- {model} ({info['flops_row'] / 1e9:.2f} GFLOP/row, decode "
                     f"{info['flops_decode'] / 1e9:.2f} GFLOP/image): {q}")
    lines.append("")
    return "\n".join(lines)


def write_docs_section(text: str) -> None:
    path = REPO / "docs" / "benchmarks.md"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    head = "## Engines (CPU)"
    if head in old:
        before, rest = old.split(head, 1)
        nxt = rest.find("\n## ")
        after = rest[nxt + 1:] if nxt >= 0 else ""
        new = before + text + ("\n" + after if after else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.parent.mkdir(exist_ok=True)
    path.write_text(new)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="batches 1,8; ORT only for the demo model; ~2 min")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-docs", action="store_true", help="replace the Engines (CPU) section of docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    batches = (1, 8) if args.quick else (1, 4, 8, 16)
    repeats = 2 if args.quick else 3
    load_start = os.getloadavg()[0]
    log(f"engine benchmark on {cpu_name()}, {args.threads} threads, batches {batches}")
    peaks_before = gemm_peaks(5)
    log(f"GEMM peaks: fp32 {peaks_before['fp32']:.0f} GFLOP/s, bf16 {peaks_before['bf16']:.0f} GFLOP/s")
    rows: list = []
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        b1 = load_bundle(make_b1_bundle(tmp / "b1"))
        demo = load_bundle(make_random_bundle(tmp / "demo", DEMO_DIT, DEMO_VAE_DDCONFIG))
        peaks = dict(peaks_before)
        models["LightningDiT-B/1 (16x16x32)"] = bench_model("B/1", b1, batches, repeats, not args.quick, tmp, peaks, rows)
        models["demo-sized DiT (8x8x16)"] = bench_model("demo", demo, batches, repeats, True, tmp, peaks, rows)
    peaks_after = gemm_peaks(5)
    log(f"GEMM peaks after: fp32 {peaks_after['fp32']:.0f}, bf16 {peaks_after['bf16']:.0f} GFLOP/s")
    best = {k: max(peaks_before[k], peaks_after[k]) for k in peaks_before}
    for r in rows:  # percentages against the best peak seen in this run
        r["pct_fp32_peak"] = 100 * r["gflops"] / best["fp32"]
        r["pct_bf16_peak"] = 100 * r["gflops"] / best["bf16"]
    result = dict(cpu=cpu_name(), threads=args.threads, load=(load_start, os.getloadavg()[0]), torch=torch.__version__, peaks_before=peaks_before,
                  peaks_after=peaks_after, rows=rows, models=models, seconds=time.perf_counter() - t_start)
    out_dir = REPO / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "engines.json").write_text(json.dumps(result, indent=1))
    command = "python bench/engines.py" + (" --quick" if args.quick else "") + " --write-docs"
    text = markdown(result, command)
    print("\n" + text)
    if args.write_docs:
        write_docs_section(text)
        log("wrote the Engines (CPU) section of docs/benchmarks.md")


if __name__ == "__main__":
    main()

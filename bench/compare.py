#!/usr/bin/env python
"""Side-by-side benchmark in one run on one machine:

  (a) official sampling structure vs our offline sampler on each backend (images/s),
  (b) the service at saturation vs the engine alone (serving overhead %),
  (c) achieved DiT GFLOP/s vs the fp32/bf16 2048^3 matmul peaks measured in the same run.

    python bench/compare.py --quick                    # < 2 minutes: demo model, B/1 forward FLOP/s only
    python bench/compare.py                            # demo model and LightningDiT-B/1 (long: ~30 min on 2 cores)
    python bench/compare.py --models demo --out bench/out

Writes <out>/compare.json and <out>/compare.md (the tables of docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import offline, overhead  # noqa: E402
from bench.common import REPO, best_of, gemm_peaks, in_thread, load_model, log, machine, rows_per_image, setup_threads  # noqa: E402


def forward_gflops(model, precision: str, rows: int, flops_row: int, repeats: int) -> float:
    from engines.torch_backend import TorchEngine

    eng = TorchEngine(model.bundle, "cpu", precision, max(16, rows))
    c, h, w = model.bundle.spec.latent_shape
    x, t, y = torch.randn(rows, c, h, w), torch.rand(rows), torch.arange(rows) % model.bundle.spec.num_classes
    with torch.inference_mode():
        secs = best_of(lambda: eng.velocity(x, t, y), repeats)
    return rows * flops_row / secs / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="demo model (a)+(b), B/1 forward FLOP/s only; < 2 min")
    p.add_argument("--models", default="demo,b1")
    p.add_argument("--parts", default="a,b,c", help="which of a (offline), b (overhead), c (FLOP/s)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    p.add_argument("--max-rows", type=int, default=16, help="engine rows (LDIT_MAX_BATCH_SIZE)")
    p.add_argument("--batch", type=int, default=8, help="requests per offline batch (guided: 2x rows)")
    p.add_argument("--demo-engines", default="torch-fp32,torch-bf16,onnxruntime")
    p.add_argument("--b1-engines", default="torch-fp32,torch-bf16,onnxruntime")
    p.add_argument("--b1-official-images", type=int, default=1)
    p.add_argument("--b1-images", type=int, default=8)
    p.add_argument("--overhead-backend", default="torch:fp32", help="backend:precision of part (b)")
    p.add_argument("--overhead-rounds", type=int, default=2)
    args = p.parse_args(argv)
    setup_threads()
    return in_thread(run, args)


def run(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    models = args.models.split(",")
    started = time.time()
    result: dict = {"machine": machine(), "argv": sys.argv[1:], "quick": args.quick, "models": {}}
    log(f"machine: {result['machine']}")
    result["peaks_before"] = gemm_peaks()
    log(f"GEMM peaks (GFLOP/s): {result['peaks_before']}")
    with tempfile.TemporaryDirectory(prefix="ldit-bench-") as tmp:
        tmp = Path(tmp)
        for key in models:
            m = load_model(key, tmp)
            fr = offline.count_row_flops(m)
            entry = {"label": m.label, "note": m.note, "preset": m.preset.to_dict(), "gflop_per_row": fr / 1e9,
                     "rows_per_image": {"official": rows_per_image(m.preset, True),
                                        "ours": rows_per_image(m.preset, False)}}
            result["models"][key] = entry
            log(f"== {m.label}: {fr / 1e9:.3f} GFLOP/row, rows/image {entry['rows_per_image']}")
            is_b1 = key == "b1"
            if "a" in parts and not (args.quick and is_b1):
                if is_b1:
                    oi, ours, engines = args.b1_official_images, args.b1_images, args.b1_engines.split(",")
                else:
                    oi, ours, engines = (4, 16, ["torch-fp32", "torch-bf16"]) if args.quick else \
                        (8, 32, args.demo_engines.split(","))
                entry["offline"] = offline.compare(m, oi, ours, args.batch, engines, args.max_rows, tmp, fr)
                for name, r in entry["offline"].items():
                    log(f"   {name:14s} {r['images_per_s']:.4f} img/s  x{r['speedup']:.2f}  "
                        f"{r['gflops_per_s']:.1f} GFLOP/s  diff {r['max_abs_diff_vs_official']:.2e}")
            if "b" in parts and not is_b1:
                backend, precision = args.overhead_backend.split(":")
                total, warm = (24, 4) if args.quick else (96, 16)
                entry["overhead"] = overhead.compare(
                    m, backend, precision, clients=2 * args.max_rows, total=total, warmup=warm,
                    max_rows=args.max_rows, rounds=1 if args.quick else args.overhead_rounds)
                log(f"   overhead: {entry['overhead']}")
            if "c" in parts:
                reps = 1 if args.quick else (2 if is_b1 else 5)
                entry["forward_gflops"] = {
                    f"{prec} b{rows}": forward_gflops(m, prec, rows, fr, reps)
                    for prec in ("fp32", "bf16") for rows in ((8,) if args.quick or is_b1 else (8, 16))}
                log(f"   forward GFLOP/s: {entry['forward_gflops']}")
    result["peaks_after"] = gemm_peaks()
    result["seconds"] = time.time() - started
    log(f"GEMM peaks after (GFLOP/s): {result['peaks_after']}; total {result['seconds']:.0f} s")
    (args.out / "compare.json").write_text(json.dumps(result, indent=2))
    (args.out / "compare.md").write_text(markdown(result))
    log(f"wrote {args.out / 'compare.md'}")
    return 0


def markdown(res: dict) -> str:
    peak = {k: max(res["peaks_before"][k], res["peaks_after"][k]) for k in ("fp32", "bf16")}
    lines = [f"Machine: {res['machine']['cpu']}, {res['machine']['torch_threads']} torch threads, "
             f"load average at start {res['machine']['loadavg']}; run took {res['seconds']:.0f} s.",
             f"GEMM peak (2048^3, best of 5, max of before/after): fp32 {peak['fp32']:.0f} GFLOP/s, "
             f"bf16 {peak['bf16']:.0f} GFLOP/s (before {res['peaks_before']['fp32']:.0f}/"
             f"{res['peaks_before']['bf16']:.0f}, after {res['peaks_after']['fp32']:.0f}/"
             f"{res['peaks_after']['bf16']:.0f}).", ""]
    for _key, e in res["models"].items():
        lines += [f"### {e['label']}", "", f"{e['note']}. Preset {e['preset']}; {e['gflop_per_row']:.3f} GFLOP per "
                  f"DiT row; rows per image: official {e['rows_per_image']['official']}, ours "
                  f"{e['rows_per_image']['ours']}.", ""]
        if "offline" in e:
            lines += ["| structure | images | seconds | images/s | vs official | GFLOP/s | % bf16 peak | max abs diff vs official |",
                      "|---|---|---|---|---|---|---|---|"]
            for name, r in e["offline"].items():
                lines.append(f"| {name} | {r['images']} | {r['seconds']:.1f} | {r['images_per_s']:.4g} | "
                             f"{r['speedup']:.2f}x | {r['gflops_per_s']:.1f} | {100 * r['gflops_per_s'] / peak['bf16']:.0f}% | "
                             f"{r['max_abs_diff_vs_official']:.1e} |")
            lines.append("")
        if "overhead" in e:
            o = e["overhead"]
            lines += [f"Serving overhead ({o['backend']}, {o['clients']} closed-loop clients, {o['requests']} requests, "
                      f"first {o['warmup']} not counted, max_rows {o['max_rows']}): engine alone "
                      f"{', '.join(f'{x:.3g}' for x in o['engine_images_per_s'])} img/s, service "
                      f"{', '.join(f'{x:.3g}' for x in o['service_images_per_s'])} img/s (per round) -> "
                      f"overhead **{o['overhead_pct']:.1f}%** (best round of each).", ""]
        if "forward_gflops" in e:
            lines += ["| DiT forward | GFLOP/s | % fp32 peak | % bf16 peak |", "|---|---|---|---|"]
            for name, g in e["forward_gflops"].items():
                lines.append(f"| {name} | {g:.1f} | {100 * g / peak['fp32']:.0f}% | {100 * g / peak['bf16']:.0f}% |")
            lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

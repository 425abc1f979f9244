"""torch fp32 vs ONNX Runtime fp32 on CPU through the sampler, side by side in one run.

    python bench/cpu_backends.py                     # demo model, batches of 1, 4 and 16 requests
    python bench/cpu_backends.py --batches 1,8 --images 32 --rounds 5

For each batch size (requests sampled together, as the worker batches them) both engines
sample the same images with the model's preset (DiT only, no VAE decode), alternating
engine by engine for `--rounds` rounds; the best round of each counts (least disturbed by
other processes). Prints a markdown table: images/s of each and the ORT/torch ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import THREADS, load_model, log, machine  # noqa: E402
from bench.offline import make_engines, run_ours  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="demo or b1 (see bench/common.py)")
    p.add_argument("--batches", default="1,4,16", help="requests per batch")
    p.add_argument("--images", type=int, default=32, help="images per engine per round")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(THREADS)
    log(f"machine: {machine()}")
    batches = [int(b) for b in a.batches.split(",")]
    with tempfile.TemporaryDirectory(prefix="ldit-bench-") as tmp:
        model = load_model(a.model, Path(tmp))
        rows = 2 * max(batches) if model.preset.uses_cfg else max(batches)
        engines = {name: make() for name, make in make_engines(model, ["torch-fp32", "onnxruntime"], rows,
                                                                Path(tmp)).items()}
        best = {(name, b): 0.0 for name in engines for b in batches}
        for r in range(a.rounds):
            for b in batches:
                for name, eng in engines.items():
                    ips = run_ours(model, eng, max(b, a.images // b * b), b, name)["images_per_s"]
                    best[name, b] = max(best[name, b], ips)
            log(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{n} b{b} {v:.1f}" for (n, b), v in best.items()))
    print(f"\n{model.label}, preset {model.preset.to_dict()}, {THREADS} threads, best of {a.rounds} rounds\n")
    print("| requests per batch | torch fp32 img/s | onnxruntime img/s | onnxruntime / torch |\n|---|---|---|---|")
    for b in batches:
        t, o = best["torch-fp32", b], best["onnxruntime", b]
        print(f"| {b} | {t:.1f} | {o:.1f} | {o / t:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

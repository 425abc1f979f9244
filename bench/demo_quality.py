"""Quality numbers of the digits demo bundle (the ones docs/demo-model.md reports).

    python bench/demo_quality.py                       # checkpoints/demo, its default preset
    python bench/demo_quality.py --tune                # grid-search sampler settings on held-out seeds

Generates 100 images per class (seeds 0..99) and scores them in the digits' own
8x8 space with tools fitted on the real digits only: an RBF-SVM's accuracy on the
requested class, and the Fréchet distance in the PCA-64 basis of the real 8x8
pixels (reference: the distance between two halves of the real set).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from model.bundle import load_bundle
from model.sampling import SamplerPreset
from training.digit_eval import (
    class_grid_requests,
    fit_classifier,
    fit_pca,
    frechet_distance,
    generate_digits,
    real_digits,
    score,
)


def real_halves_fd() -> float:
    x, _ = real_digits()
    order = np.random.default_rng(0).permutation(len(x))
    mean, comps = fit_pca(x, 64)
    a, b = x[order[: len(x) // 2]], x[order[len(x) // 2 :]]
    return frechet_distance((a - mean) @ comps.T, (b - mean) @ comps.T)


@torch.no_grad()
def vae_reconstruction_fd(bundle_dir: Path) -> float:
    """The same distance for VA-VAE reconstructions of the real digits: the floor the VAE sets."""
    from model.latents import to_uint8
    from training.demo_data import digits_to_images, images_to_digits, load_digits_8x8

    vae = load_bundle(bundle_dir, with_encoder=True).vae
    raw, _ = load_digits_8x8()
    recon = to_uint8(vae.decode(vae.encode(digits_to_images(raw), sample=False)))
    x, _ = real_digits()
    mean, comps = fit_pca(x, 64)
    return frechet_distance((x - mean) @ comps.T, (images_to_digits(recon) - mean) @ comps.T)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def evaluate(bundle_dir: Path, preset_name: str | None, per_class: int, first_seed: int) -> dict:
    bundle = load_bundle(bundle_dir)
    name = preset_name or bundle.spec.default_preset
    preset = bundle.spec.presets[name]
    labels, seeds = class_grid_requests(per_class, bundle.spec.num_classes, first_seed)
    start = time.time()
    images = generate_digits(bundle, preset, labels, seeds)
    gen_s = time.time() - start
    result = score(images, labels)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    files = [p for p in bundle_dir.iterdir() if p.is_file()]
    return {
        "bundle": str(bundle_dir), "version": manifest.get("version"), "preset": name, "preset_fields": preset.to_dict(),
        "images": len(labels), "seeds": f"{first_seed}..{first_seed + per_class - 1} per class",
        **result, "frechet_pca64_real_halves": real_halves_fd(),
        "frechet_pca64_vae_reconstructions": vae_reconstruction_fd(bundle_dir),
        "generate_seconds": round(gen_s, 1), "torch_threads": torch.get_num_threads(),
        "dit_parameters": count(bundle.dit), "vae_decoder_parameters": count(bundle.vae.decoder)
        + count(bundle.vae.post_quant_conv),
        "bundle_bytes": sum(p.stat().st_size for p in files),
        "dit_train_seconds": manifest.get("train_seconds"), "dit_steps": manifest.get("step"),
    }


def tune(bundle_dir: Path, per_class: int) -> list[dict]:
    """Coordinate search over sampler settings on held-out seeds 1000.. (never the gate's 0..99):
    first the time shift without CFG, then the CFG rule/scale/interval, then the step count."""
    bundle = load_bundle(bundle_dir)
    labels, seeds = class_grid_requests(per_class, bundle.spec.num_classes, first_seed=1000)
    real_x, real_y = real_digits()
    classifier = fit_classifier(real_x, real_y)
    rows = []

    def run(preset: SamplerPreset) -> dict:
        result = score(generate_digits(bundle, preset, labels, seeds), labels, classifier)
        rows.append({**preset.to_dict(), "accuracy": result["accuracy"], "frechet_pca64": result["frechet_pca64"]})
        print(json.dumps(rows[-1]), flush=True)
        return rows[-1]

    def best(candidates: list[dict]) -> SamplerPreset:
        top = min(candidates, key=lambda r: (-r["accuracy"], r["frechet_pca64"]))
        return SamplerPreset(**{k: top[k] for k in SamplerPreset.__dataclass_fields__})

    base = best([run(SamplerPreset(num_steps=16, timestep_shift=s)) for s in (0.0, 0.3, 0.5)])
    cfg_runs = [
        run(replace(base, cfg_scale=scale, cfg_interval_start=start, cfg_channels=channels))
        for channels, scale, start in itertools.product((3, None), (1.5, 2.0, 3.0, 4.0), (None, 0.15))
    ]
    base = best(cfg_runs)
    best([run(replace(base, num_steps=n)) for n in (8, 12, 16, 24)])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=Path("checkpoints/demo"))
    p.add_argument("--preset", default=None, help="default: the bundle's default preset")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--tune", action="store_true", help="search sampler settings on seeds 1000.. instead")
    p.add_argument("--tune-per-class", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.tune:
        rows = tune(a.bundle, a.tune_per_class)
        best = sorted(rows, key=lambda r: (-r["accuracy"], r["frechet_pca64"]))[:10]
        print("best:\n" + "\n".join(json.dumps(r) for r in best))
        return
    result = evaluate(a.bundle, a.preset, a.per_class, a.first_seed)
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

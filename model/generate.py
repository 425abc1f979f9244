"""Offline generation to PNG.

    python -m model.generate --class 3 --seed 0 --out three.png
    python -m model.generate --class 1 --class 7 --seed 0 --seed 1 --out samples/ --grid

Defaults: the shipped demo bundle (checkpoints/demo) and its default preset.
With one class and one seed, --out is the PNG; otherwise a directory holding
class{K}_seed{S}.png for every (class, seed) pair (plus grid.png with --grid).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from model.bundle import ModelBundle, load_bundle
from model.classes import UnknownClass
from model.latents import to_uint8
from model.sampling import SamplerPreset, initial_noise, sample

DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "checkpoints" / "demo"


def resolve_class(bundle: ModelBundle, label: str | int) -> int:
    """A class id, a digit string, or a class name or synonym (model/classes.py)."""
    try:
        return bundle.spec.classes.resolve(label)
    except UnknownClass as err:
        hint = f" (did you mean: {', '.join(err.suggestions)}?)" if err.suggestions else ""
        raise ValueError(f"{err}{hint}") from None


@torch.no_grad()
def generate(
    bundle: ModelBundle,
    classes: list[int],
    seeds: list[int],
    preset: SamplerPreset,
    batch_size: int = 16,
    velocity=None,
    progress: bool = False,
) -> np.ndarray:
    """uint8 images [N, H, W, 3] for the (class, seed) pairs, in order, generated in batches."""
    velocity = velocity or bundle.dit
    device = next(bundle.dit.parameters()).device
    out = []
    batches = range(0, len(classes), batch_size)
    bar = tqdm(total=len(batches) * (preset.num_steps - 1), disable=not progress, unit="step", desc="sampling")
    for start in batches:
        cls = classes[start : start + batch_size]
        noise = torch.stack([initial_noise(s, bundle.spec.latent_shape) for s in seeds[start : start + batch_size]])
        labels = torch.tensor(cls, dtype=torch.long, device=device)
        x = sample(velocity, noise.to(device), labels, preset, bundle.null_class, progress=lambda *_: bar.update(1))
        images = bundle.vae.decode(bundle.stats.denormalize(x))
        out.append(to_uint8(images).cpu().numpy())
    bar.close()
    return np.concatenate(out)


def tile(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    sheet = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, columns)
        sheet[r * h : (r + 1) * h, q * w : (q + 1) * w] = img
    return sheet


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--class", dest="classes", action="append", required=True, help="class id or name (repeatable)")
    p.add_argument("--seed", dest="seeds", action="append", type=int, required=True, help="seed (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="PNG path (one pair) or output directory")
    p.add_argument("--model-dir", type=Path, default=DEFAULT_BUNDLE, help="model bundle directory")
    p.add_argument("--preset", help="sampler preset name (default: the bundle's)")
    p.add_argument("--steps", type=int, help="grid points (e.g. 250 = 249 Euler steps)")
    p.add_argument("--cfg-scale", type=float)
    p.add_argument("--cfg-interval-start", type=float)
    p.add_argument("--timestep-shift", type=float)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grid", action="store_true", help="also write a tiled sheet (grid.png, or PATH for one pair)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    bundle = load_bundle(args.model_dir, device=args.device)
    name = args.preset or bundle.spec.default_preset
    if name not in bundle.spec.presets:
        p.error(f"unknown preset {name!r}; this model has {sorted(bundle.spec.presets)}")
    preset = bundle.spec.presets[name].replace(
        num_steps=args.steps, cfg_scale=args.cfg_scale, cfg_interval_start=args.cfg_interval_start,
        timestep_shift=args.timestep_shift,
    )
    try:
        class_ids = [resolve_class(bundle, c) for c in args.classes]
    except ValueError as err:
        p.error(str(err))
    pairs = list(itertools.product(class_ids, args.seeds))
    images = generate(bundle, [c for c, _ in pairs], [s for _, s in pairs], preset, args.batch_size, progress=True)

    if len(pairs) == 1 and args.out.suffix.lower() == ".png":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[0]).save(args.out)
        written = [args.out]
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        written = []
        for (c, s), img in zip(pairs, images, strict=True):
            path = args.out / f"class{c}_seed{s}.png"
            Image.fromarray(img).save(path)
            written.append(path)
        if args.grid:
            sheet = args.out / "grid.png"
            Image.fromarray(tile(images, columns=len(args.seeds))).save(sheet)
            written.append(sheet)
    print(f"wrote {len(written)} file(s) to {written[0] if len(written) == 1 else args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Offline generation to PNG.

    python -m model.generate --class 3 --seed 0 --out three.png
    python -m model.generate --class 1 --class 7 --seed 0 --seed 1 --out samples/ --grid
    python -m model.generate --classes all --per-class 50 --npz samples.npz      # a sample set for FID

Defaults: the shipped demo bundle (checkpoints/demo) and its default preset.
With one class and one seed, --out is the PNG; otherwise a directory holding
class{K}_seed{S}.png for every (class, seed) pair (plus grid.png with --grid).
With --npz: a sample set in the ADM evaluator's format (arr_0 uint8 [N, H, W, 3],
class-major, seeds seed_start + j; arr_1 labels), the same images as the service's
POST /batches; images go to a raw temporary file as they are made, never all in memory.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from model.bundle import ModelBundle, load_bundle
from model.classes import UnknownClass
from model.latents import to_uint8
from model.sample_sets import npz_chunks, raw_chunks, sample_index
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


def generate_set(bundle: ModelBundle, classes: list[int], per_class: int, seed_start: int, preset: SamplerPreset,
                 out: Path, batch_size: int = 16, progress: bool = True) -> tuple[int, ...]:
    """Write the sample set's .npz to `out`; returns arr_0's shape."""
    labels, seeds = sample_index(classes, per_class, seed_start)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".u8") as raw:
        bar = tqdm(total=len(labels), disable=not progress, unit="image", desc="sample set")
        for start in range(0, len(labels), batch_size):
            part = slice(start, start + batch_size)
            images = generate(bundle, labels[part].tolist(), seeds[part].tolist(), preset, batch_size)
            raw.write(images.tobytes())
            bar.update(len(images))
        bar.close()
        raw.flush()
        shape = (len(labels), *images.shape[1:])
        with open(partial, "wb") as f:
            for chunk in npz_chunks(raw_chunks(Path(raw.name)), shape, labels):
                f.write(chunk)
    os.replace(partial, out)
    return shape


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
    p.add_argument("--class", dest="classes", action="append", help="class id or name (repeatable)")
    p.add_argument("--seed", dest="seeds", action="append", type=int, help="seed (repeatable)")
    p.add_argument("--out", type=Path, help="PNG path (one pair) or output directory")
    p.add_argument("--classes", dest="set_classes", help='sample set: "all" or comma-separated class ids/names')
    p.add_argument("--per-class", type=int, help="sample set: images of each class")
    p.add_argument("--seed-start", type=int, default=0, help="sample set: seed of each class's first image")
    p.add_argument("--npz", type=Path, help="sample set: write the ADM-format .npz here")
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
    sample_set = args.npz is not None
    if sample_set and (not args.set_classes or not args.per_class or args.per_class < 1):
        p.error("--npz needs --classes (all, or a comma-separated list) and --per-class K >= 1")
    if not sample_set and not (args.classes and args.seeds and args.out):
        p.error("give --class, --seed and --out (or --classes, --per-class and --npz for a sample set)")

    bundle = load_bundle(args.model_dir, device=args.device)
    name = args.preset or bundle.spec.default_preset
    if name not in bundle.spec.presets:
        p.error(f"unknown preset {name!r}; this model has {sorted(bundle.spec.presets)}")
    preset = bundle.spec.presets[name].replace(
        num_steps=args.steps, cfg_scale=args.cfg_scale, cfg_interval_start=args.cfg_interval_start,
        timestep_shift=args.timestep_shift,
    )
    try:
        if sample_set:
            class_ids = (list(range(bundle.spec.num_classes)) if args.set_classes == "all" else
                         [resolve_class(bundle, c.strip()) for c in args.set_classes.split(",")])
        else:
            class_ids = [resolve_class(bundle, c) for c in args.classes]
    except ValueError as err:
        p.error(str(err))
    if sample_set:
        shape = generate_set(bundle, class_ids, args.per_class, args.seed_start, preset, args.npz, args.batch_size)
        print(f"wrote {args.npz}: arr_0 uint8 {list(shape)}, arr_1 labels", file=sys.stderr)
        return 0
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

"""Encode an image data set into VA-VAE latent shards for DiT training.

    python -m training.extract_latents --data path/to/imagenet_layout --vae-dir runs/vae --out runs/latents
    python -m training.extract_latents --data digits --vae-dir runs/vae --out runs/latents

<out>/latents_00000.safetensors ...  {"latents": [n, C, h, w] float32, "labels": [n] int64}
<out>/latents_stats.safetensors      {"mean", "std"}: per-channel, [1, C, 1, 1], unbiased std
<out>/dataset.json                   class names, shard list, latent shape, the VAE used

Each latent is a posterior *sample*, as the release's extract_features.py stores
(the DiT then sees the encoder's noise as part of the data). The statistics use
up to 10,000 randomly chosen latents, as the release does.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from model.checkpoints import save_json, save_safetensors
from model.latents import LatentStats
from model.vavae import VAVAE

log = logging.getLogger("training.extract_latents")


@torch.no_grad()
def encode_images(
    vae: VAVAE, images: torch.Tensor, batch_size: int = 64, seed: int = 0, progress: bool = False
) -> torch.Tensor:
    """Posterior samples [N, C, h, w] of images [N, 3, H, W] in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    chunks = [
        vae.encode(images[i : i + batch_size], sample=True, generator=gen)
        for i in tqdm(range(0, len(images), batch_size), desc="encode", disable=not progress)
    ]
    return torch.cat(chunks)


def latent_stats(latents: torch.Tensor, max_samples: int = 10_000, seed: int = 0) -> LatentStats:
    if len(latents) > max_samples:
        latents = latents[torch.randperm(len(latents), generator=torch.Generator().manual_seed(seed))[:max_samples]]
    return LatentStats.from_latents(latents)


def write_latent_dataset(
    out: str | Path,
    latents: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    vae_dir: str | Path | None = None,
    shard_size: int = 10_000,
    seed: int = 0,
) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, start in enumerate(range(0, len(latents), shard_size)):
        name = f"latents_{i:05d}.safetensors"
        save_safetensors(
            {"latents": latents[start : start + shard_size].float(), "labels": labels[start : start + shard_size].long()},
            out / name,
        )
        shards.append(name)
    stats = latent_stats(latents, seed=seed)
    save_safetensors({"mean": stats.mean, "std": stats.std}, out / "latents_stats.safetensors")
    save_json(
        {
            "class_names": list(class_names),
            "num_latents": len(latents),
            "latent_shape": list(latents.shape[1:]),
            "shards": shards,
            "vae_dir": str(Path(vae_dir).resolve()) if vae_dir else None,
        },
        out / "dataset.json",
    )
    return out


def load_latent_dataset(root: str | Path) -> tuple[torch.Tensor, torch.Tensor, LatentStats, dict]:
    """All shards of a latent folder: latents [N, C, h, w], labels [N], stats, dataset.json."""
    from model.checkpoints import load_latent_stats

    root = Path(root)
    meta = json.loads((root / "dataset.json").read_text())
    parts = [load_file(str(root / name)) for name in meta["shards"]]
    latents = torch.cat([p["latents"] for p in parts])
    labels = torch.cat([p["labels"] for p in parts])
    return latents, labels, load_latent_stats(root / "latents_stats.safetensors"), meta


def extract(data: str, vae_dir: str | Path, out: str | Path, batch_size: int = 64, shard_size: int = 10_000,
            seed: int = 0, image_size: int | None = None, progress: bool = True) -> Path:
    from training.train_vae import load_trained_vae, load_training_images

    vae = load_trained_vae(vae_dir)
    size = image_size or int(vae.ddconfig["resolution"])
    images, labels, classes = load_training_images(data, size)
    latents = encode_images(vae, images, batch_size, seed, progress)
    log.info("encoded %d images to latents %s", len(latents), tuple(latents.shape[1:]))
    return write_latent_dataset(out, latents, labels, classes, vae_dir, shard_size, seed)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Encode images (ImageNet layout, or 'digits') into VA-VAE latent shards.")
    p.add_argument("--data", required=True, help="ImageNet-layout folder (one subfolder per class) or 'digits'")
    p.add_argument("--vae-dir", required=True, help="folder with vae.json + vae.safetensors (training.train_vae output)")
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=None, help="default: the VAE's training resolution")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior samples")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    extract(a.data, a.vae_dir, a.out, a.batch_size, a.shard_size, a.seed, a.image_size, progress=not a.quiet)


if __name__ == "__main__":
    main()

"""A model bundle: one directory that holds everything needed to generate images.

    <dir>/model.json            spec (below)
    <dir>/<dit checkpoint>      .safetensors (EMA weights) or an official .pt
    <dir>/<vae checkpoint>      .safetensors or the official VA-VAE .pt
    <dir>/<latent stats>        .safetensors or the official latents_stats.pt
    <dir>/manifest.json         optional: hashes, training step (written by training.train)

model.json keys: `name`, `dit` {`config`, `checkpoint`}, `vae` {`embed_dim`,
`ddconfig`, `checkpoint`}, `latent_stats`, `latent_multiplier`, `class_names`
(list, index = class id), `presets` {name: SamplerPreset fields},
`default_preset`. See docs/model-bundle.md.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from model.checkpoints import (
    CheckpointError,
    file_sha256,
    load_dit_weights,
    load_latent_stats,
    load_vae_weights,
    save_json,
    save_safetensors,
)
from model.classes import ClassIndex
from model.latents import LatentStats
from model.lightningdit import CONFIG_KEYS, LightningDiT
from model.sampling import PRESETS, SamplerPreset
from model.vavae import VAVAE

CLASS_LISTS = Path(__file__).resolve().parent / "class_names"
SYNONYMS = "_synonyms"


def named_class_list(name: str) -> list[str]:
    path = CLASS_LISTS / f"{name}.json"
    if not path.is_file() or name.endswith(SYNONYMS):
        known = sorted(p.stem for p in CLASS_LISTS.glob("*.json") if not p.stem.endswith(SYNONYMS))
        raise CheckpointError(f"unknown class-name list {name!r}; known: {known}")
    return list(json.loads(path.read_text()))


def named_class_synonyms(name: str) -> list[list[str]] | None:
    """Every name of each class of a named list (`<name>_synonyms.json`), if shipped."""
    path = CLASS_LISTS / f"{name}{SYNONYMS}.json"
    return [list(row) for row in json.loads(path.read_text())] if path.is_file() else None


@dataclass
class BundleSpec:
    root: Path
    name: str
    dit_config: dict
    dit_checkpoint: Path
    vae_embed_dim: int
    vae_ddconfig: dict
    vae_checkpoint: Path
    latent_stats: Path
    latent_multiplier: float
    class_names: list[str]
    presets: dict[str, SamplerPreset]
    default_preset: str
    raw: dict = field(repr=False, default_factory=dict)
    class_synonyms: list[list[str]] | None = field(repr=False, default=None)

    @cached_property
    def classes(self) -> ClassIndex:
        """Resolves class ids, names and synonyms (model/classes.py)."""
        return ClassIndex(self.class_names, self.class_synonyms)

    @property
    def num_classes(self) -> int:
        return int(self.dit_config["num_classes"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = int(self.dit_config["input_size"])
        return (int(self.dit_config["in_channels"]), s, s)

    @property
    def image_size(self) -> int:
        return int(self.dit_config["input_size"]) * 2 ** (len(self.vae_ddconfig["ch_mult"]) - 1)

    def version(self) -> str:
        """Content version: hash of the spec and the weight files (first 12 hex digits)."""
        manifest = self.root / "manifest.json"
        if manifest.is_file():
            data = json.loads(manifest.read_text())
            if data.get("version"):
                return str(data["version"])
        h = hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode())
        for path in (self.dit_checkpoint, self.vae_checkpoint, self.latent_stats):
            h.update(file_sha256(path).encode())
        return h.hexdigest()[:12]


def read_spec(root: str | Path) -> BundleSpec:
    root = Path(root)
    path = root / "model.json"
    if not path.is_file():
        raise CheckpointError(f"no model.json in {root}: not a model bundle (see docs/model-bundle.md)")
    raw = json.loads(path.read_text())
    try:
        dit_cfg = {k: raw["dit"]["config"][k] for k in raw["dit"]["config"] if k in CONFIG_KEYS}
        presets = {k: SamplerPreset(**v) for k, v in raw.get("presets", {}).items()} or dict(PRESETS)
        default = raw.get("default_preset") or next(iter(presets))
        classes = raw.get("class_names") or [str(i) for i in range(int(dit_cfg["num_classes"]))]
        synonyms = None
        if isinstance(classes, str):  # a named list shipped with the code, e.g. "imagenet1k"
            classes, synonyms = named_class_list(classes), named_class_synonyms(classes)
        spec = BundleSpec(
            root=root,
            name=raw.get("name", root.name),
            dit_config=dit_cfg,
            dit_checkpoint=root / raw["dit"]["checkpoint"],
            vae_embed_dim=int(raw["vae"]["embed_dim"]),
            vae_ddconfig=dict(raw["vae"]["ddconfig"]),
            vae_checkpoint=root / raw["vae"]["checkpoint"],
            latent_stats=root / raw["latent_stats"],
            latent_multiplier=float(raw.get("latent_multiplier", 1.0)),
            class_names=list(classes),
            presets=presets,
            default_preset=default,
            raw=raw,
            class_synonyms=synonyms,
        )
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: malformed model.json ({err!r})") from None
    if spec.default_preset not in spec.presets:
        raise CheckpointError(f"{path}: default_preset {spec.default_preset!r} is not among {sorted(spec.presets)}")
    if len(spec.class_names) != spec.num_classes:
        raise CheckpointError(f"{path}: {len(spec.class_names)} class names for {spec.num_classes} classes")
    return spec


@dataclass
class ModelBundle:
    spec: BundleSpec
    dit: LightningDiT
    vae: VAVAE
    stats: LatentStats

    @property
    def null_class(self) -> int:
        return self.dit.null_class


def load_bundle(root: str | Path, device: str | torch.device = "cpu", with_encoder: bool = False) -> ModelBundle:
    """Build the DiT and VA-VAE of a bundle and load their weights strictly (eval mode)."""
    spec = read_spec(root)
    dit = LightningDiT(**spec.dit_config)
    load_dit_weights(dit, spec.dit_checkpoint)
    vae = VAVAE(spec.vae_embed_dim, spec.vae_ddconfig)
    load_vae_weights(vae, spec.vae_checkpoint, decoder_only=not with_encoder)
    stats = load_latent_stats(spec.latent_stats, spec.latent_multiplier)
    return ModelBundle(spec, dit.eval().to(device), vae.eval().to(device), stats)


def write_bundle(
    root: str | Path,
    dit: LightningDiT,
    dit_config: dict,
    vae: VAVAE,
    stats: LatentStats,
    *,
    name: str,
    class_names: list[str],
    presets: dict[str, SamplerPreset],
    default_preset: str,
    manifest: dict | None = None,
) -> Path:
    """Write a complete bundle (safetensors weights + model.json [+ manifest.json]); returns root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    save_safetensors(dit.state_dict(), root / "dit_ema.safetensors")
    save_safetensors(vae.state_dict(), root / "vae.safetensors")
    save_safetensors({"mean": stats.mean, "std": stats.std}, root / "latents_stats.safetensors")
    spec = {
        "format": "lightningdit-bundle/1",
        "name": name,
        "dit": {"config": {k: dit_config[k] for k in CONFIG_KEYS if k in dit_config}, "checkpoint": "dit_ema.safetensors"},
        "vae": {"embed_dim": vae.embed_dim, "ddconfig": vae.ddconfig, "checkpoint": "vae.safetensors"},
        "latent_stats": "latents_stats.safetensors",
        "latent_multiplier": stats.multiplier,
        "class_names": list(class_names),
        "presets": {k: p.to_dict() for k, p in presets.items()},
        "default_preset": default_preset,
    }
    save_json(spec, root / "model.json")
    if manifest is not None:
        files = {f: file_sha256(root / f) for f in ("dit_ema.safetensors", "vae.safetensors", "latents_stats.safetensors")}
        version = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]
        save_json({"version": version, "files": files, **manifest}, root / "manifest.json")
    return root


def write_spec(root: str | Path, **spec) -> Path:
    """Write model.json (plain JSON types only); returns its path."""
    path = Path(root) / "model.json"
    save_json(spec, path)
    return path

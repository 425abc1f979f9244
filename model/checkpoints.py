"""Reading and writing checkpoints in the official layouts, strictly.

DiT files: `{"ema": sd, ...}`, `{"model": sd, "ema": sd, "opt": ..., "config": ...}`
(as `training/train.py` writes) or a bare state dict; EMA weights win; a DDP `module.`
prefix is stripped. VA-VAE files: `{"state_dict": sd}` (Lightning) or bare; only
`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*` are kept and then
loaded strictly (the official non-strict load silently loads nothing from a
wrongly prefixed file). safetensors files are read as bare state dicts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.latents import LatentStats

log = logging.getLogger(__name__)

VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model, with the offending keys named."""


def read_tensor_file(path: str | Path) -> dict:
    """A .safetensors file or a torch pickle (.pt/.pth/.ckpt) as a dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - official files may pickle an OmegaConf config
        # The released training checkpoints store their config object next to the
        # weights; weights_only refuses it, so fall back to a full load, which is
        # only safe for files you trust.
        log.warning("weights_only load of %s failed (%s); loading it as a full pickle", path, type(err).__name__)
        return torch.load(path, map_location="cpu", weights_only=False)


def _strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def extract_dit_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    """The EMA weights of a DiT checkpoint in any official layout."""
    if "ema" in obj and isinstance(obj["ema"], dict):
        sd = obj["ema"]
    elif "model" in obj and isinstance(obj["model"], dict):
        log.warning("checkpoint has no 'ema' weights; using 'model'")
        sd = obj["model"]
    else:
        sd = obj
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "_orig_mod."):
        sd = _strip_prefix(sd, prefix)
    return sd


def extract_vae_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    """The autoencoder weights of a VA-VAE checkpoint (drops loss.*, foundation_model.*, linear_proj.*)."""
    sd = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    sd = _strip_prefix(sd, "module.")
    return {k: v for k, v in sd.items() if k.startswith(VAE_PREFIXES)}


def _short(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_strict(module: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True) with one clear error naming every mismatch."""
    own = module.state_dict()
    missing = set(own) - set(sd)
    unexpected = set(sd) - set(own)
    misshaped = [
        f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(own[k].shape)})"
        for k in sorted(set(own) & set(sd))
        if tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {_short(misshaped)}")
    if problems:
        raise CheckpointError(f"{what} does not fit the model: " + "; ".join(problems))
    # The released files' dtype is unknown: cast floats to the model's own dtype.
    cast = {k: v.to(own[k].dtype) if own[k].is_floating_point() else v for k, v in sd.items()}
    module.load_state_dict(cast, strict=True)


def load_dit_weights(model: nn.Module, path: str | Path) -> None:
    load_strict(model, extract_dit_state_dict(read_tensor_file(path)), f"DiT checkpoint {path}")


def load_vae_weights(vae: nn.Module, path: str | Path, decoder_only: bool = False) -> None:
    """Load a VA-VAE file; `decoder_only` accepts files without the encoder (serving needs none)."""
    sd = extract_vae_state_dict(read_tensor_file(path))
    if not sd:
        raise CheckpointError(
            f"VA-VAE checkpoint {path} holds no key starting with {', '.join(VAE_PREFIXES)}: wrong file or prefix?"
        )
    if decoder_only and not any(k.startswith(("encoder.", "quant_conv.")) for k in sd):
        own = vae.state_dict()
        sd = {**{k: v for k, v in own.items() if k.startswith(("encoder.", "quant_conv."))}, **sd}
    load_strict(vae, sd, f"VA-VAE checkpoint {path}")


def load_latent_stats(path: str | Path, multiplier: float = 1.0) -> LatentStats:
    obj = read_tensor_file(path)
    if "mean" not in obj or "std" not in obj:
        raise CheckpointError(f"latent stats file {path} must hold 'mean' and 'std'; it has {sorted(obj)}")
    if "multiplier" in obj:
        multiplier = float(obj["multiplier"])
    return LatentStats(obj["mean"], obj["std"], multiplier)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path) then rename onto path, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; readers may run as another user
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_safetensors(sd: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_json(obj, path: str | Path) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=False)
            f.write("\n")

    atomic_write(path, write)


def save_torch(obj, path: str | Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))

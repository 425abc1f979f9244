"""Latent statistics, (de)normalisation and the official float-to-uint8 conversion."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LatentStats:
    """Per-channel mean and (unbiased) std of VA-VAE latents, each [1, C, 1, 1]."""

    mean: torch.Tensor
    std: torch.Tensor
    multiplier: float = 1.0

    def __post_init__(self) -> None:
        # The released file may hold [C, 1, 1] or [1, C, 1, 1]; both broadcast alike.
        self.mean = self.mean.float().reshape(1, -1, 1, 1)
        self.std = self.std.float().reshape(1, -1, 1, 1)

    @classmethod
    def identity(cls, channels: int) -> LatentStats:
        return cls(torch.zeros(channels), torch.ones(channels))

    @classmethod
    def from_latents(cls, latents: torch.Tensor, multiplier: float = 1.0) -> LatentStats:
        """Statistics over dims (0, 2, 3) of a latent batch [N, C, H, W], as the release computes them."""
        return cls(latents.mean(dim=(0, 2, 3), keepdim=True), latents.std(dim=(0, 2, 3), keepdim=True), multiplier)

    def to(self, device: torch.device | str) -> LatentStats:
        """The same statistics on `device` (kept there, so (de)normalising copies nothing)."""
        return LatentStats(self.mean.to(device), self.std.to(device), self.multiplier)

    @property
    def channels(self) -> int:
        return self.mean.shape[1]

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latent -> the space the DiT works in."""
        return (z - self.mean.to(z)) / self.std.to(z) * self.multiplier

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """DiT sample -> VAE latent: x * std / multiplier + mean (in this order, as the release)."""
        return (x * self.std.to(x)) / self.multiplier + self.mean.to(x)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std, "multiplier": torch.tensor(float(self.multiplier))}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float NCHW image in about [-1, 1] -> uint8 NHWC: trunc(clamp(127.5 x + 128, 0, 255)).

    Adds 128 (not 127.5) and truncates, exactly as the official `decode_to_images`.
    """
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8)

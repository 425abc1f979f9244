"""The VA-VAE "vision foundation" alignment loss (VF loss), with a pluggable feature extractor.

The latent z [N, C, h, w] is mapped by a 1x1 conv `linear_proj` (no bias) to the
feature width D of a frozen foundation model, whose features f [N, D, h', w'] are
resized to h x w. Two margin-relaxed terms align them (paper, section 3.2):

* marginal cosine similarity: mean over positions of relu(1 - m1 - cos(z'_i, f_i));
* marginal distance-matrix similarity: mean over position pairs (i, j) of
  relu(|cos(z'_i, z'_j) - cos(f_i, f_j)| - m2), which matches the feature geometry.

Margins let the latent keep information the foundation model throws away
(release config: m1 = 0.5, m2 = 0.25). The release weights the sum by
`vf_weight * ||grad rec|| / ||grad vf||`, both gradients taken at the encoder's
last layer, so the alignment never swamps reconstruction (`adaptive_weight`).

The release uses DINOv2 ViT-L/14 features (D = 1024). Anything with the
`FeatureExtractor` shape works; the demo uses `PatchPCAExtractor` because no
foundation-model weights can be downloaded here.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class FeatureExtractor(Protocol):
    """A frozen model: images [N, 3, H, W] in [-1, 1] -> features [N, dim, h, w]."""

    dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class PatchPCAExtractor(nn.Module):
    """A cheap stand-in for a foundation model: PCA of overlapping gray patches.

    Each output position describes a `patch` x `patch` window (stride `stride`)
    by its top `dim` principal components, fitted once on training images. The
    features are local and linear, far weaker than DINOv2's, but fixed, smooth
    and shared by similar strokes, which is the structure the VF loss transfers.
    """

    def __init__(self, dim: int = 16, patch: int = 8, stride: int = 4):
        super().__init__()
        self.dim, self.patch, self.stride = dim, patch, stride
        self.register_buffer("mean", torch.zeros(patch * patch))
        self.register_buffer("components", torch.zeros(dim, patch * patch))

    def _patches(self, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        gray = images.float().mean(dim=1, keepdim=True)  # [N, 1, H, W]
        pad = (self.patch - self.stride) // 2
        cols = F.unfold(gray, self.patch, padding=pad, stride=self.stride)  # [N, p*p, h*w]
        h = (images.shape[2] + 2 * pad - self.patch) // self.stride + 1
        w = (images.shape[3] + 2 * pad - self.patch) // self.stride + 1
        return cols, h, w

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> PatchPCAExtractor:
        cols, _, _ = self._patches(images)
        patches = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # [N*h*w, p*p]
        self.mean.copy_(patches.mean(0))
        _, _, vt = torch.linalg.svd(patches - self.mean, full_matrices=False)
        self.components.copy_(vt[: self.dim])
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cols, h, w = self._patches(images)
        feats = torch.einsum("dp,npl->ndl", self.components, cols - self.mean[None, :, None])
        return feats.reshape(len(images), self.dim, h, w)


def marginal_cosine_loss(z: torch.Tensor, f: torch.Tensor, margin: float) -> torch.Tensor:
    """z, f [N, D, h, w] -> scalar: mean relu(1 - margin - cos) over positions."""
    cos = F.cosine_similarity(z, f, dim=1)  # [N, h, w]
    return F.relu(1 - margin - cos).mean()


def marginal_distance_matrix_loss(z: torch.Tensor, f: torch.Tensor, margin: float) -> torch.Tensor:
    """z, f [N, D, h, w] -> scalar: mean relu(|cos-sim matrix of z - that of f| - margin)."""
    zn = F.normalize(z.flatten(2), dim=1)  # [N, D, P]
    fn = F.normalize(f.flatten(2), dim=1)
    sim_z = zn.transpose(1, 2) @ zn  # [N, P, P]
    sim_f = fn.transpose(1, 2) @ fn
    return F.relu((sim_z - sim_f).abs() - margin).mean()


class VFLoss(nn.Module):
    """Owns the training-only projection `linear_proj` (latent C -> feature D); not part of the VAE."""

    def __init__(self, latent_channels: int, feature_dim: int, cos_margin: float = 0.5, distmat_margin: float = 0.25):
        super().__init__()
        self.linear_proj = nn.Conv2d(latent_channels, feature_dim, kernel_size=1, bias=False)
        self.cos_margin = cos_margin
        self.distmat_margin = distmat_margin

    def forward(self, z: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
        zp = self.linear_proj(z)  # [N, D, h, w]
        f = features.to(zp.dtype)
        if f.shape[-2:] != zp.shape[-2:]:
            f = F.interpolate(f, size=zp.shape[-2:], mode="bilinear", align_corners=False)
        mcos = marginal_cosine_loss(zp.float(), f.float(), self.cos_margin)
        mdms = marginal_distance_matrix_loss(zp.float(), f.float(), self.distmat_margin)
        return {"vf": mcos + mdms, "vf_cos": mcos, "vf_distmat": mdms}


def adaptive_weight(rec_loss: torch.Tensor, vf_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||d rec / d last|| / ||d vf / d last||, detached (the release's adaptive VF weight)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_vf = torch.autograd.grad(vf_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_vf.norm() + 1e-4)).clamp(0.0, 1e8).detach()

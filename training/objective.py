"""The LightningDiT training objective (facts file, sections 3.1 and 8).

Linear path from noise (t = 0) to data (t = 1): x_t = t * x1 + (1 - t) * x0, with
x1 the normalised data latent and x0 ~ N(0, I). The model regresses the velocity
v = x1 - x0. Times are logit-normal (sigmoid of N(0, 1)), which spends the
training signal on the middle of the path, and the loss adds a cosine term
(1 - cosine similarity along channels) to the MSE, as the release does.
Label dropout to the null class happens inside the model's LabelEmbedder in
train mode, so classifier-free guidance needs nothing here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sample_logit_normal(n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """n times in the open interval (0, 1): sigmoid of a standard normal draw."""
    return torch.sigmoid(torch.randn(n, device=device, generator=generator))


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t on the straight path; t [N] broadcasts over [N, C, H, W]."""
    t = t.view(-1, *([1] * (x1.dim() - 1)))
    return t * x1 + (1 - t) * x0


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


def velocity_loss(pred: torch.Tensor, target: torch.Tensor, use_cosine_loss: bool = True) -> dict[str, torch.Tensor]:
    """Per-sample losses [N]: 'mse', 'cos' (zero when off) and their sum 'loss'."""
    pred, target = pred.float(), target.float()
    mse = mean_flat((pred - target) ** 2)
    cos = mean_flat(1 - F.cosine_similarity(pred, target, dim=1)) if use_cosine_loss else torch.zeros_like(mse)
    return {"loss": mse + cos, "mse": mse, "cos": cos}


def flow_matching_loss(
    model: nn.Module,
    x1: torch.Tensor,
    y: torch.Tensor,
    use_cosine_loss: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Batch-mean losses of `model(x_t, t, y)` against v = x1 - x0 (scalars)."""
    x0 = torch.randn(x1.shape, device=x1.device, generator=generator)
    t = sample_logit_normal(x1.shape[0], device=x1.device, generator=generator)
    pred = model(interpolate(x0, x1, t), t, y)
    return {k: v.mean() for k, v in velocity_loss(pred, x1 - x0, use_cosine_loss).items()}

"""The demo data set: scikit-learn's handwritten digits (1797 images, 8x8, 16 gray levels).

Nothing is downloaded: `sklearn.datasets.load_digits` ships the data. For the
VA-VAE the 8x8 images are upsampled to 32x32 (bilinear) and repeated over three
channels, because the autoencoder keeps the release's RGB input/output.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_CLASSES = [str(i) for i in range(10)]
DIGIT_LEVELS = 16.0  # pixel values run 0..16


def load_digits_8x8() -> tuple[np.ndarray, np.ndarray]:
    """The raw set: images [1797, 8, 8] float in 0..16 and labels [1797] int."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def digits_to_images(images_8x8: np.ndarray | torch.Tensor, size: int = 32) -> torch.Tensor:
    """8x8 digits in 0..16 -> RGB images [N, 3, size, size] in [-1, 1] (ink is bright)."""
    x = torch.as_tensor(images_8x8, dtype=torch.float32).unsqueeze(1) / DIGIT_LEVELS * 2 - 1
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(-1, 1).expand(-1, 3, -1, -1).contiguous()


def images_to_digits(images: torch.Tensor) -> np.ndarray:
    """The inverse view used by the quality gate: images [N, 3, H, W] float in [-1, 1]
    or uint8 [N, H, W, 3] -> gray 8x8 in 0..16, flattened to [N, 64] (sklearn's layout)."""
    if images.dtype == torch.uint8:  # NHWC, as model.latents.to_uint8 returns
        x = images.permute(0, 3, 1, 2).float() / 255.0
    else:
        x = (images.float().clamp(-1, 1) + 1) / 2
    gray = x.mean(dim=1, keepdim=True)
    small = F.adaptive_avg_pool2d(gray, (8, 8))  # area average: undoes the 4x upsampling
    return (small * DIGIT_LEVELS).reshape(len(images), 64).numpy()


def load_digits_images(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [1797, 3, size, size] in [-1, 1] and labels [1797] (int64)."""
    raw, labels = load_digits_8x8()
    return digits_to_images(raw, size), torch.from_numpy(labels)

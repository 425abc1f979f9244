"""Scoring generated digits: an independent classifier and a Fréchet distance.

Both judge images in the digits' own 8x8, 0..16 space (`images_to_digits`), with
tools fitted on the real set only, so they know nothing of the VAE or the DiT.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg

from model.bundle import ModelBundle
from model.latents import to_uint8
from model.sampling import SamplerPreset, initial_noise, sample
from training.demo_data import images_to_digits, load_digits_8x8


def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """Real digits as [1797, 64] in 0..16 and their labels."""
    images, labels = load_digits_8x8()
    return images.reshape(len(images), 64), labels


def fit_classifier(x: np.ndarray, y: np.ndarray):
    """An RBF SVM on the 8x8 pixels (~99 % cross-validated accuracy on the real digits)."""
    from sklearn.svm import SVC

    return SVC(gamma=0.001, C=10.0).fit(x, y)


@torch.no_grad()
def generate_digits(
    bundle: ModelBundle, preset: SamplerPreset, labels: list[int], seeds: list[int], batch_size: int = 500
) -> torch.Tensor:
    """uint8 NHWC images, one per (label, seed) pair, through the bundle's DiT and VAE decoder."""
    shape = bundle.spec.latent_shape
    out = []
    for i in range(0, len(labels), batch_size):
        noise = torch.stack([initial_noise(s, shape) for s in seeds[i : i + batch_size]])
        y = torch.tensor(labels[i : i + batch_size])
        latents = sample(bundle.dit, noise, y, preset, bundle.null_class)
        out.append(to_uint8(bundle.vae.decode(bundle.stats.denormalize(latents))))
    return torch.cat(out)


def class_grid_requests(per_class: int, num_classes: int = 10, first_seed: int = 0) -> tuple[list[int], list[int]]:
    """(labels, seeds) for `per_class` seeds first_seed.. of every class."""
    labels = [c for c in range(num_classes) for _ in range(per_class)]
    seeds = [first_seed + s for _ in range(num_classes) for s in range(per_class)]
    return labels, seeds


def fit_pca(x: np.ndarray, dim: int = 64) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[:dim]


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets [N, D]."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Some digit pixels are always blank, so the covariances are singular; a tiny
    # ridge (as pytorch-fid does in that case) keeps the matrix square root stable.
    ridge = eps * np.eye(len(s_a))
    covmean = linalg.sqrtm((s_a + ridge) @ (s_b + ridge))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def score(generated_uint8: torch.Tensor, labels: list[int], classifier=None) -> dict:
    """Classifier accuracy and PCA-64 Fréchet distance of generated images against the real set."""
    real_x, real_y = real_digits()
    classifier = classifier or fit_classifier(real_x, real_y)
    gen_x = images_to_digits(generated_uint8)
    pred = classifier.predict(gen_x)
    mean, comps = fit_pca(real_x, 64)
    fd = frechet_distance((real_x - mean) @ comps.T, (gen_x - mean) @ comps.T)
    return {"accuracy": float((pred == np.asarray(labels)).mean()), "frechet_pca64": fd,
            "per_class_accuracy": [float((pred[np.asarray(labels) == c] == c).mean()) for c in sorted(set(labels))]}

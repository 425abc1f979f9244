"""Quality gate of the shipped demo model (checkpoints/demo).

An RBF-SVM trained on the real 8x8 digits must recognise the requested class in
at least 95 % of 1000 generated images (100 per class, seeds 0..99, the bundle's
default preset). The generated 32x32 images go back to 8x8 gray in 0..16 by
area averaging, the inverse of how the training images were made.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.bundle import load_bundle
from training.digit_eval import class_grid_requests, fit_classifier, generate_digits, real_digits, score

DEMO = Path(__file__).resolve().parents[1] / "checkpoints" / "demo"


@pytest.fixture(scope="module")
def bundle():
    if not (DEMO / "model.json").is_file():
        pytest.fail("checkpoints/demo is missing: run `make demo-model`")
    return load_bundle(DEMO)


def test_demo_bundle_describes_the_digits_model(bundle):
    assert bundle.spec.class_names == [str(i) for i in range(10)]
    assert bundle.null_class == 10
    assert bundle.spec.image_size == 32
    assert {"800ep", "64ep", "demo"} <= set(bundle.spec.presets)
    assert sum(p.stat().st_size for p in DEMO.iterdir() if p.is_file()) < 15 * 2**20


def test_the_classifier_recognises_real_digits_after_the_round_trip():
    # the 8x8 -> 32x32 -> 8x8 path the generated images take must keep the digits recognisable
    from training.demo_data import digits_to_images, images_to_digits, load_digits_8x8

    raw, labels = load_digits_8x8()
    clf = fit_classifier(*real_digits())
    back = images_to_digits(digits_to_images(raw))
    assert (clf.predict(back) == labels).mean() > 0.97


def test_generated_digits_are_recognised_as_the_requested_class(bundle):
    torch.manual_seed(0)
    labels, seeds = class_grid_requests(per_class=100)
    images = generate_digits(bundle, bundle.spec.presets[bundle.spec.default_preset], labels, seeds)
    assert images.shape == (1000, 32, 32, 3) and images.dtype == torch.uint8
    result = score(images, labels)
    assert result["accuracy"] >= 0.95, result

"""Images in ImageNet layout: <root>/<class name>/<image files>, classes in sorted order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".jpe", ".tif", ".tiff"}


def list_image_folder(root: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(path, class id) pairs and the class names (the sorted subfolder names)."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root} has no class subfolders (expected <root>/<class>/<image>)")
    items = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise FileNotFoundError(f"no images under {root}")
    return items, classes


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Downscale so the short side is `size`, then crop the centre square (ADM-style)."""
    img = img.convert("RGB")
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """One image as float [3, size, size] in [-1, 1]."""
    arr = np.asarray(center_crop_resize(Image.open(path), size), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def load_image_folder(root: str | Path, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All images [N, 3, size, size] in [-1, 1], labels [N] and class names (small sets only)."""
    items, classes = list_image_folder(root)
    images = torch.stack([load_image(path, size) for path, _ in items])
    return images, torch.tensor([label for _, label in items], dtype=torch.int64), classes

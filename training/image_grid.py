"""Tiling uint8 images into one PNG (sample grids written during training)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from model.checkpoints import atomic_write


def make_grid(images: torch.Tensor, rows: int, pad: int = 2) -> Image.Image:
    """uint8 NHWC images -> one RGB image, `rows` rows, filled row by row."""
    n, h, w, _ = images.shape
    cols = -(-n // rows)
    canvas = torch.zeros(rows * (h + pad) + pad, cols * (w + pad) + pad, 3, dtype=torch.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        canvas[top : top + h, left : left + w] = img
    return Image.fromarray(canvas.numpy())


def save_grid(images: torch.Tensor, rows: int, path: str | Path, upscale: int = 1) -> None:
    grid = make_grid(images, rows)
    if upscale > 1:
        grid = grid.resize((grid.width * upscale, grid.height * upscale), Image.NEAREST)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))

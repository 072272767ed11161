"""Sample grids as PNG files: the picture people look at first."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image


def grid_array(images: torch.Tensor, nrow: int | None = None, min_cell: int = 64) -> np.ndarray:
    """[n, C, H, W] in [0, 1] -> one uint8 RGB grid, small images scaled up (nearest) to ``min_cell`` pixels."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    scale = max(1, min_cell // max(h, w))
    imgs = (images.detach().float().clamp(0, 1) * 255).round().byte().cpu().numpy()
    if c == 1:
        imgs = np.repeat(imgs, 3, axis=1)
    imgs = imgs.repeat(scale, axis=2).repeat(scale, axis=3)
    hh, ww, pad = h * scale, w * scale, 2
    grid = np.full((ncol * (hh + pad) + pad, nrow * (ww + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (hh + pad), pad + col * (ww + pad)
        grid[y:y + hh, x:x + ww] = imgs[i].transpose(1, 2, 0)
    return grid


def save_grid(images: torch.Tensor, path: str, nrow: int | None = None) -> str:
    """Write the grid atomically (temp file + rename) and return its path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    Image.fromarray(grid_array(images, nrow)).save(tmp)
    os.replace(tmp, path)
    return path

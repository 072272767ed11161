"""A PNG grid of a data set's first images, written beside its manifest: what the model will be trained on."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

PREVIEW_NAME = "preview.png"
PREVIEW_COUNT = 36
PREVIEW_CELL = 128  # pixels: a photo folder's preview stays a few hundred KB


def grid_uint8(images: Sequence[np.ndarray] | np.ndarray, nrow: int | None = None, min_cell: int = 64) -> np.ndarray:
    """uint8 images [n, H, W, 1 or 3] -> one RGB grid with 2-pixel white gutters; small images are scaled up
    (nearest) to ``min_cell`` pixels so a 8x8 digit is still visible."""
    imgs = np.asarray(images)
    n, h, w, c = imgs.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    scale = max(1, min_cell // max(h, w))
    if c == 1:
        imgs = np.repeat(imgs, 3, axis=3)
    imgs = imgs.repeat(scale, axis=1).repeat(scale, axis=2)
    hh, ww, pad = h * scale, w * scale, 2
    grid = np.full((ncol * (hh + pad) + pad, nrow * (ww + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (hh + pad), pad + col * (ww + pad)
        grid[y:y + hh, x:x + ww] = imgs[i]
    return grid


def fit_cell(image: np.ndarray, cell: int = PREVIEW_CELL) -> np.ndarray:
    """An image of any size -> uint8 [cell, cell, 3]: shrunk to fit (aspect kept, Pillow's thumbnail) and centred
    on white; images already that small only gain the white margin, so every preview cell has one size."""
    img = np.asarray(image)
    pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).convert("RGB")
    if max(pil.size) > cell:
        pil.thumbnail((cell, cell), Image.Resampling.LANCZOS)
    out = np.full((cell, cell, 3), 255, dtype=np.uint8)
    w, h = pil.size
    top, left = (cell - h) // 2, (cell - w) // 2
    out[top:top + h, left:left + w] = np.asarray(pil)
    return out


def png_bytes(grid: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return buf.getvalue()

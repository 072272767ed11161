"""A PNG grid of a data set's first images, written beside its manifest: what the model will be trained on."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

PREVIEW_NAME = "preview.png"
PREVIEW_COUNT = 36


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


def png_bytes(grid: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return buf.getvalue()

"""Sample grids as PNG files: the picture people look at first."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from data_pipeline.preview import grid_uint8


def grid_array(images: torch.Tensor, nrow: int | None = None, min_cell: int = 64) -> np.ndarray:
    """[n, C, H, W] in [0, 1] -> one uint8 RGB grid, small images scaled up (nearest) to ``min_cell`` pixels."""
    imgs = (images.detach().float().clamp(0, 1) * 255).round().byte().cpu().numpy()
    return grid_uint8(imgs.transpose(0, 2, 3, 1), nrow, min_cell)


def check_not_a_folder(path: str) -> None:
    """A grid's path names a PNG file: a folder there (or a path ending in /) is refused, with an example."""
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise ValueError(f"{path}: is a folder; give the PNG file to write, e.g. {os.path.join(path, 'samples.png')}")


def save_grid(images: torch.Tensor, path: str, nrow: int | None = None) -> str:
    """Write the grid atomically (temp file + rename) and return its path; ``path`` names a PNG file, not a
    folder."""
    check_not_a_folder(path)
    tmp = path + ".tmp.png"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        Image.fromarray(grid_array(images, nrow)).save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as e:  # a parent that is a file, no permission, a full disk
        above = os.path.dirname(os.path.abspath(path))
        while above != os.path.dirname(above) and not os.path.exists(above):
            above = os.path.dirname(above)
        where = f": {above} is a file, not a folder" if os.path.isfile(above) else ""
        raise ValueError(f"{path}: cannot write the PNG ({e.strerror or e}{where})") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path

"""Bringing arbitrary decoded images to the codec's strict input: uint8 RGB [B, H, W, 3] at the configured size.

Conversions (all documented on ``DCTCodecConfig``): grey [H, W] or [H, W, 1] is replicated to R = G = B (zero
chroma); RGBA is composited on white or has its alpha dropped; a size other than the configured one is refused,
centre-cropped on the 16-pixel grid, or edge-padded at the bottom/right, per ``size_policy``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data_pipeline.codecs.dct_config import AlphaPolicy, DCTCodecConfig, SizePolicy
from data_pipeline.codecs.dct_tables import MACROBLOCK


def crop_offset(size: int, target: int) -> int:
    """Start of the crop window: the centre offset rounded down to a multiple of 16 (a macroblock boundary)."""
    return (size - target) // 2 // MACROBLOCK * MACROBLOCK


def _fit_axis(image: np.ndarray, axis: int, target: int, policy: SizePolicy) -> np.ndarray:
    size = image.shape[axis]
    if size > target and policy == "crop":
        start = crop_offset(size, target)
        return np.take(image, np.arange(start, start + target), axis=axis)
    if size < target and policy == "pad":
        widths = [(0, 0)] * image.ndim
        widths[axis] = (0, target - size)
        return np.pad(image, widths, mode="edge")
    return image


def to_rgb(image: np.ndarray, alpha: AlphaPolicy = "white", where: str = "image") -> np.ndarray:
    """One uint8 image [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] -> uint8 [H, W, 3]."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"{where}: images must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(
            f"{where}: expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {image.shape}"
        )
    channels = image.shape[2]
    if channels == 1:
        return np.repeat(image, 3, axis=2)
    if channels == 4:
        if alpha == "drop":
            return np.ascontiguousarray(image[:, :, :3])
        a = image[:, :, 3:].astype(np.uint32)
        # out = rgb * a/255 + 255 * (1 - a/255), rounded: (rgb*a + 255*(255-a) + 127) // 255
        return ((image[:, :, :3] * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    return image


def check_size(height: int, width: int, config: DCTCodecConfig, where: str = "image") -> None:
    """Refuse, naming the size, an image the size policy cannot bring to the codec's resolution (crop only
    shrinks an axis, pad only grows one); checked from shapes alone, so a whole folder is checked before a shard."""
    target_h, target_w = config.resolution  # type: ignore[misc]
    policy = config.size_policy

    def fits(size: int, target: int) -> bool:
        return size == target or (size > target and policy == "crop") or (size < target and policy == "pad")

    if not (fits(height, target_h) and fits(width, target_w)):
        hint = "" if policy != "error" else "; set size_policy='crop' or 'pad', or resize it first"
        raise ValueError(f"{where}: size {height}x{width} (HxW) does not match the codec resolution "
                         f"{target_h}x{target_w} under size_policy={policy!r}{hint}")


def fit_size(image: np.ndarray, config: DCTCodecConfig, where: str = "image") -> np.ndarray:
    """Apply the size policy to one image [H, W, C]; error naming the size when it does not fit."""
    h, w = image.shape[:2]
    check_size(h, w, config, where)
    target_h, target_w = config.resolution  # type: ignore[misc]
    return _fit_axis(_fit_axis(image, 0, target_h, config.size_policy), 1, target_w, config.size_policy)


def as_rgb_batch(images: np.ndarray | Sequence[np.ndarray], config: DCTCodecConfig) -> np.ndarray:
    """A batch ndarray [B, H, W, C] (C in 1, 3, 4) or a sequence of single images -> uint8 [B, H, W, 3].

    A 3-D ndarray is refused rather than guessed ([B, H, W] grey batch or one [H, W, C] image?): pass a list.
    """
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(
                f"expected a batch [B, H, W, C], got an array of shape {images.shape}; pass a list for single images"
            )
        if images.dtype == np.uint8 and images.shape[1:] == (config.height, config.width, 3):
            return images
        images = list(images)
    out = [
        fit_size(to_rgb(im, config.alpha, f"image {i}"), config, f"image {i}") for i, im in enumerate(images)
    ]
    if not out:
        return np.empty((0, config.height, config.width, 3), dtype=np.uint8)
    return np.stack(out)

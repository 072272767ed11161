"""Rule-based analyser of shape scenes: recovers objects from pixels, to score generated images against captions.

Pixels are assigned to the nearest palette colour or to the background (estimated from the image border, so a
generated image with a slightly shifted background still parses); pixels far from every reference are ignored.
Each connected component (8-neighbourhood) of one colour is an object: the generator keeps a gap between
objects, so same-coloured objects never touch. Shape comes from the blob itself: an upward triangle is much
narrower in its top third than in its bottom third; among the rest, a square fills its box (~1.0) and a circle does
not (~pi/4). Size class: box extent against the midpoint of the two generator sizes at this resolution.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .shape_language import PALETTE, score_objects, size_px

_COLOURS = list(PALETTE)
_REFS = np.array([PALETTE[c] for c in _COLOURS], dtype=np.int32)
_EIGHT = np.ones((3, 3), dtype=bool)
TRIANGLE_TOP_RATIO = 0.6
"""An upward triangle's top-third width is ~1/5 of its bottom third; circles and squares are ~1."""
SQUARE_FILL = 0.9
"""Box fill of a square is 1.0, of a circle ~0.75-0.80 at any resolution this renderer uses."""


def _border_colour(img: np.ndarray) -> np.ndarray:
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    return np.median(border, axis=0)


def _classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Shape name and box fill ratio of one blob, given its mask cropped to its bounding box."""
    h, w = mask.shape
    fill = float(mask.sum()) / (h * w)
    widths = mask.sum(axis=1).astype(float)
    third = max(1, h // 3)
    top, bottom = widths[:third].mean(), widths[-third:].mean()
    if h >= 2 and bottom > 0 and top / bottom < TRIANGLE_TOP_RATIO:
        return "triangle", fill
    return ("square" if fill >= SQUARE_FILL else "circle"), fill


def analyse_scene(
    image: np.ndarray,
    *,
    tolerance: float = 70.0,
    min_area: int | None = None,
    size_threshold: float | None = None,
    background: tuple[int, int, int] | None = None,
) -> list[dict[str, Any]]:
    """Objects found in a shape-scene image, sorted top-to-bottom then left-to-right.

    Each is {"colour", "shape", "size", "centre": [x, y], "bbox": [x0, y0, x1, y1], "area", "fill"}, with the
    generator's conventions (bbox half-open, centre = bbox centre). `tolerance` is the largest RGB distance at which
    a pixel still counts as a palette colour; `min_area` (default 20% of a small object's box) drops specks;
    `size_threshold` (px, default midway between the two generator sizes) separates small from large.
    """
    from scipy import ndimage  # here, not at module level: sources that only render should not pay its import

    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"analyse_scene expects an HxWx3 RGB image, got shape {img.shape}")
    res = min(img.shape[:2])
    ext = size_px(res)
    if min_area is None:
        min_area = max(2, round(0.2 * ext["small"] ** 2))
    if size_threshold is None:
        size_threshold = (ext["small"] + ext["large"]) / 2
    bg = np.asarray(_border_colour(img) if background is None else background, dtype=np.int32)
    refs = np.vstack([_REFS, bg[None, :]]).astype(np.float32)
    pix = img.reshape(-1, 3).astype(np.float32)
    # |p - r|^2 = |p|^2 - 2 p.r + |r|^2 as one small matmul; exact in float32 for 8-bit values (< 2^24).
    p2 = pix[:, 0] ** 2 + pix[:, 1] ** 2 + pix[:, 2] ** 2
    d2 = p2[:, None] - 2 * (pix @ refs.T) + (refs**2).sum(axis=1)[None, :]
    nearest_flat = d2.argmin(axis=1)
    nearest = nearest_flat.reshape(img.shape[:2])
    close = (d2[np.arange(len(d2)), nearest_flat] <= tolerance**2).reshape(img.shape[:2])
    found = []
    for k, colour in enumerate(_COLOURS):
        mask = (nearest == k) & close
        if not mask.any():
            continue
        labels, n = ndimage.label(mask, structure=_EIGHT)
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None or areas[lab] < min_area:
                continue
            ys, xs = sl
            blob = labels[sl] == lab
            shape, fill = _classify_shape(blob)
            h, w = blob.shape
            found.append({
                "colour": colour,
                "shape": shape,
                "size": "large" if max(h, w) > size_threshold else "small",
                "centre": [(xs.start + xs.stop) / 2, (ys.start + ys.stop) / 2],
                "bbox": [xs.start, ys.start, xs.stop, ys.stop],
                "area": int(areas[lab]),
                "fill": round(fill, 4),
            })
    found.sort(key=lambda o: (o["bbox"][1], o["bbox"][0]))
    return found


def count_objects(image: np.ndarray, **kwargs: Any) -> int:
    """Number of objects the analyser finds (keyword arguments as for `analyse_scene`)."""
    return len(analyse_scene(image, **kwargs))


def caption_matches(image: np.ndarray, attributes_or_caption: dict | str, **kwargs: Any) -> dict[str, Any]:
    """Per-attribute hits of an image against a caption or ground-truth attributes (see `score_objects`).

    Given attributes, every ground-truth object must be found with its colour, shape and size, the count must be
    exact and the caption's stated relations must hold; given a caption, only what it states is checked.
    """
    return score_objects(analyse_scene(image, **kwargs), attributes_or_caption)

"""Procedural CLEVR-like shape scenes with ground-truth attributes and generated captions.

Each scene holds `min_objects..max_objects` axis-aligned circles, squares and (upward) triangles in a fixed
palette, two size classes, on a plain grey background. Objects never overlap: their boxes keep a gap of
max(1, resolution/32) px (rejection sampling), so each object is one connected blob of one palette colour and the
rule-based analyser (shape_analysis) can recover every attribute from the pixels.

Sample i is a pure function of (config, i) through `np.random.default_rng([seed, i])`: any index can be made on any
worker in any order. The label is the number of objects (CLEVR's counting task; it lets class-conditional models
be checked with `count_objects`); `label="none"` leaves it out.

Attributes (JSON): {"resolution", "background", "count", "template", "objects": [{"shape", "colour", "size",
"centre": [x, y], "bbox": [x0, y0, x1, y1]}], "relations": [{"subject": i, "relation": "left of", "object": j}]}.
Coordinates are pixels with x to the right and y down; bbox is half-open and centre is the bbox centre. bbox is the
d x d box an object is drawn in: with hard edges an even-sized triangle's apex row covers under half of each pixel
and stays background, so its drawn pixels start one row below bbox (relations, decided by axes the boxes are
apart on, are unaffected).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

from .base import Sample, check_index, config_settings
from .shape_analysis import analyse_scene, caption_matches, count_objects
from .shape_language import (
    BACKGROUND,
    BACKGROUND_NAME,
    NUMBER_WORDS,
    PALETTE,
    SHAPES,
    SIZES,
    make_caption,
    size_px,
)

__all__ = ["ShapesConfig", "ShapesSource", "sample_layout", "render_scene", "gap_px",
           "analyse_scene", "count_objects", "caption_matches"]

_COLOURS = list(PALETTE)
_RGB = {name: np.array(rgb, dtype=np.uint8) for name, rgb in PALETTE.items()}
_CANDIDATES = 64
_ATTEMPTS = 50
_MAX_DENSITY = 0.5


def gap_px(resolution: int) -> int:
    """Minimum empty space between two object boxes, so same-coloured objects never touch."""
    return max(1, round(resolution / 32))


@dataclass
class ShapesConfig:
    """Settings of the shape-scene source (recorded in the dataset manifest)."""

    num_samples: int = 10000
    resolution: int = 64
    seed: int = 0
    min_objects: int = 2
    max_objects: int = 6
    antialias: bool = False
    label: Literal["count", "none"] = "count"

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"shapes: num_samples must be >= 1, got {self.num_samples}")
        if self.resolution < 16:
            raise ValueError(f"shapes: resolution must be >= 16, got {self.resolution}")
        if self.seed < 0:
            raise ValueError(f"shapes: seed must be >= 0, got {self.seed}")
        if not 1 <= self.min_objects <= self.max_objects <= len(NUMBER_WORDS) - 1:
            raise ValueError(f"shapes: need 1 <= min_objects <= max_objects <= {len(NUMBER_WORDS) - 1}, "
                             f"got min_objects={self.min_objects}, max_objects={self.max_objects}")
        need = self.max_objects * (size_px(self.resolution)["large"] + gap_px(self.resolution)) ** 2
        if need > _MAX_DENSITY * (self.resolution - 2) ** 2:
            raise ValueError(f"shapes: max_objects={self.max_objects} large objects do not fit reliably at "
                             f"resolution {self.resolution}; lower max_objects or raise the resolution")


def sample_layout(rng: np.random.Generator, config: ShapesConfig) -> list[dict]:
    """Draw object attributes and non-overlapping positions (large objects are placed first, as they fit worse)."""
    res = config.resolution
    n = config.min_objects + int(rng.random() * (config.max_objects - config.min_objects + 1))
    draws = rng.random(3 * n).tolist()
    shapes = [SHAPES[int(u * len(SHAPES))] for u in draws[:n]]
    colours = [_COLOURS[int(u * len(_COLOURS))] for u in draws[n:2 * n]]
    sizes = [SIZES[int(u * len(SIZES))] for u in draws[2 * n:]]
    extent = size_px(res)
    ds = [extent[s] for s in sizes]
    gap = gap_px(res)
    order = sorted(range(n), key=lambda i: -ds[i])
    for _ in range(_ATTEMPTS):
        candidates = rng.random((n, 2 * _CANDIDATES)).tolist()
        boxes: dict[int, tuple[int, int, int, int]] = {}
        for i in order:
            d = ds[i]
            span = res - 1 - d
            row = candidates[i]
            for c in range(_CANDIDATES):
                x, y = 1 + int(row[2 * c] * span), 1 + int(row[2 * c + 1] * span)
                if all(x >= bx1 + gap or bx0 >= x + d + gap or y >= by1 + gap or by0 >= y + d + gap
                       for bx0, by0, bx1, by1 in boxes.values()):
                    boxes[i] = (x, y, x + d, y + d)
                    break
            else:
                break
        if len(boxes) == n:
            break
    else:
        raise RuntimeError(f"shapes: could not place {n} objects at resolution {res} in {_ATTEMPTS} attempts")
    return [
        {
            "shape": shapes[i],
            "colour": colours[i],
            "size": sizes[i],
            "centre": [(boxes[i][0] + boxes[i][2]) / 2, (boxes[i][1] + boxes[i][3]) / 2],
            "bbox": list(boxes[i]),
        }
        for i in range(n)
    ]


@lru_cache(maxsize=256)
def _coverage(shape: str, d: int, antialias: bool) -> np.ndarray:
    """Fraction of each pixel of a d x d box covered by the shape (8x8 supersampling), d x d x 1; thresholded
    at 0.5 into a boolean mask when not anti-aliasing. Cached: only a handful of (shape, size) pairs exist."""
    ss = 8
    t = (np.arange(d * ss) + 0.5) / ss
    u, v = t[None, :], t[:, None]
    if shape == "square":
        inside = np.ones((d * ss, d * ss), dtype=bool)
    elif shape == "circle":
        inside = (u - d / 2) ** 2 + (v - d / 2) ** 2 <= (d / 2) ** 2
    elif shape == "triangle":
        inside = np.abs(u - d / 2) <= v / 2
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cov = inside.reshape(d, ss, d, ss).mean(axis=(1, 3))
    out = (cov if antialias else cov >= 0.5)[..., None]
    out.setflags(write=False)
    return out


@lru_cache(maxsize=16)
def _background(resolution: int) -> np.ndarray:
    img = np.empty((resolution, resolution, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    img.setflags(write=False)
    return img


def render_scene(objects: list[dict], resolution: int, antialias: bool = False) -> np.ndarray:
    """Draw objects (as produced by `sample_layout`) on the background; uint8 HxWx3."""
    img = _background(resolution).copy()
    for obj in objects:
        x0, y0, x1, y1 = obj["bbox"]
        colour = _RGB[obj["colour"]]
        cov = _coverage(obj["shape"], x1 - x0, antialias)
        region = img[y0:y1, x0:x1]
        if antialias:
            region[:] = np.rint(region * (1.0 - cov) + colour * cov).astype(np.uint8)
        else:
            np.copyto(region, colour, where=cov)
    return img


class ShapesSource:
    """Shape scenes with captions; label = object count (or None), attributes = ground truth (module doc)."""

    name = "shapes"

    def __init__(self, config: ShapesConfig | None = None) -> None:
        self.config = config or ShapesConfig()

    def __len__(self) -> int:
        return self.config.num_samples

    def settings(self) -> dict:
        return config_settings(self.config)

    def key(self, index: int) -> str:
        return f"shapes-s{self.config.seed}-{index:06d}"

    def sample(self, index: int) -> Sample:
        cfg = self.config
        i = check_index(index, len(self), self.name)
        rng = np.random.default_rng([cfg.seed, i])
        objects = sample_layout(rng, cfg)
        image = render_scene(objects, cfg.resolution, cfg.antialias)
        caption, template, relations = make_caption(rng, objects)
        attributes = {
            "resolution": cfg.resolution,
            "background": BACKGROUND_NAME,
            "count": len(objects),
            "template": template,
            "objects": objects,
            "relations": relations,
        }
        label = len(objects) if cfg.label == "count" else None
        return Sample(key=self.key(i), image=image, label=label, caption=caption, attributes=attributes)

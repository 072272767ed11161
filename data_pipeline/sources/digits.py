"""scikit-learn's 8x8 handwritten digits (1797 images, shipped inside the package: nothing is downloaded).

The data file behind `sklearn.datasets.load_digits` is read directly (same values; a test checks it).

Pixels are 17 grey levels 0..16. Images are stored as uint8 HxWx1 with value round(level * 255 / 16) so that they
look right in any viewer, and `levels_from_image` recovers the levels exactly (the DCT codec and the metrics work
on levels). The label is the digit class. The train / held-out split is stratified by class and is a pure function
of (seed, holdout_fraction); keys name the underlying sklearn index, so they are the same in every split and seed.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from .base import Sample, check_index, config_settings

LEVELS = 17
_LEVEL_TO_BYTE = np.rint(np.arange(LEVELS) * 255 / (LEVELS - 1)).astype(np.uint8)
_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def image_from_levels(levels: np.ndarray, upscale: int = 1) -> np.ndarray:
    """Levels (HxW, ints 0..16) -> uint8 HxWx1 image, each pixel repeated `upscale` times along both axes."""
    lv = np.asarray(levels)
    if lv.ndim != 2 or lv.min() < 0 or lv.max() >= LEVELS or not np.all(lv == np.round(lv)):
        raise ValueError(f"levels must be a 2-D array of integers in 0..{LEVELS - 1}")
    img = _LEVEL_TO_BYTE[lv.astype(np.int64)]
    if upscale > 1:
        img = img.repeat(upscale, axis=0).repeat(upscale, axis=1)
    return img[:, :, None]


def levels_from_image(image: np.ndarray, strict: bool = False) -> np.ndarray:
    """Grey levels 0..16 (int64, HxW) of an image made by `image_from_levels`: the exact inverse.

    Other values (e.g. from a generative model) are rounded to the nearest level, unless `strict`, which raises
    on any value `image_from_levels` cannot produce. Accepts HxW or HxWx1.
    """
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim != 2:
        raise ValueError(f"expected a grey HxW or HxWx1 image, got shape {img.shape}")
    levels = np.clip(np.rint(img.astype(np.float64) * (LEVELS - 1) / 255), 0, LEVELS - 1).astype(np.int64)
    if strict and not np.array_equal(_LEVEL_TO_BYTE[levels], img):
        raise ValueError("image holds values that are not exact digit grey levels")
    return levels


def digits_data_file() -> Path:
    """The CSV that `sklearn.datasets.load_digits` reads, located without importing scikit-learn (which takes
    seconds per process: too much for every shard-writing task)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the digits source needs scikit-learn installed (it ships the data)")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"digits: {path} is missing from the scikit-learn installation")
    return path


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    """(levels N x 8 x 8, targets N) exactly as `load_digits()` returns them (.images, .target), as int64."""
    path = digits_data_file()
    data = np.loadtxt(path, delimiter=",")
    if data.ndim != 2 or data.shape[1] != 65:
        raise ValueError(f"digits: {path} does not hold 64 pixels + a label per row")
    levels = data[:, :-1].astype(np.int64).reshape(-1, 8, 8)
    levels.setflags(write=False)
    targets = data[:, -1].astype(np.int64)
    targets.setflags(write=False)
    return levels, targets


def split_indices(seed: int, holdout_fraction: float, split: str) -> np.ndarray:
    """Sorted sklearn indices of one split: per class, round(fraction * class size) random ones are held out."""
    _, targets = _load()
    if split == "all":
        return np.arange(len(targets))
    held = []
    for c in range(10):
        members = np.flatnonzero(targets == c)
        perm = np.random.default_rng([seed, c]).permutation(members)
        held.append(perm[: round(holdout_fraction * len(members))])
    holdout = np.sort(np.concatenate(held))
    if split == "holdout":
        return holdout
    return np.setdiff1d(np.arange(len(targets)), holdout)


@dataclass
class DigitsConfig:
    """Settings of the digits source. `upscale` repeats pixels (nearest) to make 8k x 8k images."""

    split: Literal["train", "holdout", "all"] = "train"
    holdout_fraction: float = 0.2
    seed: int = 0
    upscale: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"digits: holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.seed < 0:
            raise ValueError(f"digits: seed must be >= 0, got {self.seed}")
        if not 1 <= self.upscale <= 64:
            raise ValueError(f"digits: upscale must be in 1..64, got {self.upscale}")


class DigitsSource:
    """The sklearn digits of one split; label = digit class, caption 'the digit seven'."""

    name = "digits"

    def __init__(self, config: DigitsConfig | None = None) -> None:
        self.config = config or DigitsConfig()
        self._indices = split_indices(self.config.seed, self.config.holdout_fraction, self.config.split)
        if len(self._indices) == 0:
            raise ValueError(f"digits: split {self.config.split!r} is empty with "
                             f"holdout_fraction={self.config.holdout_fraction}")

    def __len__(self) -> int:
        return len(self._indices)

    def settings(self) -> dict:
        return config_settings(self.config)

    def source_index(self, index: int) -> int:
        """The index in sklearn's array of this source's sample `index`."""
        return int(self._indices[check_index(index, len(self), self.name)])

    def sample(self, index: int) -> Sample:
        j = self.source_index(index)
        levels, targets = _load()
        label = int(targets[j])
        return Sample(
            key=f"digits-{j:04d}",
            image=image_from_levels(levels[j], self.config.upscale),
            label=label,
            caption=f"the digit {_WORDS[label]}",
            attributes={"sklearn_index": j},
        )

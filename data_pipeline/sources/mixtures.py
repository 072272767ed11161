"""2-D Gaussian mixtures, the standard GAN mode-collapse probes: 8 modes on a ring, 25 on a 5x5 grid.

Sample i is a pure function of (config, i): its component and noise come from ``np.random.default_rng([seed,
split, i])``, so any index is made on any worker in any order and the train / held-out splits never share a draw.
The label is the mixture component, so self-labelling accuracy and class-conditional training can be measured
against the truth. Components are equally likely; every component is an isotropic Gaussian of one ``std``.

The mixture is also a known density (``Mixture``): metrics compare generated points against it exactly.

Points are not images, so samples are ``PointSample`` (key, point, label) rather than the image ``Sample``; the
``points`` codec stores them. ``PointSample.image`` exists only because ``dgm prepare`` records the shape of
``sample(0).image`` in the manifest (for points: ``[2]``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .base import check_index, config_settings

_SPLIT_IDS = {"train": 0, "holdout": 1}


@dataclass(frozen=True)
class Mixture:
    """An equal-weight mixture of isotropic 2-D Gaussians: centres [K, 2] and one standard deviation."""

    centres: np.ndarray
    std: float

    @property
    def num_modes(self) -> int:
        return len(self.centres)

    def density(self, points: np.ndarray, extra_var: float = 0.0) -> np.ndarray:
        """p(x) at points [N, 2]; ``extra_var`` widens every component (the density convolved with a Gaussian)."""
        var = self.std**2 + extra_var
        d2 = ((np.asarray(points, dtype=np.float64)[:, None, :] - self.centres[None]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * var)).mean(axis=1) / (2 * math.pi * var)

    def nearest(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index of the nearest centre, distance to it) for every point."""
        d = np.sqrt(((np.asarray(points, dtype=np.float64)[:, None, :] - self.centres[None]) ** 2).sum(-1))
        idx = d.argmin(axis=1)
        return idx, d[np.arange(len(idx)), idx]

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, self.num_modes, size=n)
        return self.centres[labels] + self.std * rng.standard_normal((n, 2)), labels


def mixture_centres(layout: str, modes: int, scale: float) -> np.ndarray:
    """Ring: ``modes`` centres at radius ``scale``. Grid: a sqrt(modes)^2 grid with spacing ``scale``, centred."""
    if layout == "ring":
        angles = 2 * math.pi * np.arange(modes) / modes
        return scale * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    side = math.isqrt(modes)
    ticks = (np.arange(side) - (side - 1) / 2) * scale
    return np.array([(x, y) for x in ticks for y in ticks], dtype=np.float64)


@dataclass
class MixtureConfig:
    """Settings of a mixture source. Defaults are the ring of the proximal-duality-gap experiments (radius 2,
    std 0.02); the usual grid is ``layout: grid, modes: 25, scale: 2, std: 0.05``."""

    layout: Literal["ring", "grid"] = "ring"
    modes: int = 8
    scale: float = 2.0
    std: float = 0.02
    num_samples: int = 10000
    split: Literal["train", "holdout"] = "train"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.modes < 1:
            raise ValueError(f"mixture: modes must be >= 1, got {self.modes}")
        if self.layout == "grid" and math.isqrt(self.modes) ** 2 != self.modes:
            raise ValueError(f"mixture: a grid needs a square number of modes, got {self.modes}")
        if not self.std > 0 or not self.scale > 0:
            raise ValueError(f"mixture: std and scale must be > 0, got std={self.std} scale={self.scale}")
        if self.num_samples < 1:
            raise ValueError(f"mixture: num_samples must be >= 1, got {self.num_samples}")
        if self.seed < 0:
            raise ValueError(f"mixture: seed must be >= 0, got {self.seed}")

    def mixture(self) -> Mixture:
        return Mixture(mixture_centres(self.layout, self.modes, self.scale), self.std)


@dataclass
class PointSample:
    """One 2-D point with its mixture component."""

    key: str
    point: np.ndarray
    label: int | None = None

    @property
    def image(self) -> np.ndarray:
        """The point itself: `dgm prepare` records ``sample(0).image.shape`` as the manifest's data shape."""
        return self.point


class MixtureSource:
    """``num_samples`` points of a 2-D Gaussian mixture; label = component."""

    name = "mixture"

    def __init__(self, config: MixtureConfig | None = None) -> None:
        self.config = config or MixtureConfig()
        self.mixture = self.config.mixture()

    def __len__(self) -> int:
        return self.config.num_samples

    def settings(self) -> dict:
        return config_settings(self.config)

    def sample(self, index: int) -> PointSample:
        i = check_index(index, len(self), self.name)
        rng = np.random.default_rng([self.config.seed, _SPLIT_IDS[self.config.split], i])
        label = int(rng.integers(0, self.mixture.num_modes))
        point = self.mixture.centres[label] + self.config.std * rng.standard_normal(2)
        prefix = "h" if self.config.split == "holdout" else "t"
        return PointSample(key=f"{self.config.layout}{self.config.modes}-{prefix}{i:07d}",
                           point=point.astype(np.float32), label=label)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All points [N, 2] float32 and labels [N] int64, exactly as the shards hold them."""
        samples = [self.sample(i) for i in range(len(self))]
        return (np.stack([s.point for s in samples]), np.array([s.label for s in samples], dtype=np.int64))

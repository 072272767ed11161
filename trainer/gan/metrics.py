"""Metrics for the GAN experiments: label alignment and accuracy, mixture coverage and quality, a ground-truth
divergence to a known 2-D density, and a Frechet distance on features of a small digits classifier."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from scipy.optimize import linear_sum_assignment
from torch import nn

from data_pipeline.sources.mixtures import Mixture


def hungarian_mapping(confusion: np.ndarray) -> np.ndarray:
    """Rows (e.g. true classes) -> columns (artificial labels) maximising the matched counts; -1 for rows left
    unmatched when there are more rows than columns."""
    confusion = np.asarray(confusion, dtype=np.float64)
    rows, cols = linear_sum_assignment(-confusion)
    mapping = np.full(confusion.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, n_true: int, n_pred: int) -> np.ndarray:
    m = np.zeros((n_true, n_pred), dtype=np.int64)
    np.add.at(m, (np.asarray(truth), np.asarray(pred)), 1)
    return m


def matched_accuracy(truth: np.ndarray, pred: np.ndarray, n_true: int, n_pred: int) -> float:
    """Accuracy of ``pred`` after the best one-to-one relabelling of its labels (Hungarian matching)."""
    if len(truth) == 0:
        return float("nan")
    m = confusion_matrix(truth, pred, n_true, n_pred)
    mapping = hungarian_mapping(m)
    return float(sum(m[r, c] for r, c in enumerate(mapping) if c >= 0) / len(truth))


@dataclass
class MixtureQuality:
    modes_covered: int
    high_quality: float
    per_mode: list[int]


def mixture_quality(points: np.ndarray, mixture: Mixture, sigmas: float = 3.0,
                    min_share: float = 0.2) -> MixtureQuality:
    """High quality = within ``sigmas`` std of the nearest mode; a mode is covered when it holds at least
    ``min_share`` of its expected count of high-quality points (PacGAN's 20 of 2500 for 25 modes is 0.2)."""
    idx, dist = mixture.nearest(points)
    good = dist <= sigmas * mixture.std
    counts = np.bincount(idx[good], minlength=mixture.num_modes)
    expected = len(points) / mixture.num_modes
    return MixtureQuality(int((counts >= max(1.0, min_share * expected)).sum()), float(good.mean()),
                          counts.tolist())


def mixture_jsd(points: np.ndarray, mixture: Mixture, bandwidth: float | None = None, cell: float | None = None,
                margin: float = 0.5) -> float:
    """Jensen-Shannon divergence (nats, in [0, ln 2]) between the mixture and the samples, both smoothed by the
    same Gaussian kernel of ``bandwidth`` (default: the mixture's std) and discretised on a grid.

    Smoothing both sides identically makes this a consistent estimate of the JSD between the smoothed
    densities, which is zero exactly when the generator reproduces the mixture.
    """
    h = bandwidth or mixture.std
    cell = cell or h
    pts = np.asarray(points, dtype=np.float64)
    lo = np.minimum(mixture.centres.min(0), np.percentile(pts, 0.5, axis=0)) - margin
    hi = np.maximum(mixture.centres.max(0), np.percentile(pts, 99.5, axis=0)) + margin
    nx, ny = (np.ceil((hi - lo) / cell).astype(int) + 1).tolist()
    nx, ny = min(nx, 1200), min(ny, 1200)
    xs, ys = np.linspace(lo[0], hi[0], nx), np.linspace(lo[1], hi[1], ny)
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    p = mixture.density(np.stack([gx.ravel(), gy.ravel()], 1), extra_var=h * h).reshape(nx, ny)
    hist, _, _ = np.histogram2d(pts[:, 0], pts[:, 1], bins=[nx, ny],
                                range=[[xs[0] - (xs[1] - xs[0]) / 2, xs[-1] + (xs[1] - xs[0]) / 2],
                                       [ys[0] - (ys[1] - ys[0]) / 2, ys[-1] + (ys[1] - ys[0]) / 2]])
    from scipy.ndimage import gaussian_filter

    q = gaussian_filter(hist, sigma=(h / (xs[1] - xs[0]), h / (ys[1] - ys[0])), mode="constant")
    p, q = p / p.sum(), np.clip(q, 0.0, None) / max(q.sum(), 1e-300)
    p[p < 1e-15], q[q < 1e-15] = 0.0, 0.0  # denormals would make 0.5 * (p + q) underflow to 0
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        mask = a > 0
        return float((a[mask] * np.log(a[mask] / b[mask])).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, F] (the FID formula)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        eps = 1e-6 * np.eye(len(mu1))
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


class DigitsFeatureNet(nn.Module):
    """A small conv classifier of 8x8 digits; its 64-d penultimate layer is the feature space of the Frechet
    distance (the role Inception plays in FID)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 4, 64), nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch: int = 512) -> np.ndarray:
        self.eval()
        return torch.cat([self.body(x[i:i + batch]) for i in range(0, len(x), batch)]).numpy()


def train_digits_features(images: torch.Tensor, labels: torch.Tensor, epochs: int = 30, seed: int = 0,
                          lr: float = 2e-3) -> DigitsFeatureNet:
    """Train the feature classifier on images in [-1, 1] ([N, 1, 8, 8]); a few seconds on a CPU core."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DigitsFeatureNet()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), 64):
            idx = perm[i:i + 64]
            x = images[idx] + 0.05 * torch.randn(images[idx].shape, generator=gen)
            loss = F.cross_entropy(net(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def classifier_accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    net.eval()
    return float((net(images).argmax(1) == labels).float().mean())

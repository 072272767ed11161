"""The networks of the self-labelling GAN: generator, projection discriminator, classifier with its EMA copy.

Two architectures share one interface: MLPs for low-dimensional points (the 2-D mixtures) and small conv nets for
square grey images whose side is a power of two (the 8x8 digits). Labels are ints; a negative label means
"no label": the generator then gets no label embedding and the discriminator no projection term, so one module
serves the unconditional, self-labelled and class-conditional modes.

No batch norm anywhere: its running statistics would differ between data-parallel ranks (DeepSpeed never
syncs buffers after start-up) and between a training run and a gap evaluation on a copy.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def _label_embedding(labels: torch.Tensor, table: nn.Embedding | None) -> torch.Tensor | None:
    """Embeddings of the labels, zero rows where the label is negative (unlabelled); None without a table."""
    if table is None:
        return None
    known = labels >= 0
    emb = table(labels.clamp(min=0))
    return emb * known[:, None].to(emb.dtype)


class MLPGenerator(nn.Module):
    """z (+ label embedding) -> ``layers`` ReLU layers of ``hidden`` units -> a point in R^dim."""

    def __init__(self, latent_dim: int, num_labels: int, dim: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_labels, latent_dim) if num_labels > 0 else None
        widths = [latent_dim] + [hidden] * layers
        self.body = nn.Sequential(*[m for a, b in zip(widths[:-1], widths[1:], strict=True)
                                    for m in (nn.Linear(a, b), nn.ReLU())])
        self.out = nn.Linear(widths[-1], dim)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = _label_embedding(labels, self.embed)
        return self.out(self.body(z if emb is None else z + emb))


class ConvGenerator(nn.Module):
    """z (+ label embedding) -> 2x2 feature map -> (nearest upsample, 3x3 conv, ReLU) until ``size`` -> tanh."""

    def __init__(self, latent_dim: int, num_labels: int, channels: int, size: int, width: int) -> None:
        super().__init__()
        ups = int(math.log2(size // 2))
        self.embed = nn.Embedding(num_labels, latent_dim) if num_labels > 0 else None
        self.width = width
        self.fc = nn.Linear(latent_dim, width * 4)
        blocks: list[nn.Module] = []
        c = width
        for _ in range(ups):
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, max(c // 2, 16), 3, padding=1),
                       nn.ReLU()]
            c = max(c // 2, 16)
        self.body = nn.Sequential(*blocks)
        self.out = nn.Conv2d(c, channels, 3, padding=1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = _label_embedding(labels, self.embed)
        h = F.relu(self.fc(z if emb is None else z + emb)).view(-1, self.width, 2, 2)
        return torch.tanh(self.out(self.body(h)))


def mlp_trunk(dim: int, hidden: int, layers: int) -> nn.Sequential:
    widths = [dim] + [hidden] * layers
    return nn.Sequential(*[m for a, b in zip(widths[:-1], widths[1:], strict=True)
                           for m in (nn.Linear(a, b), nn.LeakyReLU(0.2))])


def conv_trunk(channels: int, size: int, width: int) -> tuple[nn.Sequential, int]:
    """Strided 3x3 convs halving the side down to 2x2, then flatten; returns (trunk, feature size)."""
    downs = int(math.log2(size // 2))
    layers: list[nn.Module] = []
    c_in, c = channels, max(width // (2 ** (downs - 1)), 16)
    for _ in range(downs):
        layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c_in, c = c, min(c * 2, width)
    layers.append(nn.Flatten())
    return nn.Sequential(*layers), c_in * 4


class ProjectionDiscriminator(nn.Module):
    """D(x, y) = psi(phi(x)) + <embed(y), phi(x)> (Miyato & Koyama); no projection term where y < 0."""

    def __init__(self, trunk: nn.Module, features: int, num_labels: int, spectral_norm: bool = False) -> None:
        super().__init__()
        self.trunk = trunk
        self.psi = nn.Linear(features, 1)
        self.embed = nn.Embedding(num_labels, features) if num_labels > 0 else None
        if spectral_norm:
            for m in [*self.trunk.modules(), self.psi]:
                if isinstance(m, nn.Linear | nn.Conv2d):
                    nn.utils.parametrizations.spectral_norm(m)
            if self.embed is not None:
                nn.utils.parametrizations.spectral_norm(self.embed)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._spectral_buffers_like_weights()
        h = self.trunk(x)
        out = self.psi(h).squeeze(1)
        emb = _label_embedding(labels, self.embed)
        if emb is not None:
            out = out + (emb * h).sum(dim=1)
        return out

    def _spectral_buffers_like_weights(self) -> None:
        """Spectral norm's power-iteration vectors (u, v) are buffers, which bf16/fp16 engines leave in float32
        while the weights they multiply are cast: bring them to the weights' precision (once; a no-op after)."""
        for module in self.modules():
            for chain in getattr(module, "parametrizations", {}).values():
                weight = chain.original
                for norm in chain:
                    for vec in ("_u", "_v"):
                        buf = getattr(norm, vec, None)
                        if buf is not None and buf.dtype != weight.dtype:
                            setattr(norm, vec, buf.to(weight.dtype))


def params_to_buffers(module: nn.Module) -> nn.Module:
    """Turn every parameter of ``module`` into a buffer of the same name: state, saved with the module and
    consolidated by DeepSpeed's zero_to_fp32, but never seen by an optimizer or ZeRO's partitioning."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            del sub._parameters[name]
            sub.register_buffer(name, p.detach().clone())
    return module


class Classifier(nn.Module):
    """C(x) -> logits over the K artificial labels, plus its exponential moving average and the label alignment.

    Buffers: ``ema.*`` (the EMA weights), ``confusion`` [num_classes, K] (decayed counts of manual label vs
    C_ema's prediction on labelled real data) and ``align`` [num_classes] (manual class -> artificial label, -1
    while unknown). Keeping them in the module makes them part of every checkpoint, so a resumed run continues
    with exactly the same self-labeller.
    """

    def __init__(self, trunk: nn.Module, features: int, num_clusters: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(trunk, nn.Linear(features, num_clusters))
        self.ema = params_to_buffers(copy.deepcopy(self.net))
        self.register_buffer("confusion", torch.zeros(max(num_classes, 1), num_clusters))
        self.register_buffer("align", torch.full((max(num_classes, 1),), -1, dtype=torch.long))

    def forward(self, x: torch.Tensor, use_ema: bool = False) -> torch.Tensor:
        if use_ema:  # the EMA weights are buffers: bf16/fp16 engines cast parameters only, so they stay float32
            return self.ema(x.to(next(self.ema.buffers()).dtype))
        return self.net(x)

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        ema = dict(self.ema.named_buffers())
        for name, p in self.net.named_parameters():
            ema[name].mul_(decay).add_(p.detach().to(ema[name].dtype), alpha=1.0 - decay)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of ``module`` need no gradient inside the block: a G step goes through D without touching
    D's gradients (which under ZeRO would land in D's reduction buckets)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)

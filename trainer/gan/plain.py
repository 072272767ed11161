"""The GAN family trained in one process with plain torch: same ``train_step``, no Ray, no DeepSpeed.

The experiments (update-ratio regimes, self-labelling at several label fractions, digits comparisons) train
dozens of small GANs on 2 CPU cores; going through Ray and DeepSpeed would multiply their cost for nothing the
spine tests do not already prove. ``PlainEngine`` has the part of a DeepSpeed engine a family uses (forward,
``backward``, ``step`` that also clears gradients), so the family code is exactly the one the spine runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer.families.base import Family, OptimConfig, StepContext


class PlainEngine:
    """Forward, backward and step of one network, like a DeepSpeed engine without partitioning."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module, self.optimizer = module, optimizer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def plain_engines(family: Family, optim: OptimConfig, seed: int = 0) -> dict[str, PlainEngine]:
    torch.manual_seed(seed)
    modules = family.build_modules()
    optimizers = family.build_optimizers(modules, optim)
    return {name: PlainEngine(m, optimizers[name]) for name, m in modules.items()}


@dataclass
class InMemoryData:
    """Decoded samples held in memory; ``batches`` draws global batches like the stream (one rank)."""

    samples: list[dict[str, Any]]

    def batch(self, family: Family, size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, len(self.samples), (size,), generator=generator).tolist()
        return family.collate([self.samples[i] for i in idx])

    def all(self, family: Family) -> dict[str, torch.Tensor]:
        return family.collate(self.samples)


def train_plain(family: Family, engines: Mapping[str, PlainEngine], data: InMemoryData, steps: int,
                batch_size: int, seed: int = 0, first_step: int = 0,
                callback: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    """``steps`` loop steps of ``family.train_step``; ``batch_size`` real samples per D update. Returns the
    last metrics and the rate."""
    gen = torch.Generator().manual_seed(seed)
    per_step = batch_size * getattr(family.config, "d_steps", 1)
    metrics: dict[str, float] = {}
    start = time.monotonic()
    for step in range(first_step, first_step + steps):
        batch = data.batch(family, per_step, gen)
        ctx = StepContext(step=step, rank=0, world_size=1, device=torch.device("cpu"), dtype=torch.float32)
        metrics = family.train_step(engines, batch, ctx)
        if callback is not None:
            callback(step + 1, metrics)
    return {**metrics, "steps_per_s": steps / max(time.monotonic() - start, 1e-9)}

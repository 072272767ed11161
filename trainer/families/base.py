"""What a model family tells the shared training loop; the loop knows nothing else about it.

A family owns named networks (one for a transformer or VAE, two for a GAN). The loop wraps each in its own
DeepSpeed engine with the optimizer the family chose, and calls ``train_step`` with the engines: the family
decides the order of forward, backward and step, so one-network and two-network families need no special case.
Everything here must work with torch alone, so exported models load without DeepSpeed or Ray.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.distributed as dist
from torch import nn

from trainer.typed_config import ConfigError


class Engine(Protocol):
    """The part of a DeepSpeed engine a family uses (a plain-torch stand-in satisfies it for export/eval)."""

    module: nn.Module

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...


@dataclass
class OptimConfig:
    """Optimizer settings shared by the families (AdamW; torch's, so no extension build is needed)."""

    lr: float = 3e-4
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8

    def __post_init__(self) -> None:
        values = {"lr": self.lr, "weight_decay": self.weight_decay, "beta1": self.beta1, "beta2": self.beta2,
                  "eps": self.eps}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"{bad[0]} must be a finite number, got {values[bad[0]]}")
        if self.lr <= 0 or self.eps <= 0 or self.weight_decay < 0:
            raise ValueError(f"lr and eps must be > 0 and weight_decay >= 0, got lr={self.lr}, eps={self.eps}, "
                             f"weight_decay={self.weight_decay}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")


@dataclass
class StepContext:
    step: int
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    seed: int = 0  # trainer.seed: a family's per-step randomness (chunk choice, noise) should follow it

    def batch_share(self, local_units: torch.Tensor) -> torch.Tensor:
        """world x this rank's units (real samples, tokens) / all ranks' units, this step. DeepSpeed averages the
        ranks' gradients with equal weight, so a rank's mean loss times its share makes that average the global
        batch's mean: in a padded last batch (drop_last=false) or one with skipped samples, a rank with fewer real
        samples no longer counts as much as a full one, and the result no longer depends on the world size.
        A collective: every rank calls it in the same step. 1 on one rank."""
        units = local_units.detach().float().reshape(())
        if self.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return torch.ones((), device=units.device)
        total = units.clone()
        dist.all_reduce(total)
        return self.world_size * units / total.clamp(min=1)


DRAW_OPTIONS = ("temperature", "top_k", "top_p", "value_temperature", "value_top_p", "labels", "images", "mean_of")
"""Every sampling option `dgm sample` knows (a family's ``draw_options`` is a subset)."""


class Family(ABC):
    """One model family: its config type, networks, batch layout, step, evaluation and sampling."""

    name: ClassVar[str]
    config_cls: ClassVar[type]
    draw_options: frozenset[str] = frozenset()
    """What ``sample_images`` takes besides n and the generator, among DRAW_OPTIONS: `dgm sample` refuses, by
    name, an option given to a family that would ignore it. A family may narrow it per model in ``__init__``."""
    takes_prompt: ClassVar[bool] = False
    """Whether ``sample_images`` draws images for a caption (``prompt=[...]``): what `dgm sample --prompt` needs."""
    max_zero_stage: ClassVar[int] = 3
    """The highest ZeRO stage the family trains under; ``zero_stage_limit`` says why when it is below 3."""
    zero_stage_limit: ClassVar[str] = ""

    def __init__(self, config: Any, data_info: Mapping[str, Any]) -> None:
        self.config = config
        self.data_info = dict(data_info)

    @abstractmethod
    def build_modules(self) -> dict[str, nn.Module]:
        """The named networks, freshly initialised (deterministic under torch.manual_seed)."""

    def updates_per_step(self, name: str) -> int:
        """How many optimizer steps network ``name`` takes per training step: its learning-rate schedule
        (trainer.schedule, in training steps) is stretched by that much, so every network decays over the run."""
        return 1

    def build_optimizers(self, modules: Mapping[str, nn.Module], optim: OptimConfig) -> dict[str, torch.optim.Optimizer]:
        """One AdamW per network; no weight decay on biases, norms and embeddings' gains (1-D tensors)."""
        out = {}
        for name, module in modules.items():
            decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
            rest = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
            out[name] = torch.optim.AdamW(
                [{"params": decay, "weight_decay": optim.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
            )
        return out

    @abstractmethod
    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Decoded samples (dicts from the codec, with ``key`` and ``valid``) -> a batch of tensors."""

    @abstractmethod
    def train_step(self, engines: Mapping[str, Engine], batch: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        """Forward, backward and step every engine; returns scalar metrics (loss first), the same names on every
        rank and every step (the loop averages them over ranks by position). Weight the loss by the batch's
        ``valid`` samples and by ``ctx.batch_share``, or padding trains and the result depends on the world size."""

    @abstractmethod
    def evaluate(self, modules: Mapping[str, nn.Module], batch: dict[str, torch.Tensor]
                 ) -> dict[str, float | tuple[float, float]]:
        """Held-out metrics for one batch. The caller averages each over batches and ranks weighted by the batch's
        real samples, or by the weight given with it as ``(value, weight)`` (a ratio's denominator)."""

    @abstractmethod
    def sample_images(self, modules: Mapping[str, nn.Module], n: int, generator: torch.Generator,
                      **options: Any) -> torch.Tensor:
        """``n`` samples as images [n, C, H, W] with values in [0, 1]."""

    @property
    def variant(self) -> str:
        """Which of the family's models this is, where that decides what sampling takes (empty: one kind)."""
        return ""

    @property
    def sample_classes(self) -> int:
        """How many class labels ``sample_images(labels=...)`` takes (0: none, not class-conditional)."""
        return 0

    @property
    def label_classes(self) -> int:
        """How many classes the training data's labels are read as (0: the model does not read them as classes):
        every label the data holds must be in 0..label_classes-1."""
        return 0

    def label_advice(self, needed: int) -> str:
        """What to change so the model has ``needed`` classes (said when the data holds more than it has)."""
        return f"raise model.num_classes to at least {needed}"

    def check_labels(self, info: Mapping[str, Any], url: str) -> None:
        """Refuse, before training starts, a data set (``info``: its ``data_info``) holding a class label the
        model has no class for: the shards record their labels, so this is not left to the first batch."""
        k = self.label_classes
        outside = [label for label in (info.get("label_counts") or {}) if k and not int(label) < k]
        if outside:
            counts = info["label_counts"]
            raise ConfigError(f"data set {url} holds class labels {', '.join(outside)} "
                              f"({sum(counts[x] for x in outside)} samples), but this {self.name} model has "
                              f"{k} classes (0..{k - 1}): {self.label_advice(max(int(x) for x in outside) + 1)}")

    def default_labels(self, n: int) -> list[int]:
        """The class labels of ``n`` draws when none are given: the classes the training data holds, in turn
        (every class 0..k-1 when its shards record no labels), so a default grid shows no class never trained."""
        k = self.sample_classes
        seen = [int(label) for label in (self.data_info.get("label_counts") or {}) if int(label) < k]
        classes = seen or list(range(k))
        return [classes[i % len(classes)] for i in range(n)]

    def checked_labels(self, labels: Sequence[int] | None, n: int | None = None) -> list[int] | None:
        """``labels`` for ``sample_images`` (one per sample when ``n`` is given), refused by value when the model
        has no such class (an embedding lookup would fail with a bare IndexError, or an unconditional model would
        silently ignore them)."""
        if labels is None:
            return None
        labels = [int(x) for x in labels]
        if n is not None and len(labels) != n:
            raise ValueError(f"labels {labels}: one label per sample, {n} samples")
        k = self.sample_classes
        if not k:
            raise ValueError(f"labels {labels}: this {self.name} model is not class-conditional")
        if any(not 0 <= x < k for x in labels):
            raise ValueError(f"labels {labels}: this {self.name} model has {k} classes (0..{k - 1})")
        return labels

    def check_eval_data(self, eval_info: Mapping[str, Any], url: str) -> None:
        """Refuse a held-out set this model cannot be scored on (``eval_info``: its ``data_info``), before
        training starts. Families whose samples depend on side files (a tokenizer, a dVAE) compare them here."""
        return None

    def export_files(self) -> dict[str, bytes]:
        """Extra files an export must carry (tokenizer, codec settings...)."""
        return {}

    def attach_export(self, export_dir: str) -> None:
        """Called by ``load_export`` once the files are verified: read back what ``export_files`` wrote."""
        return None

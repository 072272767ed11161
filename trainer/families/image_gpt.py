"""Image GPT: a decoder-only transformer over quantised grey pixels in raster order.

The sequence is [start, x_0, ..., x_{n-1}]: the start token is the class (class-conditional) or a shared
"unconditional" token, and each x_i is a grey level in 0..levels-1. Sampling feeds one pixel at a time through
the key/value cache. The 8x8 digits at 17 grey levels are its home data set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.families.base import Engine, Family, StepContext
from trainer.sampling import sample_logits
from trainer.transformer import KVCache, TransformerConfig, TransformerStack, init_weights


@dataclass
class ImageGPTConfig:
    levels: int = 17
    num_classes: int = 10
    class_conditional: bool = True
    transformer: TransformerConfig = field(default_factory=TransformerConfig)

    def __post_init__(self) -> None:
        if not 2 <= self.levels <= 256:
            raise ValueError(f"model.levels must be in 2..256, got {self.levels}")
        if self.num_classes < (1 if self.class_conditional else 0):
            raise ValueError(f"model.num_classes must be >= 1 for a class-conditional model (>= 0 otherwise), got "
                             f"{self.num_classes}")


class ImageGPT(nn.Module):
    def __init__(self, cfg: ImageGPTConfig, seq_len: int) -> None:
        super().__init__()
        self.cfg, self.seq_len = cfg, seq_len
        d = cfg.transformer.d_model
        self.pixel_emb = nn.Embedding(cfg.levels, d)
        self.start_emb = nn.Embedding(cfg.num_classes + 1, d)  # last row: the unconditional start token
        self.pos_emb = nn.Embedding(seq_len, d)
        self.stack = TransformerStack(cfg.transformer)
        self.head = nn.Linear(d, cfg.levels, bias=False)
        init_weights(self)

    def embed(self, start: torch.Tensor, pixels: torch.Tensor, offset: int) -> torch.Tensor:
        """Embeddings of positions ``offset..``: the start token at position 0, then the given pixels."""
        parts = []
        if offset == 0:
            parts.append(self.start_emb(start)[:, None])
        if pixels.shape[1]:
            parts.append(self.pixel_emb(pixels))
        x = torch.cat(parts, dim=1)
        return x + self.pos_emb(torch.arange(offset, offset + x.shape[1], device=x.device))

    def forward(self, start: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """Logits for every pixel given the start token and the pixels before it: [B, n, levels]."""
        return self.head(self.stack(self.embed(start, pixels[:, :-1], 0)))

    def step(self, start: torch.Tensor, pixels: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits of the next pixel after feeding the new ``pixels`` (or the start token) through the cache."""
        x = self.embed(start, pixels, cache.length)
        return self.head(self.stack(x, cache=cache)[:, -1])


class ImageGPTFamily(Family):
    name = "image_gpt"
    config_cls = ImageGPTConfig
    draw_options = frozenset({"temperature", "top_k", "top_p", "labels"})

    def __init__(self, config: ImageGPTConfig, data_info: Mapping[str, Any]) -> None:
        super().__init__(config, data_info)
        h, w, c = data_info.get("image_shape", (8, 8, 1))
        if c != 1:
            raise ValueError(f"image_gpt models grey images; the dataset's images have {c} channels")
        self.height, self.width = int(h), int(w)

    @property
    def seq_len(self) -> int:
        return self.height * self.width

    def build_modules(self) -> dict[str, nn.Module]:
        return {"model": ImageGPT(self.config, self.seq_len)}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        for s in samples:
            if s["image"].shape != (self.height, self.width, 1):
                raise ValueError(f"sample {s.get('key', '?')}: image of shape {s['image'].shape}, this model reads "
                                 f"{self.height}x{self.width}x1 (the training set's): prepare every split alike")
        images = np.stack([s["image"][:, :, 0] for s in samples]).astype(np.float32)
        levels = np.rint(images * (self.config.levels - 1) / 255.0).astype(np.int64)
        unconditional = self.config.num_classes
        labels = [self._label(s) if self.config.class_conditional else unconditional for s in samples]
        return {
            "pixels": torch.from_numpy(levels.reshape(len(samples), -1)),
            "start": torch.tensor(labels, dtype=torch.long),
            "valid": torch.tensor([bool(s.get("valid", True)) for s in samples]),
        }

    def _label(self, sample: dict[str, Any]) -> int:
        """A class-conditional model's start token: the sample's label, which must be one of its classes (a missing
        one would train the unconditional token instead, and leave the class rows that sampling uses untrained)."""
        label = sample.get("label")
        if label is None or not 0 <= int(label) < self.config.num_classes:
            raise ValueError(f"sample {sample.get('key', '?')}: label {label!r}, a class-conditional model with "
                             f"model.num_classes={self.config.num_classes} needs one in 0..{self.config.num_classes - 1}"
                             " (keep 'label' in the codec's fields, or set model.class_conditional=false)")
        return int(label)

    def nll(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean negative log-likelihood per pixel of every (valid) image, in nats: [B]."""
        logits = model(batch["start"], batch["pixels"])
        return F.cross_entropy(logits.float().transpose(1, 2), batch["pixels"], reduction="none").mean(dim=1)

    def train_step(self, engines: Mapping[str, Engine], batch: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        engine = engines["model"]
        per_image = self.nll(engine, batch)
        valid = batch["valid"].float()
        loss = (per_image * valid).sum() / valid.sum().clamp(min=1) * ctx.batch_share(valid.sum())
        engine.backward(loss)
        engine.step()
        return {"loss": float(loss.detach()), "bits_per_pixel": float(loss.detach()) / np.log(2)}

    @torch.no_grad()
    def evaluate(self, modules: Mapping[str, nn.Module], batch: dict[str, torch.Tensor]) -> dict[str, float]:
        per_image = self.nll(modules["model"], batch)
        valid = batch["valid"].float()
        loss = float((per_image * valid).sum() / valid.sum().clamp(min=1))
        return {"loss": loss, "bits_per_pixel": loss / np.log(2)}

    @torch.no_grad()
    def generate(self, model: ImageGPT, start: torch.Tensor, generator: torch.Generator | None = None,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, use_cache: bool = True) -> torch.Tensor:
        """Pixels [B, n] drawn one at a time; ``use_cache=False`` recomputes the prefix (the reference)."""
        b = start.shape[0]
        pixels = torch.zeros(b, 0, dtype=torch.long, device=start.device)
        cache = model.stack.new_cache() if use_cache else None
        for _ in range(self.seq_len):
            if cache is not None:
                logits = model.step(start, pixels[:, -1:] if pixels.shape[1] else pixels, cache)
            else:
                logits = model.head(model.stack(model.embed(start, pixels, 0)))[:, -1]
            nxt = sample_logits(logits, temperature, top_k, top_p, generator)
            pixels = torch.cat([pixels, nxt[:, None]], dim=1)
        return pixels

    @property
    def sample_classes(self) -> int:
        return self.config.num_classes if self.config.class_conditional else 0

    @property
    def label_classes(self) -> int:
        return self.sample_classes

    def sample_images(self, modules: Mapping[str, nn.Module], n: int, generator: torch.Generator,
                      **options: Any) -> torch.Tensor:
        model = modules["model"]
        device = next(model.parameters()).device
        labels = self.checked_labels(options.pop("labels", None), n)
        if labels is None:
            labels = self.default_labels(n) if self.config.class_conditional else [self.config.num_classes] * n
        n = len(labels)
        start = torch.as_tensor(labels, dtype=torch.long, device=device)
        pixels = self.generate(model, start, generator, **options)
        return (pixels.float() / (self.config.levels - 1)).reshape(n, 1, self.height, self.width)

"""GAN by self-labelling and self-attention (Watanabe & Favaro, ICML 2021, reconstructed from its abstract).

Networks (each its own DeepSpeed engine): ``generator`` G(z, y), ``discriminator`` D(x, y) (projection
discriminator, hinge loss) and, when self-labelling, ``classifier`` C with its EMA copy and label alignment
(see trainer/gan/nets.py). Modes:

- ``unconditional``: G(z), D(x); labels are never read.
- ``self_labelled``: the latent space is cut into K cells (nearest of K fixed random anchors); y(z) = cell of z is
  the artificial label and G(z, y(z)) is trained to fool D(., y(z)). C learns y(z) from G(z); its EMA labels real
  data, and a real self-label is used only when C_ema's top softmax probability reaches ``confidence`` (the
  paper's "self-attention"); other real samples get the unconditional D term (no projection). Manual labels,
  for the ``label_fraction`` of real samples that have one, are mapped to artificial labels by Hungarian
  matching of (manual label, C_ema prediction) counts and used instead; C also trains on them.
- ``conditional``: the class-conditional baseline (every real label used, fake labels drawn uniformly).

A loop step is ``d_steps`` D updates (the rank's real micro-batch is split evenly between them), then
``g_steps`` G updates, then ``c_steps`` C updates each followed by the EMA update. Noise comes from a generator
seeded by (model.seed, trainer.seed, step, rank), so a resumed run draws exactly what an uninterrupted one would.

Choices the paper's text does not fix are ``SLSAGanConfig`` fields; their defaults are documented there and in
docs/gan.md.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trainer.duality_gap import GanGame
from trainer.families.base import Engine, Family, OptimConfig, StepContext
from trainer.gan import metrics
from trainer.gan.nets import (
    Classifier,
    ConvGenerator,
    MLPGenerator,
    ProjectionDiscriminator,
    conv_trunk,
    frozen,
    mlp_trunk,
)

MODES = ("unconditional", "self_labelled", "conditional")


@dataclass
class SLSAGanConfig:
    """Model and training choices. Defaults: the reproduction settings of the specs (2 x 128 MLPs, latent 100)."""

    mode: str = "self_labelled"
    arch: str = "auto"                # "mlp" (points), "conv" (square images, side a power of 2), auto: by data
    latent_dim: int = 100
    num_clusters: int = 8             # K: artificial labels (cells of z-space); classes in conditional mode
    num_classes: int = 0              # manual label classes; 0: same as num_clusters
    hidden: int = 128                 # MLP width / widest conv channel count
    layers: int = 2                   # MLP hidden layers (G, D and C alike)
    loss: str = "hinge"               # "hinge" (paper) or "bce" (non-saturating; the duality-gap paper's GAN)
    d_steps: int = 1                  # D updates per loop step
    g_steps: int = 1                  # G updates per loop step
    c_steps: int = 1                  # classifier updates per loop step (self_labelled)
    fake_batch: int = 0               # fakes per update; 0: the size of one real chunk
    confidence: float = 0.9           # tau: min C_ema top probability for a real self-label to be used
    ema_decay: float = 0.99           # m in C_ema <- m C_ema + (1 - m) C
    self_label_start: int = 0         # loop steps before self-labels are used at all
    label_fraction: float = 0.0       # share of real samples whose manual label is known (by a hash of the key)
    label_seed: int = 0               # which samples those are
    align_decay: float = 0.98         # decay per step of the (manual, predicted) counts behind the alignment
    c_real_weight: float = 1.0        # weight of C's cross-entropy on manually labelled real data
    partition_seed: int = 1234        # the K anchors of the latent partition
    seed: int = 0                     # noise draws (with step and rank)
    g_lr_scale: float = 1.0
    d_lr_scale: float = 1.0
    c_lr_scale: float = 1.0
    d_spectral_norm: bool = False
    points_per_image: int = 512       # 2-D data: points drawn per sample picture
    image_extent: float = 0.0         # 2-D data: half-width of the pictures; 0: from the data set's scale

    def __post_init__(self) -> None:
        checks = [
            (self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
            (self.arch in ("auto", "mlp", "conv"), f"arch must be auto, mlp or conv, got {self.arch!r}"),
            (self.loss in ("hinge", "bce"), f"loss must be hinge or bce, got {self.loss!r}"),
            (self.latent_dim >= 1 and self.hidden >= 1 and self.layers >= 1, "latent_dim, hidden, layers >= 1"),
            (self.num_clusters >= 1 and self.num_classes >= 0, "num_clusters >= 1 and num_classes >= 0"),
            (min(self.d_steps, self.g_steps, self.c_steps) >= 1, "d_steps, g_steps and c_steps must be >= 1"),
            (self.fake_batch >= 0 and self.self_label_start >= 0, "fake_batch, self_label_start >= 0"),
            (0.0 <= self.confidence <= 1.0, f"confidence must be in [0, 1], got {self.confidence}"),
            (0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}"),
            (0.0 <= self.label_fraction <= 1.0, f"label_fraction must be in [0, 1], got {self.label_fraction}"),
            (0.0 <= self.align_decay <= 1.0, f"align_decay must be in [0, 1], got {self.align_decay}"),
            (self.mode != "self_labelled" or self.classes <= self.num_clusters,
             f"self-labelling maps {self.classes} manual classes onto num_clusters={self.num_clusters} cells: "
             "needs num_classes <= num_clusters"),
            (self.mode != "conditional" or self.num_classes in (0, self.num_clusters),
             f"conditional mode has one label per class: num_clusters is the class count, so num_classes must be 0 "
             f"or equal to it, got num_classes={self.num_classes}, num_clusters={self.num_clusters}"),
            *((math.isfinite(v) and v > 0, f"{name} must be a finite number > 0, got {v}")
              for name, v in (("g_lr_scale", self.g_lr_scale), ("d_lr_scale", self.d_lr_scale),
                              ("c_lr_scale", self.c_lr_scale))),
            (math.isfinite(self.c_real_weight) and self.c_real_weight >= 0,
             f"c_real_weight must be a finite number >= 0, got {self.c_real_weight}"),
            (self.points_per_image >= 1, f"points_per_image must be >= 1, got {self.points_per_image}"),
            (math.isfinite(self.image_extent) and self.image_extent >= 0,
             f"image_extent must be a finite number >= 0 (0: from the data set's scale), got {self.image_extent}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def classes(self) -> int:
        return self.num_classes or self.num_clusters


def labelled_share(key: str, seed: int) -> float:
    """A uniform number in [0, 1) from (seed, sample key): the same samples are labelled on any world size."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


class SLSAGanFamily(Family):
    name = "slsa_gan"
    config_cls = SLSAGanConfig
    draw_options = frozenset({"labels", "temperature"})
    max_zero_stage = 2
    zero_stage_limit = "the classifier's EMA copy is updated from whole parameters, which stage 3 partitions"

    def __init__(self, config: SLSAGanConfig, data_info: Mapping[str, Any]) -> None:
        super().__init__(config, data_info)
        codec = (self.data_info.get("codec") or {}).get("name", "image")
        shape = [int(s) for s in self.data_info.get("image_shape", (8, 8, 1))]
        self.points = codec == "points"
        arch = config.arch if config.arch != "auto" else ("mlp" if self.points else "conv")
        if arch == "mlp" and not self.points:
            raise ValueError(f"model.arch mlp takes point data (codec points); this data set is {codec} images "
                             f"{shape}: use model.arch conv (or auto)")
        if arch == "mlp":
            self.dim = int(np.prod(shape))
        else:
            if self.points or len(shape) != 3 or shape[0] != shape[1] or shape[0] < 4 or shape[0] & (shape[0] - 1):
                raise ValueError(f"model.arch conv needs square images with a power-of-2 side >= 4, got {shape}")
            self.size, self.channels = shape[0], shape[2]
        self.arch = arch
        anchors = torch.randn(config.num_clusters, config.latent_dim,
                              generator=torch.Generator().manual_seed(config.partition_seed))
        self.anchors = anchors / anchors.norm(dim=1, keepdim=True)
        self.mixture = None
        source = self.data_info.get("source") or {}
        if source.get("name") == "mixture":
            from data_pipeline.sources.mixtures import MixtureConfig

            self.mixture = MixtureConfig(**source.get("settings", {})).mixture()

    # ------------------------------------------------------------------ networks
    @property
    def g_labels(self) -> int:
        """Label embeddings of G and D: none when unconditional."""
        return 0 if self.config.mode == "unconditional" else self.config.num_clusters

    @property
    def sample_classes(self) -> int:
        return self.g_labels

    def _trunk(self) -> tuple[nn.Module, int]:
        c = self.config
        if self.arch == "mlp":
            return mlp_trunk(self.dim, c.hidden, c.layers), c.hidden
        return conv_trunk(self.channels, self.size, c.hidden)

    def build_modules(self) -> dict[str, nn.Module]:
        c = self.config
        if self.arch == "mlp":
            gen: nn.Module = MLPGenerator(c.latent_dim, self.g_labels, self.dim, c.hidden, c.layers)
        else:
            gen = ConvGenerator(c.latent_dim, self.g_labels, self.channels, self.size, c.hidden)
        trunk, features = self._trunk()
        modules = {"generator": gen,
                   "discriminator": ProjectionDiscriminator(trunk, features, self.g_labels, c.d_spectral_norm)}
        if c.mode == "self_labelled":
            trunk, features = self._trunk()
            modules["classifier"] = Classifier(trunk, features, c.num_clusters, c.classes)
        return modules

    def build_optimizers(self, modules: Mapping[str, nn.Module], optim: OptimConfig) -> dict[str, torch.optim.Optimizer]:
        """AdamW per network (the trainer's betas; GAN configs use beta1 0.5), learning rate scaled per network."""
        out = super().build_optimizers(modules, optim)
        scales = {"generator": self.config.g_lr_scale, "discriminator": self.config.d_lr_scale,
                  "classifier": self.config.c_lr_scale}
        for name, opt in out.items():
            for group in opt.param_groups:
                group["lr"] = optim.lr * scales[name]
        return out

    # ------------------------------------------------------------------ data
    def check_eval_data(self, eval_info: Mapping[str, Any], url: str) -> None:
        """Held-out samples of another kind (images for a points model, another image shape) failed at the first
        evaluation (and in the gap monitor at every checkpoint) as a bare KeyError or a shape error."""
        from data_pipeline.manifest import DatasetError

        def kind(info: Mapping[str, Any]) -> str:
            codec = (info.get("codec") or {}).get("name", "image")
            shape = "x".join(str(int(s)) for s in info.get("image_shape", ()))
            return f"{codec} {shape}" if codec != "points" else f"points of dimension {shape}"

        if kind(eval_info) != kind(self.data_info):
            raise DatasetError(f"data.eval {url}: holds {kind(eval_info)}, but this model was built for its "
                               f"training data's {kind(self.data_info)}: give a held-out set of the same kind")

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.points:
            x = torch.from_numpy(np.stack([np.asarray(s["point"], dtype=np.float32) for s in samples]))
        else:
            images = np.stack([s["image"] for s in samples]).astype(np.float32)
            x = torch.from_numpy(images).permute(0, 3, 1, 2) / 127.5 - 1.0
        labels = torch.tensor([int(s.get("label", -1)) for s in samples], dtype=torch.long)
        if self.reads_labels and bool((labels >= self.config.classes).any()):
            bad = int(labels.argmax())
            raise ValueError(f"sample {samples[bad].get('key', bad)}: label {int(labels[bad])} is outside the "
                             f"model's {self.config.classes} classes (model.num_classes, or model.num_clusters when "
                             f"it is 0: labels 0..{self.config.classes - 1})")
        if self.config.mode == "conditional":
            labelled = labels >= 0
        elif self.config.mode == "self_labelled" and self.config.label_fraction > 0:
            labelled = torch.tensor([labelled_share(s.get("key", ""), self.config.label_seed)
                                     < self.config.label_fraction for s in samples]) & (labels >= 0)
        else:
            labelled = torch.zeros(len(samples), dtype=torch.bool)
        return {"x": x, "label": labels, "labelled": labelled,
                "valid": torch.tensor([bool(s.get("valid", True)) for s in samples])}

    @staticmethod
    def real_samples(batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The batch without its padding, inputs in the networks' precision (bf16/fp16 engines cast parameters)."""
        real = {k: v[batch["valid"]] for k, v in batch.items()}
        real["x"] = real["x"].to(dtype)
        return real

    @property
    def label_classes(self) -> int:
        return self.config.classes if self.reads_labels else 0

    def label_advice(self, needed: int) -> str:
        c = self.config
        if c.mode == "conditional" or not c.num_classes:  # the classes are the clusters
            return f"raise model.num_clusters to at least {needed}"
        if needed <= c.num_clusters:
            return f"raise model.num_classes to at least {needed}"
        return f"raise model.num_classes and model.num_clusters to at least {needed} (self-labelling needs " \
               "num_classes <= num_clusters)"

    @property
    def reads_labels(self) -> bool:
        """Whether training uses the data's labels (conditional; self-labelled with manual labels)."""
        c = self.config
        return c.mode == "conditional" or (c.mode == "self_labelled" and c.label_fraction > 0)

    def noise(self, n: int, generator: torch.Generator | None, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, y): z ~ N(0, I) and its label: its latent cell (self-labelled), a uniform class (conditional),
        or -1 (unconditional). z is drawn in float32 on the CPU (the same draws on any device and precision)."""
        z = torch.randn(n, self.config.latent_dim, generator=generator)
        if self.config.mode == "self_labelled":
            y = (z @ self.anchors.T).argmax(dim=1)
        elif self.config.mode == "conditional":
            y = torch.randint(0, self.config.num_clusters, (n,), generator=generator)
        else:
            y = torch.full((n,), -1, dtype=torch.long)
        return z.to(device=device, dtype=dtype), y.to(device)

    @torch.no_grad()
    def real_labels(self, classifier: nn.Module | None, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """D's label of every real sample: aligned manual label, confident self-label, or -1 (no projection)."""
        x, labels, labelled = batch["x"], batch["label"], batch["labelled"]
        y = torch.full_like(labels, -1)
        if self.config.mode == "conditional":
            return torch.where(labelled, labels, y)
        if self.config.mode != "self_labelled" or classifier is None:
            return y
        if step >= self.config.self_label_start:
            probs = F.softmax(classifier(x, use_ema=True).float(), dim=1)
            conf, pred = probs.max(dim=1)
            y = torch.where(conf >= self.config.confidence, pred, y)
        if labelled.any():
            mapped = classifier.align[labels.clamp(min=0, max=len(classifier.align) - 1)]
            y = torch.where(labelled & (mapped >= 0), mapped, y)
        return y

    @torch.no_grad()
    def update_alignment(self, classifier: Classifier, batch: dict[str, torch.Tensor], world_size: int) -> None:
        """Decay the (manual label, C_ema prediction) counts, add this batch's (summed over ranks), re-match."""
        lab = batch["labelled"] & batch["valid"]
        counts = torch.zeros_like(classifier.confusion)
        if lab.any():
            pred = classifier(batch["x"][lab], use_ema=True).argmax(dim=1)
            counts.index_put_((batch["label"][lab], pred), torch.ones_like(pred, dtype=counts.dtype),
                              accumulate=True)
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        classifier.confusion.mul_(self.config.align_decay).add_(counts)
        if classifier.confusion.sum() > 0:
            mapping = metrics.hungarian_mapping(classifier.confusion.double().cpu().numpy())
            classifier.align.copy_(torch.from_numpy(mapping))

    # ------------------------------------------------------------------ training
    def d_loss(self, d_real: torch.Tensor, d_fake: torch.Tensor, real_share: torch.Tensor | float = 1.0
               ) -> torch.Tensor:
        """In float32 whatever the networks' precision. A rank whose batch holds no real sample (padding only)
        gets a real term of 0 that still reaches every D parameter, so its backward is the same collective.
        ``real_share`` (``StepContext.batch_share`` of the real samples) weights the real term so that the ranks'
        average is the mean over all real samples; every rank draws the same number of fakes."""
        d_real, d_fake = d_real.float(), d_fake.float()
        real_term = (F.relu(1 - d_real) if self.config.loss == "hinge" else F.softplus(-d_real))
        real_term = real_term.mean() if real_term.numel() else real_term.sum()
        fake_term = F.relu(1 + d_fake) if self.config.loss == "hinge" else F.softplus(d_fake)
        return real_term * real_share + fake_term.mean()

    def g_loss(self, d_fake: torch.Tensor) -> torch.Tensor:
        d_fake = d_fake.float()
        return -d_fake.mean() if self.config.loss == "hinge" else F.softplus(-d_fake).mean()

    def classifier_loss(self, C: Callable[[torch.Tensor], torch.Tensor], fake: torch.Tensor, y_fake: torch.Tensor,
                        known_x: torch.Tensor, known_y: torch.Tensor, known_share: torch.Tensor | None
                        ) -> torch.Tensor:
        """C's cross-entropy on G's samples and their cells, plus ``c_real_weight`` x that on this rank's reals
        with an aligned manual label, weighted by its share of them (``StepContext.batch_share``): ranks hold
        unequal numbers of labelled reals, and an unweighted mean halved a rank's term beside one with none."""
        loss = F.cross_entropy(C(fake).float(), y_fake)
        if len(known_y):
            loss = loss + self.config.c_real_weight * known_share * F.cross_entropy(C(known_x).float(), known_y)
        return loss

    def _rng(self, ctx: StepContext, what: int) -> torch.Generator:
        """The noise of one (step, rank, use), from model.seed and trainer.seed (0 adds nothing: runs before
        trainer.seed counted draw what they drew)."""
        return torch.Generator().manual_seed(
            (self.config.seed * 1_000_003 + ctx.seed * 15_485_863 + ctx.step * 7919 + ctx.rank * 104_729 + what)
            % (2**63))

    def updates_per_step(self, name: str) -> int:
        c = self.config
        return {"discriminator": c.d_steps, "generator": c.g_steps, "classifier": c.c_steps}.get(name, 1)

    def train_step(self, engines: Mapping[str, Engine], batch: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        c = self.config
        G, D, C = engines["generator"], engines["discriminator"], engines.get("classifier")
        classifier = C.module if C is not None else None
        gen = self._rng(ctx, 0)
        real = self.real_samples(batch, ctx.dtype)
        if classifier is not None and c.label_fraction > 0:
            self.update_alignment(classifier, real, ctx.world_size)
        y_real = self.real_labels(classifier, real, ctx.step)
        chunks = torch.arange(len(y_real), device=y_real.device).tensor_split(c.d_steps)
        # fakes per update from the micro-batch's size, padding included: the same on every rank, as d_loss needs
        n_fake = c.fake_batch or max(1, math.ceil(len(batch["valid"]) / c.d_steps))
        d_losses, g_losses, c_losses = [], [], []
        for idx in chunks:  # an empty chunk (fewer reals than d_steps) has a real term of 0 at weight 0
            z, y_fake = self.noise(n_fake, gen, ctx.device, ctx.dtype)
            with torch.no_grad():
                fake = G(z, y_fake)
            share = ctx.batch_share(torch.tensor(float(len(idx)), device=ctx.device))
            loss_d = self.d_loss(D(real["x"][idx], y_real[idx]), D(fake.detach(), y_fake), share)
            D.backward(loss_d)
            D.step()
            d_losses.append(float(loss_d.detach()))
        for _ in range(c.g_steps):
            z, y_fake = self.noise(n_fake, gen, ctx.device, ctx.dtype)
            with frozen(D.module):
                loss_g = self.g_loss(D(G(z, y_fake), y_fake))
                G.backward(loss_g)
            G.step()
            g_losses.append(float(loss_g.detach()))
        out = {"loss": float(np.mean(d_losses)), "d_loss": float(np.mean(d_losses)),
               "g_loss": float(np.mean(g_losses))}
        if C is not None:
            lab = real["labelled"]
            target = classifier.align[real["label"][lab]]
            known = target >= 0
            # the labelled reals' mean loss, weighted by this rank's share of them (ranks hold unequal numbers)
            known_share = ctx.batch_share(known.sum()) if c.label_fraction > 0 else None
            for _ in range(c.c_steps):
                z, y_fake = self.noise(n_fake, gen, ctx.device, ctx.dtype)
                with torch.no_grad():
                    fake = G(z, y_fake)
                loss_c = self.classifier_loss(C, fake, y_fake, real["x"][lab][known], target[known], known_share)
                C.backward(loss_c)
                C.step()
                classifier.update_ema(c.ema_decay)
                c_losses.append(float(loss_c.detach()))
            out["c_loss"] = float(np.mean(c_losses))
            out["self_labelled"] = float((y_real >= 0).float().mean()) if len(y_real) else 0.0
        return out

    # ------------------------------------------------------------------ evaluation and sampling
    @torch.no_grad()
    def generate(self, modules: Mapping[str, nn.Module], n: int, generator: torch.Generator,
                 labels: torch.Tensor | None = None, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(samples, their labels) from G; points [n, dim], images [n, C, H, W] in [-1, 1]. ``temperature``
        scales z (below 1: the truncation trick's trade of variety for quality)."""
        G = modules["generator"]
        param = next(G.parameters())
        z, y = self.noise(n, generator, param.device, param.dtype)
        if labels is not None:
            y = labels.to(param.device)
        return G(z * temperature, y), y

    @torch.no_grad()
    def evaluate(self, modules: Mapping[str, nn.Module], batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """D's loss on held-out reals against fresh fakes; self-label accuracy; mixture coverage for 2-D data."""
        classifier = modules.get("classifier")
        D = modules["discriminator"]
        real = self.real_samples(batch, next(D.parameters()).dtype)
        gen = torch.Generator().manual_seed(self.config.seed + 12345)
        fake, y_fake = self.generate(modules, max(len(real["x"]), 256), gen)
        y_real = self.real_labels(classifier, real, step=1 << 60)
        out = {"loss": float(self.d_loss(D(real["x"], y_real), D(fake, y_fake)))}
        if classifier is not None and len(real["x"]):
            probs = F.softmax(classifier(real["x"], use_ema=True).float(), dim=1)
            conf, pred = probs.max(dim=1)
            truth = real["label"].cpu().numpy()
            if (truth >= 0).all():  # the data may have more classes than K cells: those count as misses
                out["label_accuracy"] = metrics.matched_accuracy(
                    truth, pred.cpu().numpy(), max(self.config.classes, int(truth.max()) + 1), self.config.num_clusters)
            out["confident_share"] = float((conf >= self.config.confidence).float().mean())
        if self.mixture is not None:
            q = metrics.mixture_quality(fake.float().cpu().numpy(), self.mixture)
            out["modes_covered"] = float(q.modes_covered)
            out["high_quality"] = q.high_quality
        return out

    @torch.no_grad()
    def sample_images(self, modules: Mapping[str, nn.Module], n: int, generator: torch.Generator,
                      **options: Any) -> torch.Tensor:
        """Images: G's samples in [0, 1] (``labels=[...]`` picks artificial labels, ``temperature`` scales z).
        Points: each picture is a 64x64 histogram of ``points_per_image`` samples."""
        labels = self.checked_labels(options.pop("labels", None), n)
        temperature = float(options.pop("temperature", 1.0))
        # `dgm sample` passes the autoregressive families' knobs; at their neutral values they mean "as is".
        if options.pop("top_k", 0) not in (0, None) or options.pop("top_p", 1.0) not in (1.0, None) or options:
            raise ValueError("slsa_gan sampling takes labels and temperature only (no top_k / top_p)")
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long)
            n = len(labels)
        if not self.points:
            x, _ = self.generate(modules, n, generator, labels, temperature)
            return (x.float().cpu() + 1) / 2
        per = self.config.points_per_image
        pts, _ = self.generate(modules, n * per, generator,
                               None if labels is None else labels.repeat_interleave(per), temperature)
        extent = self.config.image_extent or self._extent()
        pics = torch.zeros(n, 1, 64, 64)
        cells = ((pts.float().cpu()[:, :2] + extent) / (2 * extent) * 64).long()
        inside = ((cells >= 0) & (cells < 64)).all(dim=1)
        owner = torch.arange(n).repeat_interleave(per)
        pics.index_put_((owner[inside], torch.zeros_like(owner[inside]), 63 - cells[inside, 1], cells[inside, 0]),
                        torch.ones(int(inside.sum())), accumulate=True)
        return (pics / pics.amax(dim=(2, 3), keepdim=True).clamp(min=1)).sqrt()

    def _extent(self) -> float:
        if self.mixture is not None:
            return float(np.abs(self.mixture.centres).max() + 6 * self.mixture.std + 0.25)
        return 3.0

    # ------------------------------------------------------------------ duality gap
    @torch.no_grad()
    def gap_game(self, modules: Mapping[str, nn.Module], batch: dict[str, torch.Tensor]) -> GanGame:
        """The game V(D, G) = -(D's loss) of this model on held-out real data, for the duality-gap evaluator.

        Real samples keep the labels D would see in training (self-labels from the checkpoint's C_ema, aligned
        manual labels), fixed for the whole evaluation: C is part of the environment, not a player.
        """
        param = next(modules["discriminator"].parameters())
        real = self.real_samples(batch, param.dtype)
        y_real = self.real_labels(modules.get("classifier"), real, step=1 << 60)

        def noise_fn(n: int, gen: torch.Generator) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
            z, y = self.noise(n, gen, param.device, param.dtype)
            return (z, y), (y,)

        # V* = -2 (hinge) assumes a G that matches the real (x, label) pairs. Real samples without a label (no
        # confident self-label) get only D's unconditional term while every fake carries one: D can tell them
        # apart even against a perfect G, so V* is then unknown and value_gap is not reported.
        # With every real sample labelled, G's labels are still the noise's (latent cells, uniform classes): their
        # frequencies differ from the real labels', which D can exploit whatever G draws (labelled_game_value).
        known = self.config.mode == "unconditional" or bool((y_real >= 0).all())
        fake_labels = self.noise(1 << 16, torch.Generator().manual_seed(0))[1].cpu()
        return GanGame(real["x"], (y_real,), noise_fn, loss=self.config.loss, game_value_known=known,
                       fake_labels=fake_labels.to(y_real.device))

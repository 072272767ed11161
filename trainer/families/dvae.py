"""Family "dvae": DALL-E's discrete VAE (model in trainer/dalle/dvae.py) trained on image shards.

The loss is the negative evidence lower bound per pixel dimension, with the KL weighted by the ramped beta:
-(E_q log p(x | z) - beta KL(q || uniform)) / (3 H W), estimated with one Gumbel-softmax sample at the annealed tau.
Training metrics come from that relaxed sample; held-out metrics use hard codes: the ELB with one code grid drawn
from q (so it is a bound for the discrete model), reconstructions from the argmax codes (the stage-2 tokens).

Other stages use the trained model through ``encode_tokens`` / ``decode_tokens`` (torch only, no DeepSpeed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.dalle.dvae import (
    DiscreteVAE,
    DVAEConfig,
    beta_at,
    kl_to_uniform,
    logit_laplace_log_prob,
    logit_normal_log_prob,
    map_pixels,
    tau_at,
)
from trainer.families.base import Engine, Family, StepContext


def psnr_db(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1]: 10 log10(1 / MSE)."""
    mse = (recon.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return -10.0 * torch.log10(mse.clamp(min=1e-10))


def code_stats(tokens: torch.Tensor, num_codes: int) -> dict[str, float]:
    """Perplexity (exp of the entropy of the average code usage) and usage (fraction of codes that appear)."""
    counts = torch.bincount(tokens.flatten(), minlength=num_codes).double()
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"perplexity": float(entropy.exp()), "usage": float((counts > 0).sum()) / num_codes}


class DVAEFamily(Family):
    name = "dvae"
    config_cls = DVAEConfig

    def __init__(self, config: DVAEConfig, data_info: Mapping[str, Any]) -> None:
        super().__init__(config, data_info)
        shape = [int(s) for s in data_info.get("image_shape", (32, 32, 3))]
        if len(shape) != 3 or shape[2] != 3:
            raise ValueError(f"dvae models RGB images (H, W, 3); the dataset's images have shape {shape}")
        h, w, _ = shape
        f = 2**config.n_pools
        if h % f or w % f:
            raise ValueError(f"model.n_pools={config.n_pools}: image size {h}x{w} is not divisible by {f}")
        self.height, self.width = h, w

    @property
    def grid(self) -> tuple[int, int]:
        f = 2**self.config.n_pools
        return self.height // f, self.width // f

    @property
    def num_codes(self) -> int:
        return self.config.num_codes

    @property
    def dims(self) -> int:
        return 3 * self.height * self.width

    def build_modules(self) -> dict[str, nn.Module]:
        return {"dvae": DiscreteVAE(self.config)}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = np.stack([s["image"] for s in samples])
        return {"images": self._as_float(images), "valid": torch.tensor([bool(s.get("valid", True)) for s in samples])}

    def _as_float(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [0, 1], refusing other layouts by shape."""
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != (self.height, self.width, 3):
            raise ValueError(f"dvae: expected uint8 images [B, {self.height}, {self.width}, 3], "
                             f"got {x.dtype} {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2).float() / 255.0

    def elb_terms(self, images: torch.Tensor, logits: torch.Tensor, decoded: torch.Tensor,
                  generator: torch.Generator | None = None, step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: log p(x | z) summed over pixel dimensions (density of pixels in [0, 1]) and KL(q || uniform)
        summed over grid positions, both in nats. ``step`` (training only) selects the warm-up likelihood; held-out terms use ``config.likelihood``."""
        eps = self.config.eps
        target = images.float()
        if self.config.dequantize:
            noise = torch.rand(target.shape, generator=generator, device="cpu" if generator else target.device)
            target = (torch.round(target * 255) + noise.to(target.device)) / 256
        mu, log_b = decoded[:, :3].float(), decoded[:, 3:].float()
        x = map_pixels(target, eps)
        warmup = step is not None and step < self.config.gaussian_warmup_steps
        if warmup or self.config.likelihood == "logit_normal":
            log_px = logit_normal_log_prob(x, mu, self.config.gaussian_scale)
        else:
            log_px = logit_laplace_log_prob(x, mu, log_b)
        log_px = log_px + math.log(1 - 2 * eps)
        return log_px.flatten(1).sum(dim=1), kl_to_uniform(logits, dim=1).flatten(1).sum(dim=1)

    def bits_per_dim(self, log_px: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
        """-ELB in bits per dimension; with dequantisation, of 8-bit values (a bound on their discrete NLL)."""
        offset = math.log(256) if self.config.dequantize else 0.0
        return ((kl - log_px) / self.dims + offset) / math.log(2)

    @staticmethod
    def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> float:
        w = valid.float()
        return float((values.detach().float() * w).sum() / w.sum().clamp(min=1))

    def train_step(self, engines: Mapping[str, Engine], batch: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        engine = engines["dvae"]
        tau, beta = tau_at(ctx.step, self.config), beta_at(ctx.step, self.config)
        images, valid = batch["images"], batch["valid"]
        logits, decoded = engine(images.to(ctx.dtype), tau)
        log_px, kl = self.elb_terms(images, logits, decoded, step=ctx.step)
        w = valid.float()
        loss = -((log_px - beta * kl) * w).sum() / (w.sum().clamp(min=1) * self.dims) * ctx.batch_share(w.sum())
        engine.backward(loss)
        engine.step()
        with torch.no_grad():
            recon = engine.module.reconstruct(decoded)
            tokens = logits[valid].argmax(dim=1)
            return {
                "loss": float(loss.detach()),
                "elb_bits_per_dim": self._masked_mean(self.bits_per_dim(log_px, kl), valid),
                "psnr_db": self._masked_mean(psnr_db(recon, images), valid),
                **code_stats(tokens, self.num_codes),
                "kl_nats_per_code": self._masked_mean(kl, valid) / (self.grid[0] * self.grid[1]),
                "beta": beta,
                "tau": tau,
            }

    @torch.no_grad()
    def evaluate(self, modules: Mapping[str, nn.Module], batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Held-out ELB with one hard code grid drawn from q (fixed seed, so repeatable), loss = -ELB per dimension
        in nats; PSNR and codebook statistics of the argmax codes. None of it depends on the beta and tau schedules
        (the train metrics carry their values): a family instance holds no step, which a resumed run's first eval
        would report as 0."""
        model = modules["dvae"]
        dtype = next(model.parameters()).dtype
        images, valid = batch["images"], batch["valid"]
        logits = model.encoder(map_pixels(images, self.config.eps).to(dtype))
        generator = torch.Generator().manual_seed(0)
        u = torch.rand(logits.shape, generator=generator).to(logits.device).clamp(1e-12, 1 - 1e-7)
        drawn = (logits.float() - torch.log(-torch.log(u))).argmax(dim=1)
        log_px, kl = self.elb_terms(images, logits, model.decoder(model.one_hot(drawn, dtype)), generator)
        tokens = logits.argmax(dim=1)
        recon = model.reconstruct(model.decoder(model.one_hot(tokens, dtype)))
        return {
            "loss": self._masked_mean((kl - log_px) / self.dims, valid),
            "elb_bits_per_dim": self._masked_mean(self.bits_per_dim(log_px, kl), valid),
            "psnr_db": self._masked_mean(psnr_db(recon, images), valid),
            **code_stats(tokens[valid], self.num_codes),
            "kl_nats_per_code": self._masked_mean(kl, valid) / (self.grid[0] * self.grid[1]),
        }

    @torch.no_grad()
    def encode_tokens(self, modules: Mapping[str, nn.Module], images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images [B, H, W, 3] -> LongTensor [B, h, w]: the argmax of the encoder logits (no Gumbel noise)."""
        model = modules["dvae"]
        param = next(model.parameters())
        x = self._as_float(images).to(param.device)
        return model.encoder(map_pixels(x, self.config.eps).to(param.dtype)).argmax(dim=1)

    @torch.no_grad()
    def decode_tokens(self, modules: Mapping[str, nn.Module], tokens: torch.Tensor) -> torch.Tensor:
        """LongTensor [B, h, w] of codes -> float images [B, 3, H, W] in [0, 1]: unmap(sigmoid(mu))."""
        model = modules["dvae"]
        param = next(model.parameters())
        tokens = torch.as_tensor(tokens)
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != self.grid or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"dvae: expected integer tokens [B, {self.grid[0]}, {self.grid[1]}], "
                             f"got {tokens.dtype} {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.num_codes):
            raise ValueError(f"dvae: token ids must be in 0..{self.num_codes - 1}, got "
                             f"{int(tokens.min())}..{int(tokens.max())}")
        codes = model.one_hot(tokens.long().to(param.device), param.dtype)
        return model.reconstruct(model.decoder(codes))

    def sample_images(self, modules: Mapping[str, nn.Module], n: int, generator: torch.Generator,
                      **options: Any) -> torch.Tensor:
        """Codes drawn uniformly from the prior, decoded (what the dVAE alone can generate; stage 2 does better)."""
        tokens = torch.randint(self.num_codes, (n, *self.grid), generator=generator)
        return self.decode_tokens(modules, tokens)

"""The discrete VAE of DALL-E (stage 1): images <-> a grid of K-way codes.

Encoder: a 7x7 conv, then ``n_pools + 1`` groups of bottleneck residual blocks with a 2x max-pool after every group
but the last, then ReLU and a 1x1 conv to K logits per grid cell. The decoder mirrors it: a 1x1 conv from the
(relaxed) one-hot codes, groups with nearest 2x upsampling between them, and a 1x1 conv to 6 channels, mu and ln b of
a logit-Laplace distribution per RGB channel. Every residual branch is scaled by 1/n_layers^2 (n_layers = blocks in
the stack) so the stack starts close to the identity path.

Pixels in [0, 1] are mapped to [eps, 1 - eps] (eps = 0.1) before the encoder and as the likelihood's support, so
logit(x) stays finite; a reconstruction is unmap(sigmoid(mu)). Training relaxes the codes with Gumbel-softmax at
temperature tau (cosine-annealed), and the KL of the encoder's softmax to the uniform prior is weighted by beta
(ramped up from 0). Stage-2 tokens are the argmax of the encoder logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LIKELIHOODS = ("logit_laplace", "logit_normal")


@dataclass
class DVAEConfig:
    """Sizes and schedules. The paper's own values: K = 8192, 3 pools, width 256, 2 blocks per group, eps 0.1,
    beta 0 -> 6.6 over 5000 updates, tau 1 -> 1/16 (cosine) over 150k updates. The defaults here keep eps, beta_max,
    the tau end points and the block count, and shrink the rest to 32x32 scenes on CPU; the ramp and the annealing
    are shortened in proportion to runs of a few thousand updates."""

    num_codes: int = 512
    """K, the codebook size (the tokens' vocabulary)."""
    n_pools: int = 2
    """2x max-pools in the encoder (upsamplings in the decoder): the grid is the image size / 2**n_pools."""
    width: int = 32
    """Channels of the first group; group g has width * 2**g (the paper doubles per group too)."""
    blocks_per_group: int = 2
    decoder_init: int = 64
    """Channels of the decoder's 1x1 input conv from the K code channels (the paper's n_init)."""
    eps: float = 0.1
    """Pixel mapping x -> (1 - 2 eps) x + eps."""
    beta_max: float = 6.6
    """Final KL weight (0 disables the KL term: the spec's 'poor codebook use' setting)."""
    beta_ramp_steps: int = 500
    """Loop steps (global batches: optimizer updates unless zero.grad_accum > 1) over which beta rises linearly
    from 0 to beta_max."""
    tau_start: float = 1.0
    tau_end: float = 1.0 / 16
    tau_steps: int = 2000
    """Loop steps (as ``beta_ramp_steps``) of the cosine annealing of the Gumbel-softmax temperature; tau_end
    afterwards."""
    likelihood: str = "logit_laplace"
    """Reconstruction likelihood after the warm-up: "logit_laplace" (the spec; mu and ln b from the decoder) or
    "logit_normal" (a Gaussian on logit(x) with the fixed std ``gaussian_scale``; the decoder's ln b is unused).
    Why the second exists: on scenes that are ~97% flat background, the Laplace's sign-only gradient gives every
    background pixel's dequantisation noise the same weight as an object pixel's error, and with a learned b that
    noise is scaled by 1/b; reconstructions stayed background for 1,000+ updates (docs/text_to_image.md)."""
    gaussian_warmup_steps: int = 0
    """Loop steps (as ``beta_ramp_steps``) trained under the fixed-scale logit-normal before ``likelihood`` takes
    over; 0 keeps ``likelihood`` throughout."""
    gaussian_scale: float = 0.1
    """Std of the logit-normal in logit units (0.1 is ~0.02 of the mapped pixel range at mid-grey, ~5 levels of
    255). Fixed, not learned: a learned scale shrinks on the background and brings back the noise-weighting the
    warm-up is there to avoid (measured slower, docs/text_to_image.md)."""
    dequantize: bool = True
    """Add uniform noise of one 8-bit level to the likelihood's target (not the encoder's input), so that the
    continuous density cannot collapse onto the 256 discrete values and bits/dim bounds the discrete NLL."""

    def __post_init__(self) -> None:
        checks = {
            "num_codes": self.num_codes >= 2, "n_pools": self.n_pools >= 0, "width": self.width >= 4,
            "blocks_per_group": self.blocks_per_group >= 1, "decoder_init": self.decoder_init >= 1,
            "eps": 0 < self.eps < 0.5, "beta_max": self.beta_max >= 0, "beta_ramp_steps": self.beta_ramp_steps >= 0,
            "tau_start": self.tau_start > 0, "tau_end": 0 < self.tau_end <= self.tau_start,
            "tau_steps": self.tau_steps >= 0, "gaussian_warmup_steps": self.gaussian_warmup_steps >= 0,
            "likelihood": self.likelihood in LIKELIHOODS, "gaussian_scale": self.gaussian_scale > 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            k = bad[0]
            rule = {"num_codes": ">= 2", "n_pools": ">= 0", "width": ">= 4", "blocks_per_group": ">= 1",
                    "decoder_init": ">= 1", "eps": "in (0, 0.5)", "beta_max": ">= 0", "beta_ramp_steps": ">= 0",
                    "tau_start": "> 0", "tau_end": "in (0, tau_start]", "tau_steps": ">= 0",
                    "gaussian_warmup_steps": ">= 0", "likelihood": f"one of {LIKELIHOODS}",
                    "gaussian_scale": "> 0"}[k]
            raise ValueError(f"model.{k} must be {rule}, got {getattr(self, k)}")

    @property
    def n_groups(self) -> int:
        return self.n_pools + 1

    @property
    def n_layers(self) -> int:
        return self.n_groups * self.blocks_per_group

    def group_width(self, g: int) -> int:
        return self.width * 2**g


def beta_at(step: int, cfg: DVAEConfig) -> float:
    """KL weight at an update: linear 0 -> beta_max over beta_ramp_steps, then constant."""
    if cfg.beta_ramp_steps == 0:
        return cfg.beta_max
    return cfg.beta_max * min(1.0, step / cfg.beta_ramp_steps)


def tau_at(step: int, cfg: DVAEConfig) -> float:
    """Gumbel-softmax temperature: cosine from tau_start to tau_end over tau_steps (a linear one diverged in the
    paper), then tau_end."""
    if cfg.tau_steps == 0:
        return cfg.tau_end
    frac = min(1.0, step / cfg.tau_steps)
    return cfg.tau_end + 0.5 * (cfg.tau_start - cfg.tau_end) * (1 + math.cos(math.pi * frac))


def map_pixels(x: torch.Tensor, eps: float) -> torch.Tensor:
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float) -> torch.Tensor:
    return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)


def logit_laplace_log_prob(x: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Elementwise log f(x | mu, b) = -|logit(x) - mu| / b - log(2 b x (1 - x)) for x in (0, 1): a Laplace density on
    logit(x), carried back to (0, 1) by the Jacobian of the logit."""
    b = log_b.exp()
    return -(torch.logit(x) - mu).abs() / b - math.log(2.0) - log_b - torch.log(x) - torch.log1p(-x)


def logit_normal_log_prob(x: torch.Tensor, mu: torch.Tensor, scale: float) -> torch.Tensor:
    """Elementwise log density of x in (0, 1) whose logit is N(mu, scale^2): the warm-up likelihood (see
    ``DVAEConfig.likelihood``)."""
    z = (torch.logit(x) - mu) / scale
    return -0.5 * z**2 - math.log(scale) - 0.5 * math.log(2 * math.pi) - torch.log(x) - torch.log1p(-x)


def kl_to_uniform(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """KL(softmax(logits) || uniform over K) = sum_k q_k log q_k + log K, per position (``dim`` reduced)."""
    logq = F.log_softmax(logits.float(), dim=dim)
    return (logq.exp() * logq).sum(dim=dim) + math.log(logits.shape[dim])


def _conv(n_in: int, n_out: int, k: int) -> nn.Conv2d:
    """A same-padded conv initialised as the released DALL-E dVAE does: weights N(0, 1 / fan_in), zero bias. torch's
    default (1/sqrt(3) of that scale) shrinks the signal at every layer, leaving the initial logits almost equal for
    every input, so the Gumbel noise hides the input from the decoder and training starts with a collapsed code."""
    conv = nn.Conv2d(n_in, n_out, k, padding=(k - 1) // 2)
    nn.init.normal_(conv.weight, std=1 / math.sqrt(n_in * k * k))
    nn.init.zeros_(conv.bias)
    return conv


class ResBlock(nn.Module):
    """Bottleneck residual block: id(x) + gain * branch(x), branch = ReLU-conv x4 at n_out/4 channels. The encoder's
    branch is 3x3,3x3,3x3,1x1 and the decoder's 1x1,3x3,3x3,3x3, as in the released DALL-E dVAE."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, decoder: bool) -> None:
        super().__init__()
        hid = max(1, n_out // 4)
        kernels = (1, 3, 3, 3) if decoder else (3, 3, 3, 1)
        sizes = [n_in, hid, hid, hid, n_out]
        layers: list[nn.Module] = []
        for i, k in enumerate(kernels):
            layers += [nn.ReLU(), _conv(sizes[i], sizes[i + 1], k)]
        self.branch = nn.Sequential(*layers)
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.gain = 1.0 / n_layers**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.gain * self.branch(x)


class Encoder(nn.Module):
    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv(3, cfg.width, 7)]
        n_in = cfg.width
        for g in range(cfg.n_groups):
            n_out = cfg.group_width(g)
            for _ in range(cfg.blocks_per_group):
                layers.append(ResBlock(n_in, n_out, cfg.n_layers, decoder=False))
                n_in = n_out
            if g < cfg.n_groups - 1:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.ReLU(), _conv(n_in, cfg.num_codes, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x_mapped: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] mapped pixels -> logits [B, K, H / 2**n_pools, W / 2**n_pools]."""
        return self.net(x_mapped)


class Decoder(nn.Module):
    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv(cfg.num_codes, cfg.decoder_init, 1)]
        n_in = cfg.decoder_init
        for g in reversed(range(cfg.n_groups)):
            n_out = cfg.group_width(g)
            for _ in range(cfg.blocks_per_group):
                layers.append(ResBlock(n_in, n_out, cfg.n_layers, decoder=True))
                n_in = n_out
            if g > 0:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        layers += [nn.ReLU(), _conv(n_in, 6, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """(Relaxed) one-hot codes [B, K, h, w] -> [B, 6, H, W]: mu (3 channels) then ln b (3 channels)."""
        return self.net(codes)


class DiscreteVAE(nn.Module):
    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, images: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: images [B, 3, H, W] in [0, 1] -> (encoder logits, decoder output [B, 6, H, W]) through a
        Gumbel-softmax sample at temperature ``tau`` (relaxed in forward and backward)."""
        logits = self.encoder(map_pixels(images, self.cfg.eps))
        soft = F.gumbel_softmax(logits.float(), tau=tau, hard=False, dim=1).to(logits.dtype)
        return logits, self.decoder(soft)

    def one_hot(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Tokens [B, h, w] -> one-hot [B, K, h, w] (the decoder's input for hard codes)."""
        return F.one_hot(tokens, self.cfg.num_codes).permute(0, 3, 1, 2).to(dtype)

    def reconstruct(self, decoded: torch.Tensor) -> torch.Tensor:
        """Decoder output -> the image in [0, 1]: unmap(sigmoid(mu))."""
        return unmap_pixels(torch.sigmoid(decoded[:, :3].float()), self.cfg.eps)

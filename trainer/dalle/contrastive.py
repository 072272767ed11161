"""A small contrastive image-text model (CLIP-like) that reranks the text-to-image transformer's candidates.

DALL-E reranks its samples with CLIP; no weights can be downloaded here, so this model is trained on the same
captioned shape scenes. Both encoders end in a projection to a shared space, L2-normalised; similarities are
scaled by a learned temperature (logit scale), and the loss is CLIP's symmetric InfoNCE over the batch.

The image encoder keeps where things are: spatial relations ("left of") are part of the captions, so the last
feature map is flattened into the projection rather than average-pooled away. The text encoder is a bidirectional
transformer over BPE ids with a padding mask, read out at a learned summary position (CLS) in front of the text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trainer.transformer import TransformerConfig, TransformerStack, init_weights


@dataclass
class ContrastiveConfig:
    """Model and loss settings of family "contrastive"."""

    embed_dim: int = 128
    image_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    """Channels of the conv stages; each stage halves the resolution."""
    text: TransformerConfig = field(default_factory=lambda: TransformerConfig(n_layer=2, n_head=4, d_model=128))
    text_len: int = 48
    """BPE ids per caption; longer captions keep their first ``text_len`` ids (the text transformer's rule)."""
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    """CLIP clamps the logit scale (1 / temperature) at 100 so training stays stable."""
    hard_negatives: bool = False
    """Add each image's caption with one attribute changed (colour, shape, size, count or relation) as an extra
    negative text in the image->text direction."""
    gather_across_ranks: bool = True
    """Contrast against every rank's micro-batch (the global batch), as CLIP does, rather than the local one."""

    def __post_init__(self) -> None:
        if not self.image_channels or any(c < 1 for c in self.image_channels):
            raise ValueError(f"model.image_channels must be a non-empty list of positive ints, got "
                             f"{self.image_channels}")
        if self.embed_dim < 1 or self.text_len < 1:
            raise ValueError(f"model.embed_dim and model.text_len must be >= 1, got {self.embed_dim}, "
                             f"{self.text_len}")
        if not (self.init_temperature > 0 and 1 / self.init_temperature <= self.max_logit_scale):
            raise ValueError(f"model.init_temperature must be > 0 with 1/init_temperature <= max_logit_scale "
                             f"({self.max_logit_scale}), got {self.init_temperature}")


class ConvStage(nn.Module):
    """Stride-2 conv then a 3x3 conv, each followed by GroupNorm and GELU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        groups = math.gcd(8, c_out)
        self.net = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(groups, c_out), nn.GELU(),
            nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.GELU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ImageEncoder(nn.Module):
    """[B, 3, H, W] in [0, 1] -> [B, embed_dim] (not yet normalised)."""

    def __init__(self, cfg: ContrastiveConfig, height: int, width: int) -> None:
        super().__init__()
        stages = len(cfg.image_channels)
        if height % (1 << stages) or width % (1 << stages):
            raise ValueError(f"model.image_channels: {stages} stride-2 stages need the image size ({height}x{width}) "
                             f"divisible by {1 << stages}")
        self.height, self.width = height, width
        chans = [cfg.image_channels[0], *cfg.image_channels]
        self.stem = nn.Conv2d(3, chans[0], 3, padding=1)
        self.stages = nn.Sequential(*(ConvStage(a, b) for a, b in zip(chans[:-1], chans[1:], strict=True)))
        cells = (height >> stages) * (width >> stages)
        self.proj = nn.Linear(chans[-1] * cells, cfg.embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.stem.weight.dtype)
        x = self.stages(self.stem((x - 0.5) / 0.25))
        return self.proj(x.flatten(1))


class TextEncoder(nn.Module):
    """BPE ids [B, L] with a validity mask [B, L] -> [B, embed_dim], read at a CLS position in front."""

    def __init__(self, cfg: ContrastiveConfig, vocab_size: int) -> None:
        super().__init__()
        d = cfg.text.d_model
        self.pad_id = vocab_size
        self.tok_emb = nn.Embedding(vocab_size + 1, d)  # last row: padding (masked out of attention anyway)
        self.cls = nn.Parameter(torch.zeros(d))
        self.pos_emb = nn.Embedding(cfg.text_len + 1, d)
        self.stack = TransformerStack(cfg.text)
        self.proj = nn.Linear(d, cfg.embed_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        x = torch.cat([self.cls.expand(b, 1, -1), self.tok_emb(ids)], dim=1)
        x = x + self.pos_emb(torch.arange(t + 1, device=ids.device))
        keys = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=ids.device), mask.bool()], dim=1)
        attn_mask = keys[:, None, None, :]  # [B, 1, 1, L+1]: every query sees the CLS and the real tokens
        return self.proj(self.stack(x, attn_mask=attn_mask)[:, 0])


class ContrastiveModel(nn.Module):
    def __init__(self, cfg: ContrastiveConfig, vocab_size: int, height: int, width: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg, height, width)
        self.text_encoder = TextEncoder(cfg, vocab_size)
        init_weights(self)
        # Shape [1], not a 0-dim tensor: DeepSpeed's parameter broadcast views every parameter as bytes.
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / cfg.init_temperature)]))

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped at max_logit_scale. Clamped in the forward pass rather than in place on the
        parameter: under ZeRO the optimizer's master copy would undo an in-place clamp."""
        return self.logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()[0]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_encoder(images), dim=-1)

    def encode_texts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_encoder(ids, mask), dim=-1)

    def forward(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                negative_ids: torch.Tensor | None = None, negative_mask: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Unit image and text embeddings [B, D], the logit scale (a scalar), and unit embeddings of the
        negative texts when given (in the one forward pass, so a ZeRO-3 engine gathers each weight once)."""
        negatives = None if negative_ids is None else self.encode_texts(negative_ids, negative_mask)
        return self.encode_images(images), self.encode_texts(ids, mask), self.scale(), negatives


def _multi_positive_ce(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -log(softmax mass on the row's positives); one positive per row: cross-entropy."""
    return (logits.logsumexp(dim=1) - logits.masked_fill(~positive, float("-inf")).logsumexp(dim=1)).mean()


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor,
                     caption_ids: torch.Tensor | None = None,
                     negative_text_emb: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE: the mean of image->text and text->image cross-entropies over the batch.

    ``caption_ids`` (one id per distinct caption) makes repeated captions joint positives: procedural captions
    repeat ("three objects on a grey background"), and one-hot targets would push true pairs apart. A row's loss
    is then -log of the probability mass on all its positives. ``negative_text_emb`` [M, D] adds texts that only
    ever serve as negatives, in the image->text direction."""
    n = image_emb.shape[0]
    if n == 0:  # a rank's micro-batch of padding only: nothing to contrast, no gradient (not the NaN of a mean)
        return scale * image_emb.sum() * 0.0
    positive = (caption_ids[:, None] == caption_ids[None, :] if caption_ids is not None
                else torch.eye(n, dtype=torch.bool, device=image_emb.device))
    logits = (scale * image_emb @ text_emb.t()).float()
    image_logits, image_positive = logits, positive
    if negative_text_emb is not None and negative_text_emb.shape[0]:
        image_logits = torch.cat([logits, (scale * image_emb @ negative_text_emb.t()).float()], dim=1)
        image_positive = F.pad(positive, (0, negative_text_emb.shape[0]), value=False)
    return (_multi_positive_ce(image_logits, image_positive) + _multi_positive_ce(logits.t(), positive.t())) / 2


def retrieval_accuracy(similarity: torch.Tensor, caption_ids: torch.Tensor) -> tuple[float, float]:
    """Top-1 image->text and text->image accuracy of an [N, N] similarity matrix; a retrieved item counts as
    right when its caption equals the query's (repeated captions are indistinguishable by construction). An empty
    matrix (a micro-batch of padding only, which the loop does not count) scores 0."""
    if similarity.numel() == 0:
        return 0.0, 0.0
    i2t = (caption_ids[similarity.argmax(dim=1)] == caption_ids).float().mean()
    t2i = (caption_ids[similarity.argmax(dim=0)] == caption_ids).float().mean()
    return float(i2t), float(t2i)

"""Family "contrastive": a small CLIP-like image-text model that reranks text-to-image candidates.

It trains on the captioned image shards (the image codec keeping the caption, and the attributes for the hard
negatives); captions are tokenised on the fly with the caption tokenizer written beside the dataset's manifest
(``data_info["dataset_url"]`` + ``manifest.extra["tokenizer"]``), and the export carries that tokenizer.

Metrics: the symmetric InfoNCE loss, in-batch top-1 image->text and text->image retrieval accuracy, and on held-out
data ``hard_negative_acc``: the share of images whose true caption scores above the same caption with one
attribute changed (trainer/dalle/hard_negatives.py). ``score`` gives the cosine similarity of each image with its
caption, which is what ``dgm sample --rerank`` sorts by.

This family does not generate images: ``sample_images`` (called by the loop for its periodic grids) returns one
picture of the similarity matrix of ``n`` freshly drawn scenes against their captions (rows: images, columns:
captions, bright = similar), rendered from the dataset's own source with a seed the training data does not use. A
trained model shows a bright diagonal.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn

from data_pipeline import storage
from data_pipeline.caption_tokenizer import TOKENIZER_FILE, CaptionTokenizer
from data_pipeline.sources import build_source
from trainer.dalle.contrastive import (
    ContrastiveConfig,
    ContrastiveModel,
    contrastive_loss,
    retrieval_accuracy,
)
from trainer.dalle.hard_negatives import perturb_caption
from trainer.families.base import Engine, Family, StepContext

VISUALISATION_SEED_OFFSET = 1_000_003
"""Scenes drawn for the similarity picture use the dataset's source seed plus this (not a training scene)."""


class TokenizerMismatch(ValueError):
    """A caption tokenizer other than the one the model was trained with (different file, or vocabulary size)."""


def caption_key(caption: str) -> int:
    """One integer per distinct caption (as the tokenizer sees it: lower-cased, stripped) to find repeats."""
    return zlib.crc32(caption.strip().lower().encode())


class ContrastiveFamily(Family):
    name = "contrastive"
    config_cls = ContrastiveConfig

    def __init__(self, config: ContrastiveConfig, data_info: Mapping[str, Any]) -> None:
        super().__init__(config, data_info)
        shape = data_info.get("image_shape")
        if not shape or len(shape) != 3 or int(shape[2]) != 3:
            raise ValueError(f"contrastive: needs RGB image shards (manifest extra image_shape [H, W, 3]), got "
                             f"image_shape={shape!r}")
        self.height, self.width = int(shape[0]), int(shape[1])
        info = data_info.get("tokenizer")
        if not isinstance(info, Mapping) or not {"file", "sha256", "vocab_size"} <= set(info):
            raise ValueError(f"contrastive: the dataset at {data_info.get('dataset_url', '?')!r} has no caption "
                             "tokenizer in its manifest (extra.tokenizer with file, sha256, vocab_size); prepare it "
                             "with data.prepare.tokenizer: {vocab_size: N}")
        self.tokenizer_info = dict(info)
        self.vocab_size = int(info["vocab_size"])
        settings = (data_info.get("source") or {}).get("settings", {})
        self.max_count = int(settings.get("max_objects", 9))
        self._tokenizer: CaptionTokenizer | None = None

    # --- tokenizer: the dataset's at train time, the export's after load_export -------------------------------

    def _checked(self, tokenizer: CaptionTokenizer, where: str) -> CaptionTokenizer:
        if tokenizer.sha256 != self.tokenizer_info["sha256"] or tokenizer.vocab_size != self.vocab_size:
            raise TokenizerMismatch(
                f"{where}: caption tokenizer (sha256 {tokenizer.sha256[:12]}, vocab {tokenizer.vocab_size}) does "
                f"not match the one this model was trained with (sha256 {self.tokenizer_info['sha256'][:12]}, "
                f"vocab {self.vocab_size})")
        return tokenizer

    @property
    def tokenizer(self) -> CaptionTokenizer:
        if self._tokenizer is None:
            url = storage.join(self.data_info.get("dataset_url", "."), self.tokenizer_info["file"])
            self._tokenizer = self._checked(CaptionTokenizer.load(url), url)
        return self._tokenizer

    def export_files(self) -> dict[str, bytes]:
        return {TOKENIZER_FILE: self.tokenizer.to_bytes()}

    def attach_export(self, export_dir: str) -> None:
        path = os.path.join(export_dir, TOKENIZER_FILE)
        self._tokenizer = self._checked(CaptionTokenizer.load(path), path)

    # --- data ---------------------------------------------------------------------------------------------------

    def build_modules(self) -> dict[str, nn.Module]:
        return {"model": ContrastiveModel(self.config, self.vocab_size, self.height, self.width)}

    def text_ids(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """BPE ids [N, L] and their validity mask: each caption's first text_len ids, padded with the pad id to
        the longest of the batch (L <= text_len; padding is masked out, so the width does not change results)."""
        encoded = [self.tokenizer.encode(caption)[:self.config.text_len] for caption in captions]
        for i, tokens in enumerate(encoded):
            if not tokens:
                raise ValueError(f"contrastive: caption {i} is empty ({captions[i]!r}); nothing to score it against")
        length = max((len(t) for t in encoded), default=1)
        ids = torch.full((len(encoded), length), self.vocab_size, dtype=torch.long)
        mask = torch.zeros(len(encoded), length, dtype=torch.bool)
        for i, tokens in enumerate(encoded):
            ids[i, :len(tokens)] = torch.tensor(tokens)
            mask[i, :len(tokens)] = True
        return ids, mask

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        captions = []
        for s in samples:
            caption = s.get("caption")
            if caption is None:
                raise ValueError(f"contrastive: sample {s.get('key', '?')} has no caption (prepare the shards with "
                                 "the image codec keeping 'caption')")
            if not caption.strip():
                raise ValueError(f"contrastive: sample {s.get('key', '?')} has an empty caption")
            captions.append(caption)
        images = np.stack([s["image"] for s in samples])
        if images.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"contrastive: images of shape {images.shape[1:]}, the model expects "
                             f"{(self.height, self.width, 3)}")
        ids, mask = self.text_ids(captions)
        negatives = [perturb_caption(c, s.get("attributes"), str(s.get("key", c)), max_count=self.max_count)
                     for c, s in zip(captions, samples, strict=True)]
        neg_ids, neg_mask = self.text_ids([c if n is None else n[0] for c, n in zip(captions, negatives, strict=True)])
        return {
            "images": torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0,
            "text": ids,
            "text_mask": mask,
            "caption_key": torch.tensor([caption_key(c) for c in captions], dtype=torch.long),
            "negative_text": neg_ids,
            "negative_mask": neg_mask,
            "has_negative": torch.tensor([n is not None for n in negatives]),
            "valid": torch.tensor([bool(s.get("valid", True)) for s in samples]),
        }

    # --- training and evaluation --------------------------------------------------------------------------------

    @staticmethod
    def _gather(t: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Every rank's ``t`` concatenated in rank order, differentiable: the backward sums each rank's gradient on
        this rank's part (as open_clip's gather_with_grad), so that once DeepSpeed averages the ranks' gradients
        every parameter gets the global batch's gradient whatever the world size. (Gathering detached copies gives
        the encoders 1/world of it and the logit scale all of it.)"""
        if not t.requires_grad:
            parts = [torch.empty_like(t) for _ in range(ctx.world_size)]
            dist.all_gather(parts, t.contiguous())
            return torch.cat(parts)
        return torch.cat(dist_nn.all_gather(t))

    def _loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor], ctx: StepContext | None,
              with_negatives: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss, similarity matrix [N, N], caption keys [N] over the valid samples (of every rank when
        gathering), and the per-image hard-negative margin (true minus perturbed similarity) of this rank."""
        negatives = (batch["negative_text"], batch["negative_mask"]) if with_negatives else (None, None)
        image_emb, text_emb, scale, neg_emb = model(batch["images"], batch["text"], batch["text_mask"], *negatives)
        valid, keys, has_neg = batch["valid"], batch["caption_key"], batch["has_negative"]
        local_margin = ((image_emb * text_emb).sum(-1) - (image_emb * neg_emb).sum(-1))[valid & has_neg] \
            if neg_emb is not None else torch.zeros(0)
        if ctx is not None and self.config.gather_across_ranks and ctx.world_size > 1:
            image_emb, text_emb = self._gather(image_emb, ctx), self._gather(text_emb, ctx)
            keys = self._gather(keys, ctx)
            valid, has_neg = self._gather(valid.long(), ctx).bool(), self._gather(has_neg.long(), ctx).bool()
            if neg_emb is not None:
                neg_emb = self._gather(neg_emb, ctx)
        image_emb, text_emb, keys_v = image_emb[valid], text_emb[valid], keys[valid]
        negatives = neg_emb[valid & has_neg] if neg_emb is not None and self.config.hard_negatives else None
        loss = contrastive_loss(image_emb, text_emb, scale, keys_v, negatives)
        return loss, image_emb @ text_emb.t(), keys_v, local_margin

    def train_step(self, engines: Mapping[str, Engine], batch: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        engine = engines["model"]
        loss, sim, keys, _ = self._loss(engine, batch, ctx, with_negatives=self.config.hard_negatives)
        if not self.config.gather_across_ranks:  # gathered, every rank's loss already covers the global batch
            loss = loss * ctx.batch_share(batch["valid"].float().sum())
        engine.backward(loss)
        engine.step()
        i2t, t2i = retrieval_accuracy(sim.detach(), keys)
        scale = float(getattr(engine, "module", engine).scale().detach())
        return {"loss": float(loss.detach()), "image_to_text_acc": i2t, "text_to_image_acc": t2i,
                "logit_scale": scale}

    @torch.no_grad()
    def evaluate(self, modules: Mapping[str, nn.Module], batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """In-batch metrics over the held-out batch of every rank when training gathers across ranks (so the
        candidates per retrieval, and the metrics, do not depend on the world size; the loop evaluates every batch
        on every rank), else over this rank's micro-batch; and the hard-negative share."""
        ctx = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ctx = StepContext(step=0, rank=dist.get_rank(), world_size=dist.get_world_size(),
                              device=batch["images"].device, dtype=batch["images"].dtype)
        loss, sim, keys, margin = self._loss(modules["model"], batch, ctx, with_negatives=True)
        i2t, t2i = retrieval_accuracy(sim, keys)
        hard = float((margin > 0).float().mean()) if margin.numel() else 0.0
        return {"loss": float(loss), "image_to_text_acc": i2t, "text_to_image_acc": t2i, "hard_negative_acc": hard}

    # --- use ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, modules: Mapping[str, nn.Module], images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of each image [N, 3, H, W] (floats in [0, 1]) with its caption: FloatTensor [N]."""
        model = modules["model"]
        if isinstance(captions, str):
            raise TypeError("score: captions must be a list of strings, one per image (got one string)")
        images = torch.as_tensor(images)
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, self.height, self.width):
            raise ValueError(f"score: images must be [N, 3, {self.height}, {self.width}] in [0, 1], got "
                             f"{tuple(images.shape)}")
        if len(captions) != images.shape[0]:
            raise ValueError(f"score: {images.shape[0]} images but {len(captions)} captions")
        device = next(model.parameters()).device
        ids, mask = self.text_ids(list(captions))
        image_emb = model.encode_images(images.float().to(device))
        text_emb = model.encode_texts(ids.to(device), mask.to(device))
        return (image_emb * text_emb).sum(-1).float().cpu()

    @torch.no_grad()
    def similarity_picture(self, modules: Mapping[str, nn.Module], n: int) -> torch.Tensor:
        """[1, 3, S, S]: the n x n image-caption cosine similarities of n fresh scenes, as grey levels."""
        source_info = self.data_info.get("source") or {}
        settings = dict(source_info.get("settings", {}))
        settings["seed"] = int(settings.get("seed", 0)) + VISUALISATION_SEED_OFFSET
        settings["num_samples"] = max(n, 1)
        source = build_source(source_info.get("name", "shapes"), settings)
        samples = [source.sample(i) for i in range(n)]
        if any(s.caption is None for s in samples):
            raise ValueError(f"contrastive: the source {source_info.get('name')!r} writes no captions")
        model = modules["model"]
        device = next(model.parameters()).device
        images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 255.0
        ids, mask = self.text_ids([s.caption for s in samples])
        sim = model.encode_images(images.to(device)) @ model.encode_texts(ids.to(device), mask.to(device)).t()
        cell = max(1, 64 // max(n, 1))
        grey = ((sim.float().cpu() + 1) / 2).clamp(0, 1).repeat_interleave(cell, 0).repeat_interleave(cell, 1)
        return grey.expand(1, 3, *grey.shape).clone()

    def sample_images(self, modules: Mapping[str, nn.Module], n: int, generator: torch.Generator,
                      **options: Any) -> torch.Tensor:
        """Not a generator: the similarity picture of ``n`` fresh scenes (module docstring); sampling options
        (temperature, top-k, ...) have nothing to act on and are ignored."""
        return self.similarity_picture(modules, n)

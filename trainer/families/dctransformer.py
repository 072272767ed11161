"""DCTransformer (Nash et al. 2021): images as sparse (channel, position, value) DCT sequences, trained by chunks.

One chunk of ``chunk_size`` triples per image and step: the encoder sees the dense DCT image rebuilt from the
triples strictly before the chunk, the three decoders predict the chunk's triples; the loss is the exact NLL
CE(c) + CE(p) + CE(v) with impossible tokens masked (channels never decrease, positions increase within a channel).
Variants (``mode``): "unconditional" (optionally with a class token), "colourise" (all luma given to the encoder,
the sequence holds only chroma triples) and "superres" (the image downsampled ``superres_factor`` times is
upsampled again (bicubic) and coded on the target's grid and quantisation: this "hint" DCT image goes into the
encoder at the matching macroblocks and, at (c, p), into the value decoder). Super-resolution generates, by
default (``superres_target: residual``), the sparse sequence of the target's coefficients minus the hint's: what
the low-resolution image does not determine; ``full`` generates the target's own sequence.
The codec settings come from the data set's manifest (``data_info["codec"]``), which
every export carries in its config.json, so `dgm sample` decodes with exactly the training codec.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.codecs import dct_codec
from data_pipeline.codecs.dct_config import DCTCodecConfig
from data_pipeline.codecs.dct_images import as_rgb_batch, fit_size, to_rgb
from data_pipeline.codecs.dct_tables import CHANNEL_SLOT, NUM_LUMA_SLOTS
from data_pipeline.codecs.dct_transform import dct_image_to_rgb, rgb_to_dct_image
from data_pipeline.manifest import DatasetError
from trainer.dct.chunks import TokenSpace, chunk_rows, dense_before, dense_to_sequence, pad_batch, triple_nll
from trainer.dct.model import DCTransformer, DecoderSizes, NetworkShape
from trainer.dct.sampling import Conditioning, DrawSettings, generate
from trainer.families.base import Engine, Family, StepContext
from trainer.transformer import TransformerConfig

log = logging.getLogger(__name__)
MODES = ("unconditional", "colourise", "superres")
SUPERRES_TARGETS = ("residual", "full")
LN2 = math.log(2.0)


@dataclass
class DCTransformerConfig:
    """Model settings.

    chunk_size: triples per training chunk (the paper used 896 at 256x256; shape scenes at 32x32 have ~150-350).
    mode: "unconditional", "colourise" (given luma, generate chroma) or "superres" (given a low-res image).
    num_classes: > 0 adds a class token to the encoder (labels must be in 0..num_classes-1).
    use_context: False zeroes the encoder's view of the triples before the chunk (a colourisation model keeps its
    luma): the baseline that ignores everything drawn before the chunk.
    superres_factor: downsampling of the low-resolution condition (the low-res side must be a multiple of 16).
    superres_target: "residual" (the sequence holds target minus hint coefficients, the hint is given to the
        encoder like colourisation's luma: stopping early leaves the bicubic answer) or "full" (the target's own
        sequence, the hint only as an input).
    max_triples: sampling stops here (0: the codec's longest possible sequence).
    """

    chunk_size: int = 64
    mode: str = "unconditional"
    num_classes: int = 0
    use_context: bool = True
    superres_factor: int = 2
    superres_target: str = "residual"
    max_triples: int = 0
    encoder: TransformerConfig = field(default_factory=lambda: TransformerConfig(n_layer=2, n_head=4, d_model=128))
    decoders: DecoderSizes = field(default_factory=DecoderSizes)

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"model.chunk_size must be >= 1, got {self.chunk_size}")
        if self.mode not in MODES:
            raise ValueError(f"model.mode must be unconditional, colourise or superres, got {self.mode!r}")
        if self.superres_target not in SUPERRES_TARGETS:
            raise ValueError(f"model.superres_target must be residual or full, got {self.superres_target!r}")
        if self.num_classes < 0 or self.superres_factor < 2 or self.max_triples < 0:
            raise ValueError("model.num_classes and model.max_triples must be >= 0, model.superres_factor >= 2")


def codec_config(data_info: Mapping[str, Any]) -> DCTCodecConfig:
    codec = data_info.get("codec") or {}
    if codec.get("name") != "dct":
        named = f"is {codec['name']!r}" if codec.get("name") else "is not named (no data_info.codec)"
        raise ValueError(f"dctransformer trains on DCT shards (codec 'dct'); this data set's codec {named}: "
                         "prepare it with data.prepare.codec: dct")
    return DCTCodecConfig.from_dict(codec.get("settings", {}))


class DCTransformerFamily(Family):
    name = "dctransformer"
    config_cls = DCTransformerConfig
    draw_options = frozenset({"temperature", "top_k", "top_p", "value_temperature", "value_top_p", "labels",
                              "images", "mean_of"})

    @property
    def sample_classes(self) -> int:
        return self.config.num_classes

    @property
    def label_classes(self) -> int:
        return self.config.num_classes

    @property
    def variant(self) -> str:
        classes = f"{self.config.num_classes} classes" if self.config.num_classes else "no classes"
        return f"mode {self.config.mode}, {classes}"

    def __init__(self, config: DCTransformerConfig, data_info: Mapping[str, Any]) -> None:
        super().__init__(config, data_info)
        self.codec = codec_config(data_info)
        refused = ({"images", "mean_of"} if config.mode == "unconditional" else set()) | (
            set() if config.num_classes else {"labels"})
        self.draw_options = type(self).draw_options - refused  # `dgm sample` refuses them by name, before any work
        self.space = TokenSpace(self.codec.num_positions, self.codec.value_range)
        if config.mode == "superres" and (self.codec.height % config.superres_factor
                                          or self.codec.width % config.superres_factor):
            raise ValueError(f"model.superres_factor={config.superres_factor} does not divide the image size "
                             f"{self.codec.height}x{self.codec.width}")
        self.allowed = torch.from_numpy(CHANNEL_SLOT >= NUM_LUMA_SLOTS) if config.mode == "colourise" else None

    def build_modules(self) -> dict[str, nn.Module]:
        c = self.config
        shape = NetworkShape(num_positions=self.codec.num_positions, value_range=self.codec.value_range,
                             chunk_size=c.chunk_size, num_classes=c.num_classes,
                             hint=c.mode == "superres",
                             encoder=c.encoder, decoders=c.decoders)
        return {"model": DCTransformer(shape)}

    def split_luma(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A sequence -> (its chroma triples + EOS, the dense luma image [384, P]) for colourisation."""
        body = tokens[:-1]
        luma = torch.from_numpy(CHANNEL_SLOT < NUM_LUMA_SLOTS)[body[:, 0]]
        lum = body[luma]
        dense = dense_before(pad_batch([lum], self.space)[None, 0], torch.tensor([len(lum)]), self.space)[0]
        return torch.cat([body[~luma], tokens[-1:]]), dense

    def low_resolution(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 RGB [B, H, W, 3] -> the super-resolution condition: box-downsampled by the factor, uint8."""
        f = self.config.superres_factor
        b, h, w, _ = rgb.shape
        small = rgb.reshape(b, h // f, f, w // f, f, 3).astype(np.float32).mean(axis=(2, 4))
        return np.clip(np.rint(small), 0, 255).astype(np.uint8)

    def superres_hint(self, small: np.ndarray) -> torch.Tensor:
        """Low-resolution uint8 RGB [B, H/f, W/f, 3] -> bicubic back up, quantised DCT [B, 384, P].

        The condition carries only the low-resolution image; putting it on the target's grid and quantisation
        lets the model see, at each macroblock and each (channel, position), the naive (bicubic) answer.
        """
        from PIL import Image

        h, w = self.codec.height, self.codec.width
        up = np.stack([np.asarray(Image.fromarray(s).resize((w, h), Image.BICUBIC)) for s in small])
        dct = rgb_to_dct_image(up, self.codec.quality, channels_last=False)
        return torch.from_numpy(dct.reshape(len(small), dct.shape[1], -1).astype(np.float32))

    def superres_residual(self, tokens: list[torch.Tensor], hint: torch.Tensor
                          ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Full sequences and their hints -> (sequences of target minus rounded hint, the rounded hint [B, 384, P]).

        The rounded hint is the given part of the image (added back by the encoder input and the decode), so the
        model spends its triples only where bicubic upsampling is wrong; the residual is clipped to the value
        range (two quantised coefficients differ by at most twice it; on shape scenes at q=90 by at most 22).
        """
        given = hint.round()
        lengths = torch.tensor([len(t) for t in tokens], dtype=torch.long)
        target = dense_before(pad_batch(tokens, self.space), lengths, self.space)
        return [dense_to_sequence(target[i] - given[i], self.space) for i in range(len(tokens))], given

    def conditioning(self, tokens: list[torch.Tensor], labels: list[int] | None,
                     images: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """Per-mode targets and encoder conditioning for full token sequences. The super-resolution condition is
        the low-resolution version of the sequences' own decode (all a data set of shards has), or of
        ``images`` where a caller holds the originals and samples from their low-resolution versions alike."""
        out: dict[str, torch.Tensor] = {}
        if self.config.mode == "colourise":
            parts = [self.split_luma(t) for t in tokens]
            tokens = [p[0] for p in parts]
            out["cond_dense"] = torch.stack([p[1] for p in parts])
        if self.config.mode == "superres":
            rgb = dct_codec.decode([t.numpy() for t in tokens], self.codec) if images is None else images
            out["hint"] = self.superres_hint(self.low_resolution(rgb))
            if self.config.superres_target == "residual":
                tokens, out["cond_dense"] = self.superres_residual(tokens, out["hint"])
        if self.config.num_classes:
            if labels is None or any(not 0 <= lab < self.config.num_classes for lab in labels):
                raise ValueError(f"model.num_classes={self.config.num_classes}: every sample needs a label in "
                                 f"0..{self.config.num_classes - 1}, got {labels}")
            out["labels"] = torch.tensor(labels, dtype=torch.long)
        out["tokens"] = pad_batch(tokens, self.space)
        out["lengths"] = torch.tensor([len(t) for t in tokens], dtype=torch.long)
        return out

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tokens = [torch.from_numpy(np.asarray(s["tokens"], dtype=np.int64)) for s in samples]
        labels = [int(s.get("label", -1)) for s in samples] if self.config.num_classes else None
        batch = self.conditioning(tokens, labels)
        batch["valid"] = torch.tensor([bool(s.get("valid", True)) for s in samples])
        return batch

    def chunk_batch(self, batch: dict[str, torch.Tensor], starts: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encoder input, decoder input rows and targets of the chunks starting at ``starts``."""
        dense = dense_before(batch["tokens"], starts, self.space)
        if not self.config.use_context:  # the baseline forgets what was drawn, not the condition it was given
            dense = torch.zeros_like(dense)
        if "cond_dense" in batch:
            dense = dense + batch["cond_dense"]
        prev, target = chunk_rows(batch["tokens"], starts, self.config.chunk_size, self.space)
        return {"dense": dense, "prev": prev, "target": target}

    def chunk_nll(self, model: nn.Module, batch: dict[str, torch.Tensor], starts: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """NLL in nats [B, T] of the chunks at ``starts`` and their targets [B, T, 3]."""
        ch = self.chunk_batch(batch, starts)
        logits = model(ch["dense"], ch["prev"], ch["target"], batch.get("labels"), batch.get("hint"))
        return triple_nll(logits, ch["prev"], ch["target"], self.space, self._allowed(ch["dense"])), ch["target"]

    def _allowed(self, like: torch.Tensor) -> torch.Tensor | None:
        return None if self.allowed is None else self.allowed.to(like.device)

    def chunk_counts(self, lengths: torch.Tensor) -> torch.Tensor:
        """How many chunks each sequence of ``lengths`` rows spans (the last one may be partial)."""
        return (lengths + self.config.chunk_size - 1) // self.config.chunk_size

    def random_starts(self, lengths: torch.Tensor, seed: int) -> torch.Tensor:
        """One chunk per image, uniformly among its chunks; a pure function of (seed, lengths) for exact resume."""
        gen = torch.Generator().manual_seed(seed)
        n_chunks = self.chunk_counts(lengths.cpu())
        k = (torch.rand(len(lengths), generator=gen) * n_chunks).long()
        return (k * self.config.chunk_size).to(lengths.device)

    @staticmethod
    def chunk_seed(ctx: StepContext) -> int:
        """The seed of a step's chunk choice: a function of (trainer.seed, step, rank), so a resumed run picks the
        chunks an uninterrupted one would, and runs of different seeds train different chunks."""
        return (1_000_003 * ctx.step + ctx.rank + 7_919_000_017 * ctx.seed) % (2**63)

    def chunk_loss(self, nll: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Nats per triple of the batch's whole sequences, estimated from one uniformly chosen chunk per image.

        An image of n chunks has its chunk chosen with probability 1/n, so its chunk NLL is weighted by n: the
        estimate's expectation is the exact NLL. Unweighted, the objective would be sum_i NLL_i / n_i, whose
        optimum is p(x) / n(x): long sequences (more objects, more coefficients) under-learned."""
        valid = batch["valid"].float()
        n_chunks = self.chunk_counts(batch["lengths"])
        triples = (batch["lengths"].float() * valid).sum().clamp(min=1)
        return (nll.sum(dim=1) * n_chunks * valid).sum() / triples

    def train_step(self, engines: Mapping[str, Engine], batch: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        engine = engines["model"]
        starts = self.random_starts(batch["lengths"], self.chunk_seed(ctx))
        nll, _ = self.chunk_nll(engine, batch, starts)
        valid = batch["valid"].float()
        loss = self.chunk_loss(nll, batch) * ctx.batch_share((batch["lengths"].float() * valid).sum())
        engine.backward(loss)
        engine.step()
        mean_len = float((batch["lengths"].float() * valid).sum() / valid.sum().clamp(min=1))
        bpt = float(loss.detach()) / LN2
        return {"loss": float(loss.detach()), "bits_per_triple": bpt, "bits_per_image_est": bpt * mean_len}

    def sequence_nll(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Exact NLL in nats of every whole sequence [B]: the sum over all of its chunks."""
        total = torch.zeros(batch["tokens"].shape[0], device=batch["tokens"].device)
        longest = batch["lengths"].max().clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # every rank runs as many forwards (under ZeRO-3 each gathers parameters, a collective); the chunks
            # past a rank's own sequences are padding and score 0
            dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        tokens = batch["tokens"]
        if int(longest) > tokens.shape[1]:  # chunks past this rank's own sequences read PAD rows
            extra = int(longest) - tokens.shape[1]
            pad = torch.tensor(self.space.pad, device=tokens.device).repeat(tokens.shape[0], extra, 1)
            batch = {**batch, "tokens": torch.cat([tokens, pad], dim=1)}
        for start in range(0, int(longest), self.config.chunk_size):
            starts = torch.full_like(batch["lengths"], start)
            total = total + self.chunk_nll(model, batch, starts)[0].sum(dim=1)
        return total

    @torch.no_grad()
    def evaluate(self, modules: Mapping[str, nn.Module], batch: dict[str, torch.Tensor]) -> dict[str, float]:
        per_image = self.sequence_nll(modules["model"], batch)
        valid = batch["valid"].float()
        nats = float((per_image * valid).sum())
        triples = float((batch["lengths"].float() * valid).sum())
        images = float(valid.sum())
        per_triple = nats / max(triples, 1.0)  # weighted by triples across batches and ranks: total / total
        return {"loss": (per_triple, triples), "bits_per_triple": (per_triple / LN2, triples),
                "bits_per_image": nats / max(images, 1.0) / LN2}

    # what fixes the meaning of a sequence's tokens; the other codec settings are how images were brought to it
    SEQUENCE_SETTINGS = ("resolution", "quality", "value_range")

    def check_eval_data(self, eval_info: Mapping[str, Any], url: str) -> None:
        """Held-out sequences are scored under the training codec: another quality was scored without a word (bits
        of other tables), another size or value range failed at the first eval as a "corrupt" sample."""
        try:
            held_out = codec_config(eval_info)
        except ValueError as e:
            raise DatasetError(f"data.eval {url}: {e}") from None
        differ = [f"{key} {getattr(held_out, key)!r} vs the training data's {getattr(self.codec, key)!r}"
                  for key in self.SEQUENCE_SETTINGS if getattr(held_out, key) != getattr(self.codec, key)]
        if differ:
            raise DatasetError(f"data.eval {url}: coded with other DCT settings than the training data "
                               f"({'; '.join(differ)}): prepare both splits with one data.prepare.codec_settings")

    def max_triples(self) -> int:
        return self.config.max_triples or self.codec.max_sequence_length

    def source_images(self, n: int) -> np.ndarray:
        """Conditioning images when none are given: the held-out set's source (the training set's when the run
        had none), counted from its last index and gone through again when it holds fewer than ``n`` (the training
        grid of a small held-out set), brought to the codec's size as prepare did (its size_policy). Conditions
        from the training images would show what the model memorised, not what it does."""
        from data_pipeline.sources import build_source

        src_info = self.data_info.get("eval_source") or self.data_info.get("source") or {}
        name = src_info.get("name", "shapes")
        source = build_source(name, src_info.get("settings", {}))
        if len(source) == 0:
            raise ValueError(f"the source {name!r} to condition on holds no images: give images of your own")
        last = len(source) - 1
        return as_rgb_batch([source.sample(last - i % len(source)).image for i in range(n)], self.codec)

    def condition_images(self, n: int, images: np.ndarray | list[np.ndarray] | None) -> np.ndarray:
        """The ``n`` images a colourisation draw starts from, uint8 [n, H, W, 3] at the codec's size."""
        if images is None:
            return self.source_images(n)
        if len(images) != n:
            raise ValueError(f"images: {len(images)} given for {n} samples; give one per sample")
        return as_rgb_batch(list(images), self.codec)

    def low_resolution_condition(self, n: int, images: np.ndarray | list[np.ndarray] | None) -> np.ndarray:
        """Super-resolution's ``n`` low-resolution images, uint8 [n, H/f, W/f, 3]: each given image of that size
        as it is, any other brought to the codec's size, through the codec and downsampled (as collate does)."""
        f, (h, w) = self.config.superres_factor, (self.codec.height, self.codec.width)
        if images is not None and len(images) != n:
            raise ValueError(f"images: {len(images)} given for {n} samples; give one per sample")
        given = list(images) if images is not None else list(self.source_images(n))
        small = [i for i, im in enumerate(given) if np.shape(im)[:2] == (h // f, w // f)]
        out = np.empty((n, h // f, w // f, 3), dtype=np.uint8)
        for i in small:
            out[i] = to_rgb(np.asarray(given[i]), self.codec.alpha, f"image {i}")
        full = [i for i in range(n) if i not in set(small)]
        if full:
            rgb = np.stack([fit_size(to_rgb(np.asarray(given[i]), self.codec.alpha, f"image {i}"), self.codec,
                                     f"image {i}") for i in full])
            out[full] = self.low_resolution(dct_codec.decode(dct_codec.encode(list(rgb), self.codec), self.codec))
        return out

    def sampling_condition(self, model: nn.Module, n: int, labels: list[int] | None = None,
                           images: np.ndarray | list[np.ndarray] | None = None) -> Conditioning:
        """What ``n`` draws are conditioned on: class labels, given luma (colourise), the hint (superres).

        Super-resolution starts from ``images`` at H/f x W/f as they are, or from full-size ones through the
        codec and then downsampled: exactly the condition training builds from a shard's sequence.
        """
        labels = self.checked_labels(labels, n)
        device = next(model.parameters()).device
        cond = Conditioning(use_context=self.config.use_context, allowed=self._allowed(torch.empty(0, device=device)))
        if self.config.num_classes:
            labels = labels if labels is not None else self.default_labels(n)
            cond.labels = torch.as_tensor(labels, dtype=torch.long, device=device)
        if self.config.mode == "unconditional" and images is not None:
            raise ValueError("images: an unconditional model takes no images to condition on")
        if self.config.mode == "colourise":
            seqs = dct_codec.encode(list(self.condition_images(n, images)), self.codec)
            cond.dense = torch.stack([self.split_luma(torch.from_numpy(s.astype(np.int64)))[1]
                                      for s in seqs]).to(device)
        if self.config.mode == "superres":
            hint = self.superres_hint(self.low_resolution_condition(n, images))
            cond.hint = hint.to(device)
            cond.dense = hint.round().to(device) if self.config.superres_target == "residual" else None
        return cond

    def draw_tokens(self, model: nn.Module, n: int, cond: Conditioning, generator: torch.Generator | None = None,
                    use_cache: bool = True, report: bool = True, **draw: Any) -> torch.Tensor:
        """Sequences [n, L, 3] drawn under ``cond`` (temperature / top_k / top_p in ``draw``); draws that reach
        the sampling limit are ended there, with a warning (their images lack what would have followed)."""
        seq = generate(model, n, self.space, self.config.chunk_size, self.max_triples(), cond, DrawSettings(**draw),
                       generator, use_cache)
        if report:
            self._report_cut(self._cut_rows(seq), n)
        return seq

    def _cut_rows(self, seq: torch.Tensor) -> int:
        """How many drawn sequences were still going when the sampling limit ended them."""
        limit = self.max_triples()
        if seq.shape[1] != limit:
            return 0
        ended = seq[:, -1, 0] == self.space.c_eos
        return int(ended.sum()) if limit == 1 else int((ended & (seq[:, -2, 0] < self.space.c_eos)).sum())

    def _report_cut(self, cut: int, drawn: int) -> None:
        if cut:
            log.warning("%d of %d draws reached the sampling limit of %d triples (model.max_triples) and were ended "
                        "there: their images lack the coefficients that would have followed", cut, drawn,
                        self.max_triples())

    def sample_tokens(self, model: nn.Module, n: int, generator: torch.Generator | None = None,
                      labels: list[int] | None = None, images: np.ndarray | None = None,
                      use_cache: bool = True, **draw: Any) -> tuple[torch.Tensor, Conditioning]:
        """Drawn sequences [n, L, 3] and the conditioning they were drawn under."""
        cond = self.sampling_condition(model, n, labels, images)
        return self.draw_tokens(model, n, cond, generator, use_cache, **draw), cond

    def tokens_to_rgb(self, seq: torch.Tensor, cond: Conditioning) -> np.ndarray:
        """Drawn sequences (+ given coefficients) -> uint8 RGB [n, H, W, 3]."""
        starts = torch.full((seq.shape[0],), seq.shape[1], dtype=torch.long, device=seq.device)
        dense = dense_before(seq, starts, self.space)
        if cond.dense is not None:
            dense = dense + cond.dense
        h, w = self.codec.grid
        dct = dense.round().cpu().numpy().astype(np.int16).reshape(seq.shape[0], -1, h, w)
        return dct_image_to_rgb(dct, self.codec.quality, upsampling=self.codec.upsampling, channels_last=False)

    def sample_images(self, modules: Mapping[str, nn.Module], n: int, generator: torch.Generator,
                      mean_of: int = 1, labels: list[int] | None = None, images: np.ndarray | None = None,
                      **draw: Any) -> torch.Tensor:
        """Images [n, 3, H, W] in [0, 1]. ``mean_of`` > 1 (conditional modes) averages that many draws per
        condition in pixel space: the posterior-mean estimate, which PSNR rewards over any single draw."""
        if mean_of < 1 or (mean_of > 1 and self.config.mode == "unconditional"):
            raise ValueError(f"mean_of={mean_of}: averaging draws needs a conditional model (colourise or "
                             f"superres) and mean_of >= 1; this model is {self.config.mode}")
        model = modules["model"]
        cond = self.sampling_condition(model, n, labels, images)  # built once, shared by every draw
        total, cut = None, 0
        for _ in range(mean_of):  # one warning for all the draws
            seq = self.draw_tokens(model, n, cond, generator, report=False, **draw)
            cut += self._cut_rows(seq)
            rgb = torch.from_numpy(self.tokens_to_rgb(seq, cond)).permute(0, 3, 1, 2).float() / 255.0
            total = rgb if total is None else total + rgb
        self._report_cut(cut, n * mean_of)
        return total / mean_of

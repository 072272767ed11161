"""The sparse DCT codec (DCTransformer representation): images <-> (channel, position, value) token sequences.

Batch API (module functions, a config argument):
    encode(images, config) -> list of int16 [n_i + 1, 3] sequences     (encode_with_stats adds clip counts)
    decode(sequences, config) -> uint8 RGB [B, H, W, 3]
    encode_jpeg_files(paths, config) -> sequences straight from the files' coefficients (jpeglib)
Shard API (``DCTCodec``, the same contract as the plain image codec): ``encode(sample) -> {"dct": .npy bytes,
"cls"/"txt"/"json": metadata}``, ``decode(fields) -> {"tokens": validated sequence, ...}``.

The pieces: ``dct_tables`` (tables, zigzag, channel numbering), ``dct_transform`` (pixels <-> DCT image),
``dct_sequence`` (DCT image <-> tokens, bytes), ``dct_images`` (input conversions), ``dct_config`` (settings,
vocabularies), ``jpeg_coefficients`` (JPEG files). encode/decode run the compiled kernel (``_dct_kernel.c``,
built at install) where it is built, else the numpy reference with a one-time warning (see ``dct_transform``).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipeline.codecs.dct_config import DCTCodecConfig, Vocab
from data_pipeline.codecs.dct_images import as_rgb_batch, check_size
from data_pipeline.codecs.dct_sequence import (
    SequenceError,
    SparseBatch,
    rgb_to_sequences,
    sequence_from_bytes,
    sequence_to_bytes,
    sequences_to_rgb,
    sparsify,
)
from data_pipeline.codecs.jpeg_coefficients import JPEGReadError, read_jpeg_dct, read_jpeg_dct_batch
from data_pipeline.codecs.metadata import SampleDecodeError, decode_metadata, encode_metadata

log = logging.getLogger(__name__)
FALLBACK_WARNINGS = 5  # per codec instance (one per shard written)
FALLBACK_EXAMPLES = 2  # reasons a shard's encoding report keeps


def coefficient_refusal(error: JPEGReadError, path: str) -> str:
    """Why a file's coefficients could not be taken, in the codec's terms (not the reader's Python arguments)."""
    cause = error.__cause__
    if cause is not None and not isinstance(cause, JPEGReadError):
        return f"{path}: {cause}"
    if "quantisation table" in str(error):
        return f"{path}: its quantisation tables are not this quality's (jpeg_source: requantize takes them)"
    return str(error)


def encode_with_stats(images: np.ndarray | Sequence[np.ndarray], config: DCTCodecConfig) -> SparseBatch:
    """Images (see ``dct_images.as_rgb_batch`` for accepted forms) -> sequences and per-image clip counts."""
    return rgb_to_sequences(as_rgb_batch(images, config), config)


def encode(images: np.ndarray | Sequence[np.ndarray], config: DCTCodecConfig) -> list[np.ndarray]:
    """Images -> token sequences [n_i + 1, 3] ending in EOS."""
    return encode_with_stats(images, config).sequences


def decode(sequences: Sequence[np.ndarray] | np.ndarray, config: DCTCodecConfig) -> np.ndarray:
    """Token sequences (list or padded batch; partial ones decode up to where they stop) -> uint8 RGB [B, H, W, 3]."""
    return sequences_to_rgb(sequences, config)


def encode_jpeg_files(
    paths: Sequence[str | os.PathLike[str]],
    config: DCTCodecConfig,
    *,
    requantize: bool = False,
    pixel_fallback: bool = False,
) -> SparseBatch:
    """JPEG files -> sequences from their stored coefficients, no pixel decode (see ``jpeg_coefficients``)."""
    dct = read_jpeg_dct_batch(list(paths), config, requantize=requantize, pixel_fallback=pixel_fallback)
    return sparsify(dct, config)


class DCTCodec:
    """Shard codec: one sample <-> a WebDataset member "dct" (validated .npy token bytes) plus metadata."""

    name = "dct"

    def __init__(self, config: DCTCodecConfig) -> None:
        self.config = config
        self.clipped_total = 0
        """Values clipped to +-value_range over every sample this instance encoded."""
        self.coefficient_files = 0
        """JPEG files encoded from their stored coefficients (``jpeg_source``), no pixel decode."""
        self.pixel_fallbacks: list[str] = []
        """JPEG files the coefficient path could not serve, with the reason: encoded from their pixels."""

    @property
    def vocab(self) -> Vocab:
        return self.config.vocab

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """The (H, W, C) an image of ``shape`` decodes back to: the codec's resolution, the source's channels. A
        size the size policy cannot serve is refused here, before any shard is written."""
        check_size(int(shape[0]), int(shape[1]), self.config, "source images")
        height, width = self.config.resolution  # type: ignore[misc]
        return height, width, int(shape[2]) if len(shape) == 3 else 1

    def settings(self) -> dict[str, Any]:
        return self.config.to_dict()

    def encode(self, sample: Any) -> dict[str, bytes]:
        """A source Sample (uint8 image HxWx1 or HxWx3, optional label/caption/attributes) -> shard fields."""
        try:
            batch = self._from_file(sample) or encode_with_stats([sample.image], self.config)
        except (TypeError, ValueError) as e:
            raise SampleDecodeError(f"sample {sample.key}: {e}") from e
        self.clipped_total += int(batch.clipped[0])
        return {"dct": sequence_to_bytes(batch.sequences[0], self.vocab), **encode_metadata(sample)}

    def _from_file(self, sample: Any) -> SparseBatch | None:
        """The sequence from the JPEG file's own coefficients, or None (pixels wanted, no file, or a file the
        coefficient path cannot serve: recorded in ``pixel_fallbacks``, the first few logged)."""
        if self.config.jpeg_source == "pixels":
            return None
        path = getattr(sample, "source_file", None)
        if not path:
            self._fallback(f"sample {sample.key} came as pixels, not a JPEG file whose coefficients can be used "
                           "(an image folder hands over only upright YCbCr or grey JPEGs, and only without "
                           "resolution; PNG, CMYK and EXIF-rotated files come as pixels)")
            return None
        try:
            dct = read_jpeg_dct(path, self.config, requantize=self.config.jpeg_source == "requantize")
        except JPEGReadError as e:
            self._fallback(coefficient_refusal(e, str(path)))
            return None
        self.coefficient_files += 1
        return sparsify(dct[None], self.config)

    def _fallback(self, reason: str) -> None:
        self.pixel_fallbacks.append(reason)
        if len(self.pixel_fallbacks) <= FALLBACK_WARNINGS:
            more = " (further ones are not logged)" if len(self.pixel_fallbacks) == FALLBACK_WARNINGS else ""
            log.warning("dct codec, jpeg_source=%s: %s; encoded from pixels%s", self.config.jpeg_source, reason, more)

    def encode_report(self) -> dict[str, Any]:
        """What this instance's encodes did, for the shard's info and the manifest: values clipped to the value
        range and, when JPEG files are wanted for their coefficients, how many were read that way and how many were
        encoded from pixels instead, with the first reasons under ``examples``."""
        report: dict[str, Any] = {"clipped_values": self.clipped_total}
        examples = []
        if self.clipped_total:
            examples.append(f"{self.clipped_total} coefficient values clipped to +-{self.config.value_range} "
                            "(raise codec_settings.value_range to keep them)")
        if self.config.jpeg_source != "pixels":
            report |= {"from_coefficients": self.coefficient_files, "from_pixels": len(self.pixel_fallbacks)}
            examples += self.pixel_fallbacks[:FALLBACK_EXAMPLES]
        if examples:
            report["examples"] = examples
        return report

    def sequence_length(self, fields: dict[str, bytes]) -> int:
        """Rows of the sequence in ``encode``'s fields (end token included): recorded per sample in the manifest,
        so a trainer can size its padding and token budgets without reading a shard."""
        return int(np.load(io.BytesIO(fields["dct"]), allow_pickle=False).shape[0])

    def decode(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Shard fields -> {"tokens": int16 [n + 1, 3], "label"?, "caption"?, "attributes"?}; bad bytes raise."""
        key = fields.get("__key__", "?")
        if "dct" not in fields:
            raise SampleDecodeError(f"sample {key}: no .dct member")
        try:
            out: dict[str, Any] = {"tokens": sequence_from_bytes(fields["dct"], self.vocab, f"sample {key}")}
        except SequenceError as e:
            raise SampleDecodeError(str(e)) from e
        return {**out, **decode_metadata(fields)}

    def preview_images(self, samples: list[Any]) -> list[np.ndarray]:
        """What the shards hold, as images for the data set's preview grid: each sample through the codec and
        back (quantisation and 4:2:0 chroma included), the pictures a model trained on them can at best draw."""
        return list(self.decode_images([self.decode(self.encode(s))["tokens"] for s in samples]))

    def decode_images(self, sequences: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Token sequences -> uint8 RGB [B, H, W, 3] (for samples and previews)."""
        return decode(sequences, self.config)

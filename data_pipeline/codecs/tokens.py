"""The "tokens" codec: a caption's BPE ids and an image's dVAE codes, the training data of the text+image transformer.

Members per sample: ``.tid`` (text ids) and ``.iid`` (image tokens, row-major) as little-endian int32, plus the kept
metadata (``.txt`` caption, ``.json`` attributes). The settings carry the vocabulary sizes and the image grid, so a
reader checks every id against them and names the sample when one is out of range. Text ids are stored unpadded
and untruncated: the model family decides its text length. An empty caption cannot be encoded (the tokenisation job
refuses it, naming the shard and sample) because a caption-conditioned model has nothing to condition on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from data_pipeline.codecs.metadata import SampleDecodeError, decode_metadata, encode_metadata

_ID_DTYPE = np.dtype("<i4")


@dataclass
class TokensCodecConfig:
    """``text_vocab``: caption tokenizer size; ``image_vocab``: dVAE codes K; ``image_grid``: [h, w] tokens."""

    text_vocab: int = 0
    image_vocab: int = 0
    image_grid: list[int] = field(default_factory=lambda: [0, 0])
    keep: list[str] = field(default_factory=lambda: ["caption", "attributes"])

    def __post_init__(self) -> None:
        for name in ("text_vocab", "image_vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"tokens codec: {name} must be a positive int, got {value!r}")
        grid = list(self.image_grid)
        if len(grid) != 2 or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid):
            raise ValueError(f"tokens codec: image_grid must be [h, w] of positive ints, got {self.image_grid!r}")
        self.image_grid = grid
        unknown = sorted(set(self.keep) - {"caption", "attributes", "label"})
        if unknown:
            raise ValueError(f"tokens codec: keep: unknown metadata {unknown}; known: caption, attributes, label")

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> TokensCodecConfig:
        return cls(**settings)


@dataclass
class TokenSample:
    """One tokenised sample; ``label``/``caption``/``attributes`` follow the metadata convention of every codec."""

    key: str
    text: np.ndarray
    image_tokens: np.ndarray
    caption: str | None = None
    attributes: dict[str, Any] | None = None
    label: int | None = None


class TokensCodec:
    name = "tokens"

    def __init__(self, config: TokensCodecConfig) -> None:
        self.config = config
        h, w = config.image_grid
        self.image_length = h * w

    def settings(self) -> dict[str, Any]:
        return asdict(self.config)

    def _check(self, key: str, text: np.ndarray, image: np.ndarray) -> None:
        if text.ndim != 1 or text.size == 0:
            raise SampleDecodeError(f"sample {key}: text ids must be a non-empty 1-D sequence, got shape {text.shape}")
        if image.shape != (self.image_length,):
            raise SampleDecodeError(f"sample {key}: expected {self.image_length} image tokens "
                                    f"(grid {self.config.image_grid}), got shape {image.shape}")
        for what, ids, vocab in (("text id", text, self.config.text_vocab), ("image token", image,
                                                                             self.config.image_vocab)):
            bad = (ids < 0) | (ids >= vocab)
            if bad.any():
                raise SampleDecodeError(f"sample {key}: {what} {int(ids[bad][0])} out of range [0, {vocab})")

    def encode(self, sample: TokenSample) -> dict[str, bytes]:
        text = np.asarray(sample.text, dtype=np.int64).reshape(-1)
        image = np.asarray(sample.image_tokens, dtype=np.int64).reshape(-1)
        self._check(sample.key, text, image)
        return {"tid": text.astype(_ID_DTYPE).tobytes(), "iid": image.astype(_ID_DTYPE).tobytes(),
                **encode_metadata(sample, self.config.keep)}

    def decode(self, fields: dict[str, Any]) -> dict[str, Any]:
        key = fields.get("__key__", "?")
        for member in ("tid", "iid"):
            if member not in fields:
                raise SampleDecodeError(f"sample {key}: no .{member} member")
            if len(fields[member]) % _ID_DTYPE.itemsize:
                raise SampleDecodeError(f"sample {key}: .{member} is {len(fields[member])} bytes, not int32 ids")
        text = np.frombuffer(fields["tid"], dtype=_ID_DTYPE).astype(np.int64)
        image = np.frombuffer(fields["iid"], dtype=_ID_DTYPE).astype(np.int64)
        self._check(key, text, image)
        return {"text": text, "image_tokens": image, **decode_metadata(fields)}

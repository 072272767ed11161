"""The plain image codec: a sample becomes PNG pixels plus its label, caption and attributes."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from data_pipeline.codecs.metadata import METADATA, SampleDecodeError, decode_metadata, encode_metadata


@dataclass
class ImageCodecConfig:
    """PNG is lossless, so what the model trains on is exactly what the source drew. ``keep`` names the metadata
    written beside the pixels: each one is a tar member to parse per sample, so keep only what the model uses."""

    compress_level: int = 1
    keep: list[str] = field(default_factory=lambda: list(METADATA))

    def __post_init__(self) -> None:
        level = self.compress_level
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 9:
            raise ValueError(f"compress_level must be an int in 0..9 (PNG's zlib levels), got {level!r}")
        unknown = sorted(set(self.keep) - set(METADATA))
        if unknown:
            raise ValueError(f"keep: unknown metadata {unknown}; known: {list(METADATA)}")


class ImageCodec:
    name = "image"

    def __init__(self, config: ImageCodecConfig | None = None) -> None:
        self.config = config or ImageCodecConfig()

    def settings(self) -> dict[str, Any]:
        return asdict(self.config)

    def encode(self, sample: Any) -> dict[str, bytes]:
        image = np.asarray(sample.image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
            raise SampleDecodeError(f"sample {sample.key}: image must be uint8 HxWx1 or HxWx3, got {image.shape}")
        buf = io.BytesIO()
        Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(
            buf, format="PNG", compress_level=self.config.compress_level
        )
        return {"png": buf.getvalue(), **encode_metadata(sample, self.config.keep)}

    def preview_images(self, samples: list[Any]) -> list[np.ndarray]:
        """What the shards hold, as images for the data set's preview grid (PNG is lossless: the images)."""
        return [self.decode(self.encode(s))["image"] for s in samples]

    def decode(self, fields: dict[str, Any]) -> dict[str, Any]:
        key = fields.get("__key__", "?")
        if "png" not in fields:
            raise SampleDecodeError(f"sample {key}: no .png member")
        try:
            with Image.open(io.BytesIO(fields["png"])) as im:
                image = np.asarray(im)
        except Exception as e:
            raise SampleDecodeError(f"sample {key}: undecodable PNG ({e})") from e
        if image.ndim == 2:
            image = image[:, :, None]
        return {"image": image, **decode_metadata(fields)}

"""The plain image codec: a sample becomes PNG pixels plus its label, caption and attributes."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image


class SampleDecodeError(ValueError):
    """A shard member that cannot be decoded into a sample."""


METADATA = ("label", "caption", "attributes")


@dataclass
class ImageCodecConfig:
    """PNG is lossless, so what the model trains on is exactly what the source drew. ``keep`` names the metadata
    written beside the pixels: each one is a tar member to parse per sample, so keep only what the model uses."""

    compress_level: int = 1
    keep: list[str] = field(default_factory=lambda: list(METADATA))

    def __post_init__(self) -> None:
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
        fields = {"png": buf.getvalue()}
        keep = self.config.keep
        if sample.label is not None and "label" in keep:
            fields["cls"] = str(int(sample.label)).encode()
        if sample.caption is not None and "caption" in keep:
            fields["txt"] = sample.caption.encode("utf-8")
        if sample.attributes is not None and "attributes" in keep:
            fields["json"] = json.dumps(sample.attributes, sort_keys=True).encode("utf-8")
        return fields

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
        out: dict[str, Any] = {"image": image}
        try:
            if "cls" in fields:
                out["label"] = int(fields["cls"].decode())
            if "txt" in fields:
                out["caption"] = fields["txt"].decode("utf-8")
            if "json" in fields:
                out["attributes"] = json.loads(fields["json"].decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise SampleDecodeError(f"sample {key}: malformed metadata ({e})") from e
        return out

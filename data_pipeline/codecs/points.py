"""The points codec: a low-dimensional float vector (``.npy`` bytes, float32) plus its label.

Used by the 2-D mixture source. Decoding refuses anything but a finite 1-D float32 vector of the configured size,
so a corrupt shard member is reported, never trained on.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from data_pipeline.codecs.image import SampleDecodeError


@dataclass
class PointsCodecConfig:
    dim: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"points codec: dim must be an int >= 1, got {self.dim!r}")

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> PointsCodecConfig:
        unknown = sorted(set(settings) - {"dim"})
        if unknown:
            raise ValueError(f"points codec: unknown setting {unknown[0]!r} (known: dim)")
        return cls(**settings)


class PointsCodec:
    name = "points"

    def __init__(self, config: PointsCodecConfig | None = None) -> None:
        self.config = config or PointsCodecConfig()

    def settings(self) -> dict[str, Any]:
        return asdict(self.config)

    def encode(self, sample: Any) -> dict[str, bytes]:
        point = np.asarray(sample.point, dtype=np.float32)
        if point.shape != (self.config.dim,) or not np.isfinite(point).all():
            raise SampleDecodeError(f"sample {sample.key}: point must be {self.config.dim} finite floats, "
                                    f"got shape {point.shape}")
        buf = io.BytesIO()
        np.save(buf, point, allow_pickle=False)
        fields = {"npy": buf.getvalue()}
        if getattr(sample, "label", None) is not None:
            fields["cls"] = str(int(sample.label)).encode()
        return fields

    def decode(self, fields: dict[str, Any]) -> dict[str, Any]:
        key = fields.get("__key__", "?")
        if "npy" not in fields:
            raise SampleDecodeError(f"sample {key}: no .npy member")
        try:
            point = np.load(io.BytesIO(fields["npy"]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise SampleDecodeError(f"sample {key}: undecodable .npy ({e})") from e
        if point.dtype != np.float32 or point.shape != (self.config.dim,) or not np.isfinite(point).all():
            raise SampleDecodeError(f"sample {key}: expected {self.config.dim} finite float32 values, "
                                    f"got {point.dtype} {point.shape}")
        out: dict[str, Any] = {"point": point}
        if "cls" in fields:
            try:
                out["label"] = int(fields["cls"].decode())
            except (ValueError, UnicodeDecodeError) as e:
                raise SampleDecodeError(f"sample {key}: malformed label ({e})") from e
        return out

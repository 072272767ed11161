"""Codecs turn a source's samples into shard members and back; the manifest records which one wrote a dataset."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from data_pipeline.codecs.dct_codec import DCTCodec
from data_pipeline.codecs.dct_config import DCTCodecConfig
from data_pipeline.codecs.image import ImageCodec, ImageCodecConfig
from data_pipeline.codecs.points import PointsCodec, PointsCodecConfig
from data_pipeline.codecs.tokens import TokensCodec, TokensCodecConfig


class Codec(Protocol):
    name: str

    def settings(self) -> dict[str, Any]: ...

    def encode(self, sample: Any) -> dict[str, bytes]: ...

    def decode(self, fields: dict[str, Any]) -> dict[str, Any]: ...


# name -> (settings dict -> typed config, codec class)
CODECS: dict[str, tuple[Callable[[dict[str, Any]], Any], type]] = {
    "image": (lambda settings: ImageCodecConfig(**settings), ImageCodec),
    "dct": (DCTCodecConfig.from_dict, DCTCodec),
    "points": (PointsCodecConfig.from_dict, PointsCodec),
    "tokens": (TokensCodecConfig.from_dict, TokensCodec),
}


def build_codec(name: str, settings: dict[str, Any] | None = None) -> Codec:
    """Build a codec from its registry name and settings (as stored in a manifest or a config)."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; known: {sorted(CODECS)}")
    make_config, codec_cls = CODECS[name]
    try:
        config = make_config(dict(settings or {}))
    except TypeError as e:
        raise ValueError(f"codec {name!r}: bad settings {settings!r} ({e})") from e
    return codec_cls(config)

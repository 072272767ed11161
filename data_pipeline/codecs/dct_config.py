"""Typed settings of the sparse DCT codec and the three token vocabularies they imply.

Vocabulary layout (regular tokens first, so a regular token id *is* its channel / position / shifted value):

    channel   0..383 = channel id (see ``dct_tables``),      384 = EOS, 385 = PAD      size 386
    position  0..P-1 = raster index y * (W/16) + x,           P   = EOS, P+1 = PAD      size P + 2
    value     0..2R-1 = quantised value v in [-R, R] \\ {0},  2R  = EOS, 2R+1 = PAD     size 2R + 2
              token = v + R for v < 0, v + R - 1 for v > 0 (zero is never emitted, so it has no token)

with P = (H/16) * (W/16) and R = ``value_range``. The end-of-sequence row is (EOS, EOS, EOS) in all three
columns, so any of the three decoders can predict it; PAD rows (PAD, PAD, PAD) only fill batches after EOS.
Values beyond +-R are clipped to +-R and counted (see ``dct_sequence``); with the IJG tables at any quality
the quantised coefficients stay within +-1025, so the default R = 1024 clips essentially nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np

from data_pipeline.codecs.dct_tables import MACROBLOCK, NUM_CHANNELS, check_quality

SizePolicy = Literal["error", "crop", "pad"]
AlphaPolicy = Literal["white", "drop"]
Upsampling = Literal["fancy", "nearest"]
JPEGSource = Literal["pixels", "coefficients", "requantize"]


@dataclass(frozen=True)
class Vocab:
    """Sizes and special ids of the channel, position and value vocabularies."""

    num_positions: int
    value_range: int
    num_channels: int = NUM_CHANNELS

    @property
    def num_values(self) -> int:
        """Regular value tokens: every non-zero integer in [-R, R]."""
        return 2 * self.value_range

    @property
    def channel_eos(self) -> int:
        return self.num_channels

    @property
    def channel_pad(self) -> int:
        return self.num_channels + 1

    @property
    def position_eos(self) -> int:
        return self.num_positions

    @property
    def position_pad(self) -> int:
        return self.num_positions + 1

    @property
    def value_eos(self) -> int:
        return self.num_values

    @property
    def value_pad(self) -> int:
        return self.num_values + 1

    @property
    def channel_size(self) -> int:
        return self.num_channels + 2

    @property
    def position_size(self) -> int:
        return self.num_positions + 2

    @property
    def value_size(self) -> int:
        return self.num_values + 2

    @property
    def sizes(self) -> tuple[int, int, int]:
        """(channel, position, value) vocabulary sizes including EOS and PAD: the three softmax widths."""
        return self.channel_size, self.position_size, self.value_size

    @property
    def eos(self) -> np.ndarray:
        """The end-of-sequence row."""
        return np.array([self.channel_eos, self.position_eos, self.value_eos], dtype=self.dtype)

    @property
    def pad(self) -> np.ndarray:
        """The padding row."""
        return np.array([self.channel_pad, self.position_pad, self.value_pad], dtype=self.dtype)

    @property
    def dtype(self) -> type[np.integer]:
        """int16 whenever every id fits (P <= 32765 positions, i.e. up to 2896x2896 pixels), else int32."""
        return np.int16 if max(self.sizes) <= np.iinfo(np.int16).max + 1 else np.int32

    def value_to_token(self, values: np.ndarray) -> np.ndarray:
        """Non-zero values already clipped to [-R, R] -> value token ids (zero has no token)."""
        v = np.asarray(values)
        return (v + self.value_range - (v > 0)).astype(self.dtype)

    def token_to_value(self, tokens: np.ndarray) -> np.ndarray:
        """Regular value token ids -> the signed quantised values (int16)."""
        return self._value_table[np.asarray(tokens)]

    def clipped_value_tokens(self, values: np.ndarray) -> np.ndarray:
        """Non-zero int16 values -> tokens of the values clipped to [-R, R]: one table lookup, no arithmetic."""
        return self._token_table[values.view(np.uint16)]

    @cached_property
    def _token_table(self) -> np.ndarray:
        """Indexed by the int16 value's bit pattern as uint16 (two's complement: -1 is 65535)."""
        v = np.arange(65536).astype(np.uint16).view(np.int16)
        return self.value_to_token(np.clip(v, -self.value_range, self.value_range))

    @cached_property
    def _value_table(self) -> np.ndarray:
        t = np.arange(self.num_values)
        return (t - self.value_range + (t >= self.value_range)).astype(np.int16)


def _resolution(value: Any) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        h = w = int(value)
    elif (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, np.integer)) for v in value)
    ):
        h, w = int(value[0]), int(value[1])
    else:
        raise ValueError(f"resolution must be an int or a (height, width) pair, got {value!r}")
    if h <= 0 or w <= 0 or h % MACROBLOCK or w % MACROBLOCK:
        raise ValueError(
            f"resolution {h}x{w} (HxW) must be positive multiples of {MACROBLOCK} (a 4:2:0 JPEG macroblock); "
            f"the nearest valid sizes are {max(MACROBLOCK, h // MACROBLOCK * MACROBLOCK)}x"
            f"{max(MACROBLOCK, w // MACROBLOCK * MACROBLOCK)}"
        )
    return h, w


@dataclass(frozen=True, kw_only=True)
class DCTCodecConfig:
    """Everything that fixes the meaning of a token sequence; recorded in the dataset manifest.

    resolution: image side (square) or (height, width), multiples of 16.
    quality: IJG JPEG quality 1..100 of the quantisation tables.
    value_range: quantised values are clipped to [-value_range, value_range].
    size_policy: what to do with an input image of another size. "error" refuses it (naming the size);
        "crop" cuts larger sides down, "pad" extends smaller sides by edge replication (bottom/right, as libjpeg
        pads partial macroblocks). The crop window starts at the centre offset rounded down to a multiple of
        16 pixels, so that a JPEG file can be cropped the same way in the coefficient domain without decoding.
    alpha: RGBA input is composited on white ("white") or its alpha channel is dropped ("drop").
        Grey input ([H, W] or [H, W, 1]) is replicated to R = G = B, which gives exactly zero chroma.
    upsampling: chroma upsampling of the decoder ("fancy" = libjpeg's default triangle filter, or "nearest").
    jpeg_source: where a JPEG file's sequence comes from when the source hands over the file itself (an image
        folder without ``resolution``): "pixels" decodes and re-encodes it; "coefficients" takes the file's own
        quantised coefficients (no decode, no second rounding) when its tables are this quality's and it is
        4:2:0 YCbCr or grey; "requantize" also takes files of another quality, re-quantised in the coefficient
        domain. A file the coefficient path cannot serve (other sampling, colour space or size) is encoded from
        its pixels, and counted.
    """

    resolution: int | tuple[int, int]
    quality: int = 75
    value_range: int = 1024
    size_policy: SizePolicy = "error"
    alpha: AlphaPolicy = "white"
    upsampling: Upsampling = "fancy"
    jpeg_source: JPEGSource = "pixels"
    vocab: Vocab = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "resolution", _resolution(self.resolution))
        check_quality(self.quality)
        if isinstance(self.value_range, bool) or not isinstance(self.value_range, (int, np.integer)):
            raise ValueError(f"value_range must be an integer, got {self.value_range!r}")
        if not 1 <= self.value_range <= 16383:
            raise ValueError(f"value_range must be in 1..16383, got {self.value_range}")
        for name, allowed in (
            ("size_policy", ("error", "crop", "pad")),
            ("alpha", ("white", "drop")),
            ("upsampling", ("fancy", "nearest")),
            ("jpeg_source", ("pixels", "coefficients", "requantize")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        object.__setattr__(
            self, "vocab", Vocab(num_positions=self.num_positions, value_range=int(self.value_range))
        )

    @property
    def height(self) -> int:
        return self.resolution[0]  # type: ignore[index]

    @property
    def width(self) -> int:
        return self.resolution[1]  # type: ignore[index]

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the DCT image: one location per 16x16 macroblock."""
        return self.height // MACROBLOCK, self.width // MACROBLOCK

    @property
    def num_positions(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def max_sequence_length(self) -> int:
        """Every coefficient non-zero, plus EOS: the longest possible sequence."""
        return self.num_positions * NUM_CHANNELS + 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings for the manifest."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d["resolution"] = list(self.resolution)  # type: ignore[arg-type]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DCTCodecConfig:
        """Inverse of ``to_dict``; unknown keys are an error, not silently ignored."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DCT codec settings {unknown}; known: {sorted(known)}")
        d = dict(d)
        if isinstance(d.get("resolution"), list):
            d["resolution"] = tuple(d["resolution"])
        return cls(**d)

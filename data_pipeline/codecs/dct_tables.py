"""JPEG constants of the sparse DCT codec: quantisation tables, zigzag order and the 384-channel layout.

Channel numbering (the one fact every other module of the codec relies on)
-------------------------------------------------------------------------
A 16x16 pixel macroblock holds four 8x8 luma blocks and, after 4:2:0 subsampling, one 8x8 Cb and one 8x8 Cr
block. Each block has 64 DCT frequencies, numbered ``z = 0..63`` in JPEG zigzag order (low to high frequency).
The dense "DCT image" has one spatial location per macroblock and 384 channels:

    channel = 6 * z + slot
    slot 0..3 = luma block at (dy, dx) = (slot // 2, slot % 2) inside the macroblock (space-to-depth, raster),
    slot 4    = Cb,  slot 5 = Cr.

So the channel id *is* the sequence order: sorting triples by channel gives frequency-major order with luma and
chroma interleaved per frequency (Y00 Y01 Y10 Y11 Cb Cr of the DC, then the same six of the first AC, ...),
which is the coarse-to-fine, progressive-JPEG-like stream of the paper, and "channel never decreases" is a plain
integer comparison for masking invalid predictions.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

BLOCK = 8
MACROBLOCK = 16
NUM_FREQS = 64
SLOTS = 6
NUM_LUMA_SLOTS = 4
NUM_CHANNELS = NUM_FREQS * SLOTS  # 384
SLOT_CB = 4
SLOT_CR = 5

LUMA_BASE_TABLE = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.int64,
)
"""JPEG standard Annex K.1, natural (row = vertical frequency) order."""

CHROMA_BASE_TABLE = np.full((8, 8), 99, dtype=np.int64)
CHROMA_BASE_TABLE[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]
"""JPEG standard Annex K.2, natural order."""


def _zigzag() -> np.ndarray:
    """Natural (row-major) index of each zigzag position: odd anti-diagonals run down, even ones run up."""
    cells = [(i, j) for i in range(BLOCK) for j in range(BLOCK)]
    cells.sort(key=lambda ij: (ij[0] + ij[1], ij[0] if (ij[0] + ij[1]) % 2 else ij[1]))
    return np.array([i * BLOCK + j for i, j in cells], dtype=np.int64)


ZIGZAG = _zigzag()
"""ZIGZAG[z] = natural index (8*row + col) of zigzag frequency z; the same as libjpeg's jpeg_natural_order."""

CHANNEL_ZIGZAG = np.arange(NUM_CHANNELS) // SLOTS
"""Zigzag frequency of every channel."""
CHANNEL_SLOT = np.arange(NUM_CHANNELS) % SLOTS
"""Slot of every channel: 0..3 luma block (dy, dx) = (slot // 2, slot % 2), 4 Cb, 5 Cr."""


def channel_index(zigzag: int | np.ndarray, slot: int | np.ndarray) -> int | np.ndarray:
    """Channel id of a (zigzag frequency, slot) pair."""
    return zigzag * SLOTS + slot


def check_quality(quality: int) -> int:
    """IJG quality is an integer in 1..100; anything else is a configuration error, not something to clamp."""
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be an integer in 1..100, got {quality!r}")
    return int(quality)


@lru_cache(maxsize=128)
def _quant_tables(quality: int) -> tuple[np.ndarray, np.ndarray]:
    # libjpeg's jpeg_quality_scaling uses C integer division: 5000 / q truncates.
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    out = []
    for base in (LUMA_BASE_TABLE, CHROMA_BASE_TABLE):
        table = np.clip((base * scale + 50) // 100, 1, 255).astype(np.uint16)
        table.setflags(write=False)
        out.append(table)
    return out[0], out[1]


def quant_tables(quality: int) -> tuple[np.ndarray, np.ndarray]:
    """(luma, chroma) uint16 [8, 8] tables in natural order, scaled the IJG way and clipped to baseline 1..255.

    Equal to Pillow's ``Image.quantization[0]`` / ``[1]`` (which Pillow lists in natural order) after a JPEG save
    at the same quality. The arrays are read-only because they are cached.
    """
    return _quant_tables(check_quality(quality))


@lru_cache(maxsize=128)
def _channel_quant(quality: int) -> np.ndarray:
    luma, chroma = _quant_tables(quality)
    per_slot = np.stack(
        [luma.reshape(-1)[ZIGZAG]] * NUM_LUMA_SLOTS + [chroma.reshape(-1)[ZIGZAG]] * 2, axis=1
    )
    out = per_slot.reshape(NUM_CHANNELS).astype(np.float64)
    out.setflags(write=False)
    return out


def channel_quant(quality: int) -> np.ndarray:
    """Quantisation step of each of the 384 channels (float64, read-only), in channel order."""
    return _channel_quant(check_quality(quality))

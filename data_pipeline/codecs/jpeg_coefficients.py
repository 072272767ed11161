"""Quantised DCT images read straight out of JPEG files (PyPI ``jpeglib``), with no decode / re-encode.

A baseline or progressive JPEG already stores exactly what the codec computes: 8x8 DCT coefficients divided by a
quantisation table and rounded. When the file is YCbCr with 4:2:0 sampling (luma 2x2, chroma 1x1) and its tables
are the IJG tables of the configured quality, its coefficients are laid out into the codec's [h, w, 384] DCT image
unchanged. Grey (one-component) JPEGs give the same with zero chroma, as a grey pixel image would.

What is not taken as is:
- tables of another quality: an error, or with ``requantize=True`` a re-quantisation in the coefficient domain
  (round(coef * q_file / q_codec), half away from zero), which is lossy but needs no pixel decode;
- other sampling (4:4:4, 4:2:2), colour spaces (CMYK, Adobe RGB) or sizes the coefficient grid cannot serve (a
  smaller image, or "pad"): an error, or with ``pixel_fallback=True`` a Pillow decode and the pixel encoder;
- a file that cannot be parsed, or is truncated (no EOI marker after its last scan; libjpeg itself only warns and
  fills zeros): always an error naming the file. Corruption inside the entropy-coded data that libjpeg merely
  warns about is not detected here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from data_pipeline.codecs.dct_config import DCTCodecConfig
from data_pipeline.codecs.dct_images import crop_offset
from data_pipeline.codecs.dct_tables import (
    BLOCK,
    MACROBLOCK,
    NUM_CHANNELS,
    NUM_FREQS,
    SLOTS,
    ZIGZAG,
    quant_tables,
)


class JPEGReadError(ValueError):
    """A JPEG file that cannot be read, or cannot be used in the coefficient domain."""


_SOI = b"\xff\xd8"
_SOS, _EOI = 0xDA, 0xD9
_NO_LENGTH = {0x01, *range(0xD0, 0xD8)}  # TEM and RST0..7 carry no length field
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # after a scan: FF 00 is data, RSTn sits inside it


def _check_structure(path: str, data: bytes) -> None:
    """Walk the marker segments from SOI to EOI: truncation is a file that ends before its EOI. Bytes after the
    EOI (a phone's appended "motion photo" video, padding) are not part of the image and are ignored."""
    if not data.startswith(_SOI):
        raise JPEGReadError(f"{path}: not a JPEG file (no SOI marker)")
    pos, scans = 2, 0
    while True:
        while pos < len(data) and data[pos] == 0xFF and pos + 1 < len(data) and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes before a marker
        if pos + 1 >= len(data):
            break
        if data[pos] != 0xFF:  # stray bytes between segments: libjpeg skips them with a warning, and so do we
            pos = data.find(b"\xff", pos)
            if pos < 0:
                break
            continue
        marker = data[pos + 1]
        if marker == _EOI:
            if scans == 0:
                raise JPEGReadError(f"{path}: corrupt JPEG file (no scan)")
            return
        if marker in _NO_LENGTH:
            pos += 2
            continue
        if pos + 4 > len(data):
            break
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker != _SOS:
            pos = end
            continue
        scans += 1
        found = _NEXT_MARKER.search(data, end)
        if found is None:
            break
        pos = found.start()
    what = "no scan" if scans == 0 else "no EOI marker after the last scan"
    raise JPEGReadError(f"{path}: truncated JPEG file ({what})")


def _layout(y: np.ndarray, cb: np.ndarray | None, cr: np.ndarray | None) -> np.ndarray:
    """jpeglib blocks (Y [2h, 2w, 8, 8], Cb/Cr [h, w, 8, 8], natural order) -> DCT image [h, w, 384]."""
    h, w = y.shape[0] // 2, y.shape[1] // 2
    out = np.zeros((h, w, NUM_FREQS, SLOTS), dtype=np.int16)
    luma = y.reshape(h, 2, w, 2, NUM_FREQS).transpose(0, 2, 1, 3, 4).reshape(h, w, 4, NUM_FREQS)
    out[:, :, :, :4] = luma[..., ZIGZAG].transpose(0, 1, 3, 2)
    if cb is not None and cr is not None:
        out[:, :, :, 4] = cb.reshape(h, w, NUM_FREQS)[..., ZIGZAG]
        out[:, :, :, 5] = cr.reshape(h, w, NUM_FREQS)[..., ZIGZAG]
    return out.reshape(h, w, NUM_CHANNELS)


def _requantize(coef: np.ndarray, file_table: np.ndarray, table: np.ndarray) -> np.ndarray:
    x = coef * (file_table.astype(np.float64) / table)
    return np.trunc(x + np.copysign(0.5, x)).astype(np.int16)


class _Unsupported(Exception):
    """Raised inside the coefficient reader for files the pixel fallback can still handle."""


def _read_coefficients(path: str, config: DCTCodecConfig, requantize: bool) -> np.ndarray:
    import jpeglib

    try:
        jpeg = jpeglib.read_dct(path)
        y, cb, cr = jpeg.Y, jpeg.Cb, jpeg.Cr
        qt, qt_no = np.asarray(jpeg.qt), np.asarray(jpeg.quant_tbl_no)
        factors = np.asarray(jpeg.samp_factor)
        height, width, ncomp = int(jpeg.height), int(jpeg.width), int(jpeg.num_components)
        space = str(jpeg.jpeg_color_space)
    except (OSError, RuntimeError, ValueError) as e:
        raise JPEGReadError(f"{path}: corrupt or unreadable JPEG file ({e})") from e
    if ncomp == 3 and "YCbCr" in space:
        if factors.tolist() != [[2, 2], [1, 1], [1, 1]]:
            raise _Unsupported(
                f"chroma sampling factors {factors.tolist()} are not 4:2:0 ([[2, 2], [1, 1], [1, 1]])"
            )
    elif ncomp == 1:
        cb = cr = None
    else:
        raise _Unsupported(f"{ncomp} components in colour space {space}; only YCbCr or greyscale")

    target_h, target_w = config.resolution  # type: ignore[misc]
    if (height, width) != (target_h, target_w):
        if config.size_policy != "crop" or height < target_h or width < target_w:
            raise _Unsupported(
                f"size {height}x{width} (HxW) does not match the codec resolution {target_h}x{target_w} and "
                f"size_policy={config.size_policy!r} cannot be served from coefficients (only 'crop' of a larger file)"
            )
    oy, ox = crop_offset(height, target_h) // BLOCK, crop_offset(width, target_w) // BLOCK
    y = y[oy : oy + target_h // BLOCK, ox : ox + target_w // BLOCK]
    if cb is not None and cr is not None:
        cb = cb[oy // 2 : oy // 2 + target_h // MACROBLOCK, ox // 2 : ox // 2 + target_w // MACROBLOCK]
        cr = cr[oy // 2 : oy // 2 + target_h // MACROBLOCK, ox // 2 : ox // 2 + target_w // MACROBLOCK]

    luma_t, chroma_t = quant_tables(config.quality)
    pairs = [(y, qt[qt_no[0]], luma_t)] + (
        [] if cb is None else [(cb, qt[qt_no[1]], chroma_t), (cr, qt[qt_no[2]], chroma_t)]
    )
    out = []
    for blocks, file_table, table in pairs:
        if np.array_equal(file_table, table):
            out.append(blocks)
        elif requantize:
            out.append(_requantize(blocks, file_table, table))
        else:
            raise JPEGReadError(
                f"{path}: quantisation table {file_table.reshape(-1)[:8].tolist()}... is not the IJG table of "
                f"quality {config.quality} ({table.reshape(-1)[:8].tolist()}...); pass requantize=True to "
                "re-quantise in the coefficient domain, or decode it to pixels"
            )
    return _layout(*out) if len(out) == 3 else _layout(out[0], None, None)


def read_jpeg_dct(
    path: str | os.PathLike[str],
    config: DCTCodecConfig,
    *,
    requantize: bool = False,
    pixel_fallback: bool = False,
) -> np.ndarray:
    """One JPEG file -> quantised DCT image int16 [h, w, 384] in the codec's layout (see module docstring)."""
    path = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise JPEGReadError(f"{path}: cannot read ({e})") from e
    _check_structure(path, data)
    try:
        return _read_coefficients(path, config, requantize)
    except _Unsupported as e:
        if not pixel_fallback:
            raise JPEGReadError(
                f"{path}: cannot use the coefficients directly: {e}; pass pixel_fallback=True"
            ) from e
    return _decode_and_encode(path, config)


def _decode_and_encode(path: str, config: DCTCodecConfig) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    from data_pipeline.codecs.dct_images import as_rgb_batch
    from data_pipeline.codecs.dct_transform import rgb_to_dct_image

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise JPEGReadError(f"{path}: corrupt or unreadable JPEG file ({e})") from e
    try:
        return rgb_to_dct_image(as_rgb_batch([rgb], config), config.quality)[0]
    except ValueError as e:  # a size the size policy cannot serve: named by the file, not "image 0"
        raise JPEGReadError(f"{path}: {str(e).removeprefix('image 0: ')}") from e


def read_jpeg_dct_batch(
    paths: list[str | os.PathLike[str]], config: DCTCodecConfig, **kwargs: bool
) -> np.ndarray:
    """Several files -> int16 [B, h, w, 384]; the first bad file raises with its name."""
    h, w = config.grid
    out = np.empty((len(paths), h, w, NUM_CHANNELS), dtype=np.int16)
    for i, p in enumerate(paths):
        out[i] = read_jpeg_dct(p, config, **kwargs)
    return out

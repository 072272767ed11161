"""Dense DCT image <-> sparse (channel, position, value) token sequences, their validation and their bytes.

A sequence is an integer array [n + 1, 3] of token ids (see ``dct_config`` for the vocabularies): one row per
non-zero quantised coefficient, ordered channel-major (channel ids are already in low-to-high frequency order with
luma/chroma interleaved, see ``dct_tables``) and by raster position within a channel, then one (EOS, EOS, EOS)
row. The value column holds token ids, not raw values; ``Vocab.token_to_value`` maps them back.

Invariants the validating loader enforces (and the model can use to mask invalid predictions): channel never
decreases; position strictly increases within a channel; the last row, and only it, is EOS; every other id is a
regular token of its vocabulary.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from data_pipeline.codecs.dct_config import DCTCodecConfig, Vocab
from data_pipeline.codecs.dct_tables import NUM_CHANNELS
from data_pipeline.codecs.dct_transform import (
    Backend,
    check_dct_image,
    check_rgb_batch,
    dct_image_to_rgb,
    encode_dense_kernel,
    kernel,
    kernel_tables,
    rgb_to_dct_image,
    use_kernel,
)


class SequenceError(ValueError):
    """A token sequence that breaks the vocabulary or ordering contract."""


class SparseBatch(NamedTuple):
    """Sequences of a batch and, per image, how many values were clipped to +-value_range."""

    sequences: list[np.ndarray]
    clipped: np.ndarray


def _channel_major(dct: np.ndarray, config: DCTCodecConfig, channels_last: bool) -> np.ndarray:
    dct = check_dct_image(dct, channels_last)
    grid = dct.shape[1:3] if channels_last else dct.shape[2:4]
    if tuple(grid) != config.grid:
        raise ValueError(
            f"DCT image grid {tuple(grid)} does not match the codec's {config.grid} (resolution {config.resolution})"
        )
    chw = dct.transpose(0, 3, 1, 2) if channels_last else dct
    return np.ascontiguousarray(chw).reshape(dct.shape[0], NUM_CHANNELS * config.num_positions)


def sparsify(
    dct: np.ndarray, config: DCTCodecConfig, *, channels_last: bool = True, backend: Backend = "auto"
) -> SparseBatch:
    """Quantised DCT images [B, h, w, 384] (or [B, 384, h, w]) -> one token sequence per image, with clip counts.

    The channel-major flattening makes np.flatnonzero return the coefficients already in sequence order
    (image, channel, position); the sequences are views into one shared [n + B, 3] buffer.
    """
    vocab = config.vocab
    flat = _channel_major(dct, config, channels_last)
    bsz, per_image = flat.shape
    if bsz == 0:
        return SparseBatch([], np.zeros(0, dtype=np.int64))
    if use_kernel(backend):
        return _sparsify_kernel(flat, config)
    positions = config.num_positions
    idx = np.flatnonzero(flat != 0)
    values = flat.reshape(-1)[idx]
    if values.dtype != np.int16:
        values = np.clip(values, -32768, 32767).astype(np.int16)
    bounds = np.searchsorted(idx, np.arange(bsz + 1, dtype=np.int64) * per_image)
    r = vocab.value_range
    clipped = np.zeros(bsz, dtype=np.int64)
    if values.size and (int(values.min()) < -r or int(values.max()) > r):
        over = np.flatnonzero((values > r) | (values < -r))
        clipped = np.bincount(np.searchsorted(bounds, over, side="right") - 1, minlength=bsz).astype(np.int64)
    tokens = vocab.clipped_value_tokens(values)
    if positions & (positions - 1) == 0:  # power of two (square power-of-two sides): shifts beat division
        shift = positions.bit_length() - 1
        rows, pos = idx >> shift, idx & (positions - 1)  # rows = image * 384 + channel
    else:
        rows = idx // positions
        pos = idx - rows * positions
    out = np.empty((idx.size + bsz, 3), dtype=vocab.dtype)
    eos = vocab.eos
    sequences = []
    for b in range(bsz):
        s, e = int(bounds[b]), int(bounds[b + 1])
        seq = out[s + b : e + b + 1]
        np.subtract(rows[s:e], b * NUM_CHANNELS, out=seq[:-1, 0], casting="unsafe")
        seq[:-1, 1] = pos[s:e]
        seq[:-1, 2] = tokens[s:e]
        seq[-1] = eos
        sequences.append(seq)
    return SparseBatch(sequences, clipped)


def _sparsify_kernel(flat: np.ndarray, config: DCTCodecConfig, counts: np.ndarray | None = None) -> SparseBatch:
    """The kernel's sparsify: each image's non-zero count (from the encoder, or one counting pass) sizes the token
    buffer exactly, then one pass writes the rows."""
    vocab, bsz, positions = config.vocab, len(flat), config.num_positions
    if flat.dtype != np.int16:
        flat = np.clip(flat, -32768, 32767).astype(np.int16)
    if counts is None:
        counts = np.empty(bsz, dtype=np.int64)
        kernel().count_nonzero(flat, counts, bsz, positions)
    bounds = np.zeros(bsz + 1, dtype=np.int64)
    np.cumsum(counts + 1, out=bounds[1:])
    out = np.empty((int(bounds[-1]), 3), dtype=vocab.dtype)
    clipped = np.empty(bsz, dtype=np.int64)
    kernel().sparsify(flat, out, bounds, clipped, bsz, positions, vocab.value_range)
    out[bounds[1:] - 1] = vocab.eos
    return SparseBatch([out[bounds[b] : bounds[b + 1]] for b in range(bsz)], clipped)


def rgb_to_sequences(images: np.ndarray, config: DCTCodecConfig, *, backend: Backend = "auto") -> SparseBatch:
    """uint8 RGB [B, H, W, 3] (the codec's size) -> sequences and clip counts: ``rgb_to_dct_image`` then
    ``sparsify``, with the kernel's non-zero counts handed over instead of counted again."""
    images = check_rgb_batch(images)
    if not use_kernel(backend):
        dense = rgb_to_dct_image(images, config.quality, channels_last=False, backend="numpy")
        return sparsify(dense, config, channels_last=False, backend="numpy")
    dense, counts = encode_dense_kernel(images, config.quality)
    return _sparsify_kernel(_channel_major(dense, config, channels_last=False), config, counts)


def dct_image_to_triples(
    dct: np.ndarray, config: DCTCodecConfig, *, channels_last: bool = True
) -> list[np.ndarray]:
    """Quantised DCT images -> token sequences [n_i + 1, 3] ending in EOS (see ``sparsify`` for clip counts)."""
    return sparsify(dct, config, channels_last=channels_last).sequences


def _as_rows(seq: np.ndarray, index: int) -> np.ndarray:
    arr = np.asarray(seq)
    if arr.ndim != 2 or arr.shape[1] != 3 or not np.issubdtype(arr.dtype, np.integer):
        raise SequenceError(
            f"sequence {index}: expected an integer array [n, 3], got {arr.dtype} {arr.shape}"
        )
    return arr


def _check_ranges(rows: np.ndarray, vocab: Vocab, where: str) -> None:
    limits = np.array([vocab.num_channels, vocab.num_positions, vocab.num_values])
    bad = (rows < 0) | (rows >= limits)
    if bad.any():
        i, col = np.argwhere(bad)[0]
        name = ("channel", "position", "value")[col]
        raise SequenceError(
            f"{where}: row {i}: {name} token {int(rows[i, col])} is outside the regular range 0..{limits[col] - 1}"
        )


def triples_to_dct_image(
    sequences: Sequence[np.ndarray] | np.ndarray, config: DCTCodecConfig, *, channels_last: bool = True
) -> np.ndarray:
    """Token sequences (a list, or a padded batch [B, L, 3]) -> quantised DCT images int16 [B, h, w, 384].

    Each sequence is read up to its first EOS or PAD row, so partial sequences (a sampler mid-way) and padded
    batches decode too; every row read must hold regular tokens. Duplicate (channel, position) rows: the last wins.
    """
    vocab = config.vocab
    bodies = []
    for i, seq in enumerate(sequences):
        arr = _as_rows(seq, i)
        special = (arr[:, 0] == vocab.channel_eos) | (arr[:, 0] == vocab.channel_pad)  # other ids: out of range
        end = int(special.argmax()) if len(arr) else 0
        bodies.append(arr[:end] if len(arr) and special[end] else arr)
    bsz, positions = len(bodies), config.num_positions
    out = np.zeros((bsz, NUM_CHANNELS * positions), dtype=np.int16)
    rows = np.concatenate(bodies) if bsz else np.zeros((0, 3), dtype=np.int64)
    if len(rows):
        limits = np.array([vocab.num_channels, vocab.num_positions, vocab.num_values])
        # per column: a reduction along axis 0 of an [n, 3] array is ~20x slower in numpy
        if any(rows[:, j].min() < 0 or rows[:, j].max() >= limits[j] for j in range(3)):
            for i, body in enumerate(bodies):
                _check_ranges(body, vocab, f"sequence {i}")
        lengths = np.array([len(b) for b in bodies])
        base = np.repeat(np.arange(bsz, dtype=np.int64) * (NUM_CHANNELS * positions), lengths)
        flat = rows[:, 0].astype(np.int64)
        flat *= positions
        flat += rows[:, 1]
        flat += base
        out.reshape(-1)[flat] = vocab.token_to_value(rows[:, 2])
    h, w = config.grid
    out = out.reshape(bsz, NUM_CHANNELS, h, w)
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1)) if channels_last else out


def _kernel_rows(rows: np.ndarray) -> np.ndarray:
    """Rows as the kernel reads them: C-contiguous int16 or int32. Other integer types are clipped to int32,
    which keeps every id's class (regular, special, out of range) since all limits are far inside it."""
    if rows.dtype in (np.dtype(np.int16), np.dtype(np.int32)):
        return np.ascontiguousarray(rows)
    info = np.iinfo(np.int32)
    return np.clip(rows, info.min, info.max).astype(np.int32)


def sequences_to_rgb(
    sequences: Sequence[np.ndarray] | np.ndarray, config: DCTCodecConfig, *, backend: Backend = "auto"
) -> np.ndarray:
    """Token sequences (see ``triples_to_dct_image`` for what is read) -> uint8 RGB [B, H, W, 3].

    The kernel scatters each sequence into a macroblock-ordered image in cache and decodes it there, instead of
    building the dense channel-major batch; it checks the same token ranges and reports the same error.
    """
    if not use_kernel(backend):
        dct = triples_to_dct_image(sequences, config, channels_last=False)
        return dct_image_to_rgb(
            dct, config.quality, upsampling=config.upsampling, channels_last=False, backend="numpy"
        )
    vocab = config.vocab
    rows = [_kernel_rows(_as_rows(seq, i)) for i, seq in enumerate(sequences)]
    out = np.empty((len(rows), config.height, config.width, 3), dtype=np.uint8)
    bad = kernel().decode_tokens(
        rows,
        kernel_tables(config.quality),
        out,
        config.height,
        config.width,
        config.upsampling == "fancy",
        vocab.value_range,
    )
    if bad is not None:
        image, row = bad
        _check_ranges(rows[image][: row + 1], vocab, f"sequence {image}")
        raise AssertionError(f"_dct_kernel reported sequence {image} row {row}, which is in range")
    return out


def validate_sequence(seq: np.ndarray, vocab: Vocab, source: str = "sequence") -> np.ndarray:
    """Check a complete stored sequence against the contract in the module docstring; returns it unchanged."""
    arr = np.asarray(seq)
    if arr.ndim != 2 or arr.shape[1] != 3 or not np.issubdtype(arr.dtype, np.integer) or len(arr) == 0:
        raise SequenceError(
            f"{source}: expected a non-empty integer array [n, 3], got {arr.dtype} {arr.shape}"
        )
    if not np.array_equal(arr[-1], vocab.eos):
        raise SequenceError(f"{source}: last row {arr[-1].tolist()} is not EOS {vocab.eos.tolist()}")
    body = arr[:-1]
    _check_ranges(body, vocab, source)
    if len(body) > 1:
        dc = np.diff(body[:, 0].astype(np.int64))
        dp = np.diff(body[:, 1].astype(np.int64))
        bad = np.flatnonzero((dc < 0) | ((dc == 0) & (dp <= 0)))
        if bad.size:
            i = int(bad[0]) + 1
            raise SequenceError(
                f"{source}: row {i}: (channel {int(body[i, 0])}, position {int(body[i, 1])}) does not come after "
                f"(channel {int(body[i - 1, 0])}, position {int(body[i - 1, 1])}): channels must not decrease and "
                "positions must increase within a channel"
            )
    return arr


def sequence_to_bytes(seq: np.ndarray, vocab: Vocab) -> bytes:
    """A validated sequence -> .npy bytes (int16 for every practical resolution) for a shard member."""
    arr = validate_sequence(seq, vocab).astype(vocab.dtype, copy=False)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def sequence_from_bytes(data: bytes, vocab: Vocab, source: str = "sequence") -> np.ndarray:
    """.npy bytes of a shard member -> a validated sequence; a clear SequenceError naming `source` otherwise."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise SequenceError(f"{source}: not a .npy token array ({e})") from e
    if not isinstance(arr, np.ndarray):  # np.load reads zip bytes as an .npz archive
        raise SequenceError(f"{source}: not a .npy token array (an .npz archive)")
    if arr.dtype not in (np.dtype(np.int16), np.dtype(np.int32)):
        raise SequenceError(f"{source}: token dtype {arr.dtype} is not int16/int32")
    return validate_sequence(arr, vocab, source)


def pad_sequences(sequences: Sequence[np.ndarray], vocab: Vocab, length: int | None = None) -> np.ndarray:
    """Stack sequences into [B, L, 3] filled with PAD rows; L defaults to the longest (a longer one is an error)."""
    longest = max((len(s) for s in sequences), default=0)
    length = longest if length is None else length
    if longest > length:
        raise SequenceError(f"a sequence of {longest} rows does not fit the padded length {length}")
    out = np.empty((len(sequences), length, 3), dtype=vocab.dtype)
    out[...] = vocab.pad
    for i, s in enumerate(sequences):
        out[i, : len(s)] = s
    return out

"""The compiled DCT codec kernel (data_pipeline/codecs/_dct_kernel.c) against the numpy reference path.

Allowed differences, and why: the colour conversion, the 2x2 chroma sums, the rational DCT rows (DC, (0,4), (4,0),
(4,4)), sparsify and the token scatter are computed identically in both, so they agree bit for bit. The other
DCT coefficients are float32 sums in another order (numpy's BLAS GEMM against the kernel's separable even/odd
8-point products), so a coefficient within float32 noise of a .5 tie can round the other way: at most one step, in
at most ENCODE_MISMATCH of the coefficients (measured on the `photos` fixture: 0 to 1.3e-6 for qualities 10-90, 8.9e-6
at 95, 3.7e-5 at 100 where the steps are smallest). Decoding likewise (the IDCT, upsampling and colour GEMMs of
numpy against the kernel's float32 loops): at most one level in at most DECODE_MISMATCH of the RGB values
(measured: 5e-6 to 2.4e-5).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import skimage.data

from data_pipeline.codecs import dct_transform
from data_pipeline.codecs.dct_codec import decode, encode, encode_with_stats
from data_pipeline.codecs.dct_config import DCTCodecConfig
from data_pipeline.codecs.dct_sequence import (
    SequenceError,
    pad_sequences,
    rgb_to_sequences,
    sequences_to_rgb,
    sparsify,
    triples_to_dct_image,
)
from data_pipeline.codecs.dct_transform import dct_image_to_rgb, kernel, kernel_tables, rgb_to_dct_image

ENCODE_MISMATCH = 1e-4
DECODE_MISMATCH = 1e-4


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """Six 256x256 crops of three scikit-image photos and two of random noise (worst case for near-ties)."""
    rng = np.random.default_rng(0)
    crops = [
        src[y : y + 256, x : x + 256]
        for src in (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea())
        for y, x in ((0, 0), (40, 96))
    ]
    crops += list(rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8))
    return np.stack(crops)


def _assert_close(ours: np.ndarray, ref: np.ndarray, allowed: float, what: str) -> None:
    diff = np.abs(ours.astype(np.int64) - ref.astype(np.int64))
    assert diff.max() <= 1, (what, int(diff.max()))
    assert (diff > 0).mean() <= allowed, (what, float((diff > 0).mean()))


def test_kernel_is_built() -> None:
    """`pip install -e .` builds it (setup.py); the codec would otherwise fall back to numpy with a warning."""
    assert dct_transform.use_kernel("auto")
    assert callable(kernel().encode_dense)
    tables = kernel_tables(75)
    assert tables.dtype == np.float32 and tables.shape == (205,)
    assert set(np.abs(tables[[0, 4 * 8]]).tolist()) == {1.0}  # rows 0 and 4 of the scaled basis: exactly +-1


@pytest.mark.parametrize("quality", [10, 50, 75, 90, 95, 100])
def test_encode_matches_numpy_on_photos_and_noise(photos: np.ndarray, quality: int) -> None:
    ours = rgb_to_dct_image(photos, quality, backend="kernel")
    ref = rgb_to_dct_image(photos, quality, backend="numpy")
    assert ours.dtype == ref.dtype == np.int16 and ours.shape == ref.shape == (8, 16, 16, 384)
    _assert_close(ours, ref, ENCODE_MISMATCH, f"encode q={quality}")


@pytest.mark.parametrize(
    "shape", [(1, 16, 16), (3, 64, 64), (5, 48, 80), (7, 32, 16), (3, 256, 384), (17, 64, 64)]
)
def test_odd_batches_and_non_square_sizes(photos: np.ndarray, shape: tuple[int, int, int]) -> None:
    bsz, h, w = shape
    src = skimage.data.chelsea()  # 300x451: room for every crop
    rng = np.random.default_rng(bsz * h + w)
    tops, lefts = rng.integers(0, 300 - h, bsz), rng.integers(0, 451 - w, bsz)
    images = np.stack([src[y : y + h, x : x + w] for y, x in zip(tops, lefts, strict=True)])
    for channels_last in (True, False):
        ours = rgb_to_dct_image(images, 75, channels_last=channels_last, backend="kernel")
        ref = rgb_to_dct_image(images, 75, channels_last=channels_last, backend="numpy")
        _assert_close(ours, ref, ENCODE_MISMATCH, f"encode {shape}")
        for upsampling in ("fancy", "nearest"):
            px = dct_image_to_rgb(ours, 75, upsampling=upsampling, channels_last=channels_last, backend="kernel")
            px_ref = dct_image_to_rgb(ours, 75, upsampling=upsampling, channels_last=channels_last, backend="numpy")
            assert px.shape == (bsz, h, w, 3) and px.dtype == np.uint8
            _assert_close(px, px_ref, DECODE_MISMATCH, f"decode {shape} {upsampling}")
    # the kernel's result for an image does not depend on the rest of the batch
    alone = np.concatenate([rgb_to_dct_image(im[None], 75, backend="kernel") for im in images])
    assert np.array_equal(alone, rgb_to_dct_image(images, 75, backend="kernel"))


@pytest.mark.parametrize("quality", [25, 75, 95])
def test_decode_matches_numpy(photos: np.ndarray, quality: int) -> None:
    dense = rgb_to_dct_image(photos, quality, backend="numpy")
    for upsampling in ("fancy", "nearest"):
        ours = dct_image_to_rgb(dense, quality, upsampling=upsampling, backend="kernel")
        ref = dct_image_to_rgb(dense, quality, upsampling=upsampling, backend="numpy")
        _assert_close(ours, ref, DECODE_MISMATCH, f"decode q={quality} {upsampling}")
    # arbitrary coefficients (clamping everywhere) and int64 input
    rng = np.random.default_rng(1)
    wild = (rng.integers(-300, 301, (3, 2, 3, 384)) * (rng.random((3, 2, 3, 384)) < 0.2)).astype(np.int64)
    _assert_close(
        dct_image_to_rgb(wild, quality, backend="kernel"),
        dct_image_to_rgb(wild, quality, backend="numpy"),
        2e-3,  # 18 * 48 * 3 values: one differing value is 1.3e-4
        "decode of random coefficients",
    )


def test_sparsify_and_token_decode_are_exact(photos: np.ndarray) -> None:
    for size, images in ((256, photos[:5]), (64, photos[:, :64, :64])):
        cfg = DCTCodecConfig(resolution=size, value_range=40)  # small range: some values are clipped
        dense = rgb_to_dct_image(images, cfg.quality, channels_last=False, backend="numpy")
        ours, ref = (sparsify(dense, cfg, channels_last=False, backend=b) for b in ("kernel", "numpy"))
        assert ours.clipped.tolist() == ref.clipped.tolist() and ref.clipped.sum() > 0
        assert len(ours.sequences) == len(ref.sequences)
        for a, b in zip(ours.sequences, ref.sequences, strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        # fused encode = kernel dense + kernel sparsify; fused decode = scatter + the same pixel kernel
        fused = rgb_to_sequences(images, cfg, backend="kernel")
        kernel_dense = rgb_to_dct_image(images, cfg.quality, channels_last=False, backend="kernel")
        staged = sparsify(kernel_dense, cfg, channels_last=False, backend="kernel")
        assert all(np.array_equal(a, b) for a, b in zip(fused.sequences, staged.sequences, strict=True))
        pixels = sequences_to_rgb(fused.sequences, cfg, backend="kernel")
        clipped_dense = triples_to_dct_image(fused.sequences, cfg, channels_last=False)
        assert np.array_equal(pixels, dct_image_to_rgb(clipped_dense, cfg.quality, channels_last=False))
        _assert_close(pixels, sequences_to_rgb(fused.sequences, cfg, backend="numpy"), DECODE_MISMATCH, "tokens")


def test_int32_tokens_for_large_grids() -> None:
    """Over 32765 positions the vocab is int32: the kernel writes and reads that width too."""
    cfg = DCTCodecConfig(resolution=(16 * 182, 16 * 181))
    assert cfg.vocab.dtype == np.int32
    rng = np.random.default_rng(3)
    dense = np.zeros((1, 384, *cfg.grid), dtype=np.int16)
    flat = dense.reshape(-1)
    flat[rng.choice(flat.size, 5000, replace=False)] = rng.integers(-1100, 1100, 5000)
    ours, ref = (sparsify(dense, cfg, channels_last=False, backend=b) for b in ("kernel", "numpy"))
    assert np.array_equal(ours.sequences[0], ref.sequences[0]) and ours.clipped.tolist() == ref.clipped.tolist()
    assert ours.sequences[0][:, 1].max() > 32767


def test_token_decode_semantics_match_numpy(photos: np.ndarray) -> None:
    """Partial, padded, int64 and duplicate-position sequences; bad tokens give numpy's error message."""
    cfg = DCTCodecConfig(resolution=64)
    seqs = encode(photos[:3, :64, :64], cfg)
    dup = np.concatenate([seqs[1][:30], seqs[1][5:6] + np.array([0, 0, 7], dtype=np.int16), seqs[1][30:]])
    cases = {
        "padded": pad_sequences(seqs, cfg.vocab),
        "partial": [s[: len(s) // 3] for s in seqs],
        "int64": [s.astype(np.int64) for s in seqs],
        "duplicate": [dup],
        "empty": [seqs[0][-1:]],
    }
    for name, case in cases.items():
        ours = sequences_to_rgb(case, cfg, backend="kernel")
        dense = triples_to_dct_image(case, cfg)
        assert np.array_equal(ours, dct_image_to_rgb(dense, cfg.quality, backend="kernel")), name
    bad = seqs[2].copy()
    bad[4, 2] = cfg.vocab.num_values  # the value EOS inside the body
    for backend in ("kernel", "numpy"):
        with pytest.raises(SequenceError, match=r"sequence 1: row 4: value token 2048 is outside"):
            sequences_to_rgb([seqs[0], bad], cfg, backend=backend)
    unknown = seqs[2].copy()
    unknown[5, 0] = 999  # neither EOS (384) nor PAD (385): an error, not the silent end of the sequence
    for backend in ("kernel", "numpy"):
        with pytest.raises(SequenceError, match=r"sequence 0: row 5: channel token 999 is outside"):
            sequences_to_rgb([unknown], cfg, backend=backend)
    assert sequences_to_rgb([], cfg, backend="kernel").shape == (0, 64, 64, 3)


def test_fallback_warns_once_and_kernel_request_fails_clearly(
    photos: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source tree without the built extension: "auto" runs numpy with one RuntimeWarning; "kernel" refuses."""
    cfg = DCTCodecConfig(resolution=64)
    images = photos[:2, :64, :64]
    want = encode_with_stats(images, cfg)
    monkeypatch.setattr(dct_transform, "_dct_kernel", None)
    monkeypatch.setattr(dct_transform, "_warned_numpy_fallback", False)
    with pytest.warns(RuntimeWarning, match="not built"):
        got = encode_with_stats(images, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels = decode(got.sequences, cfg)  # no second warning
    assert pixels.shape == (2, 64, 64, 3)
    assert sum(len(s) for s in got.sequences) == pytest.approx(sum(len(s) for s in want.sequences), abs=2)
    with pytest.raises(RuntimeError, match=r"pip install -e"):
        rgb_to_dct_image(images, 75, backend="kernel")
    with pytest.raises(ValueError, match="backend"):
        rgb_to_dct_image(images, 75, backend="cuda")  # type: ignore[arg-type]


def test_kernel_checks_buffer_sizes() -> None:
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    out = np.empty((2, 384, 2, 2), dtype=np.int16)
    counts = np.empty(2, dtype=np.int64)
    kernel().encode_dense(images, kernel_tables(75), out, counts, 2, 32, 32)
    # black: Y - 128 = -128 everywhere, so only the four luma DCs of each of the 4 macroblocks: -128 * 8 / 8
    assert counts.tolist() == [16, 16] and (out[:, :4] == -128).all() and not out[:, 4:].any()
    with pytest.raises(ValueError, match="out has"):
        kernel().encode_dense(images, kernel_tables(75), out[:1], counts, 2, 32, 32)
    with pytest.raises(ValueError, match="geometry"):
        kernel().encode_dense(images, kernel_tables(75), out, counts, 2, 30, 32)


def test_a_copy_of_the_sources_without_the_build_uses_the_installed_kernel(tmp_path) -> None:
    """A Ray job runs a copy of the project's tracked files (no build products) ahead of the node's installed dgm:
    its codec must find the installed build, not fall back to numpy (2-3x slower) with only a warning."""
    import os
    import shutil
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copytree(os.path.join(root, "data_pipeline"), tmp_path / "data_pipeline",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    probe = ("import warnings; warnings.simplefilter('error'); "
             "from data_pipeline.codecs import dct_transform as t; "
             "print(t.__file__); print(t._dct_kernel.__file__); print(t.use_kernel('auto'))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    module, kernel_file, used = out.stdout.split()
    assert module.startswith(str(tmp_path))  # the copy's sources run...
    assert kernel_file.startswith(os.path.join(root, "data_pipeline", "codecs")) and used == "True"  # ...with the build
    # A build of older sources in the copy (here a stand-in reporting interface 1) reads the tables of these
    # sources wrongly without an error: it is passed over, and named.
    (tmp_path / "data_pipeline" / "codecs" / "_dct_kernel.py").write_text("INTERFACE = 1\n")
    probe_stale = probe + "; from data_pipeline.codecs import kernel_loader; print(kernel_loader.stale)"
    out = subprocess.run([sys.executable, "-c", probe_stale], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[1].startswith(os.path.join(root, "data_pipeline", "codecs")) and "_dct_kernel.py" in lines[3]

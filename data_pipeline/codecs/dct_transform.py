"""Pixels <-> quantised DCT image, vectorised over a batch.

Encoder: RGB -> YCbCr with the JFIF matrix of the spec in libjpeg's 16-bit fixed point, rounded to 8 bits as
libjpeg does (bit for bit; see RGB_TO_YCBCR_FIXED) ->
4:2:0 chroma by the exact 2x2 mean -> minus 128 -> orthonormal 8x8 DCT-II -> divide by the IJG table -> round to
nearest -> int16.

Chroma downsampling, against libjpeg: its h2v2_downsample averages the same 2x2 box of 8-bit samples but rounds
each average to an integer with an alternating +1/+2 bias (an ordered dither); we keep the exact quarter-integer
mean up to the quantiser. libjpeg's default encoder also uses a 13-bit integer DCT. Together these make about
0.2% (quality 75) to 2% (quality 95) of the coefficients differ by one step from a file libjpeg wrote, never more
(tests/test_dct_codec.py measures it; flat and saturated colours match exactly). The quantiser rounds with
np.rint: exact .5 ties, which a float pipeline only meets by accident, go to even (libjpeg rounds them away from
zero).

Decoder: multiply by the table -> inverse DCT -> + 128, clamp the planes to 0..255 (libjpeg's range limit) ->
upsample chroma ("fancy": libjpeg's default triangle filter, 3/4 nearest + 1/4 next sample along each axis with
edge replication; or "nearest": pixel replication) -> JFIF YCbCr -> RGB -> clip -> round to uint8.

Speed (numpy path): every stage is a whole-chunk array operation; a chunk is as many whole images as fit ~64k
pixels, so the work buffers stay in cache and are reused. The colour conversion is elementwise (see below) and each
2-D DCT one GEMM of all 8x8 blocks of the chunk against a 64x64 basis whose rows are already in zigzag order, with
the quantisation (and for chroma the 2x2 mean) folded in. The GEMMs are small, so BLAS runs single-threaded inside
the codec (threadpoolctl): on a shared machine OpenBLAS's spinning worker threads made the same call up to 10x
slower, and data loading gets its parallelism from worker processes anyway.

Float caveat: BLAS blocks a GEMM by its width, so the same image encoded in a chunk of another size can round a
near-tie the other way: about 1 coefficient in 10^5 differs by one step between batch compositions (and between
machines with other BLAS kernels). Sequences are exact functions of the DCT image, never of the batch.

Compiled kernel: ``_dct_kernel.c`` and ``dct_kernel_*.c`` (built by ``pip install -e .``, see setup.py) do a
macroblock's whole path in registers, 2-3x faster at 256x256 (bench/README.md), and are what ``backend="auto"``
uses; this numpy code stays as the reference they are tested against (tests/test_dct_kernel.py) and as the
fallback where the extension is not built (a source tree used without install), announced once by a
RuntimeWarning. Both convert colour in exact float32 integer arithmetic, and both sum the rational DCT rows
(DC, (0,4), (4,0), (4,4), basis +-1/8) exactly, so their 8-bit and quantiser roundings, where exact .5 ties are
common, agree bit for bit; the other coefficients are float32 sums in other orders, so a near-tie can differ by one
step (0 to 4e-5 of them, like the batch-composition caveat above). The kernel's results do not depend on the
batch.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any, Literal, NamedTuple

import numpy as np

from data_pipeline.codecs import kernel_loader
from data_pipeline.codecs.dct_tables import (
    BLOCK,
    MACROBLOCK,
    NUM_CHANNELS,
    NUM_FREQS,
    ZIGZAG,
    check_quality,
    quant_tables,
)
from data_pipeline.codecs.kernel_loader import load_kernel

# None in a source tree used without `pip install -e .` (and no installed dgm's build): the numpy path serves, with
# a warning. A Ray job's copy of the sources finds the node's installed build (kernel_loader).
_dct_kernel = load_kernel()

Upsampling = Literal["fancy", "nearest"]
Backend = Literal["auto", "kernel", "numpy"]
CHUNK_PIXELS = 1 << 16
"""Pixels per work chunk (whole images, at least one): small enough for the buffers to stay in cache."""

RGB_TO_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
"""JFIF: [Y, Cb - 128, Cr - 128] = RGB_TO_YCBCR @ [R, G, B]."""
RGB_TO_YCBCR_FIXED = np.array([[19595, 38470, 7471], [-11059, -21709, 32768], [32768, -27439, -5329]])
YCBCR_ROUNDING = np.array([32768, 32767, 32767])
"""libjpeg's 8-bit conversion (jccolor.c): [Y, Cb - 128, Cr - 128] = floor((FIXED @ [R, G, B] + ROUNDING) / 2^16),
RGB_TO_YCBCR in 16-bit fixed point. Luma ties round up and chroma ties down, so pure blue's Cb is 255, never 256:
the encoder's YCbCr is libjpeg's bit for bit (every partial sum is an integer below 2^24, exact in float32)."""
YCBCR_TO_RGB = np.array([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]])
"""JFIF inverse: [R, G, B] = YCBCR_TO_RGB @ [Y, Cb - 128, Cr - 128]."""


@lru_cache(maxsize=1)
def _blas_controller() -> Any:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # a plain numpy install still works, only with BLAS's own threading
        return None
    return ThreadpoolController()


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Limit BLAS to one thread for the block of many small GEMMs (process-wide while it runs)."""
    controller = _blas_controller()
    if controller is None:
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


def dct_matrix() -> np.ndarray:
    """Orthonormal 1-D DCT-II matrix D[u, x] (float64): coefficients = D @ samples, samples = D.T @ coefficients."""
    u = np.arange(BLOCK)[:, None]
    x = np.arange(BLOCK)[None, :]
    d = np.cos((2 * x + 1) * u * np.pi / (2 * BLOCK)) * np.sqrt(2.0 / BLOCK)
    d[0] = np.sqrt(1.0 / BLOCK)
    return d


def dct2_blocks(blocks: np.ndarray) -> np.ndarray:
    """Reference 2-D DCT of [..., 8, 8] blocks in natural order (row = vertical frequency), in float64."""
    d = dct_matrix()
    return np.einsum("uy,...yx,vx->...uv", d, np.asarray(blocks, dtype=np.float64), d)


def idct2_blocks(coefs: np.ndarray) -> np.ndarray:
    """Inverse of ``dct2_blocks``."""
    d = dct_matrix()
    return np.einsum("uy,...uv,vx->...yx", d, np.asarray(coefs, dtype=np.float64), d)


def _zigzag_dct() -> np.ndarray:
    """T[z, p]: coefficient z (zigzag) of a block = T @ block flattened row-major (p = 8y + x)."""
    return np.kron(dct_matrix(), dct_matrix())[ZIGZAG]


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    a.setflags(write=False)
    return a


# The chroma GEMM sees a macroblock's channel as 128 horizontal pair sums in (dy, dx, yy, a, xx) order: pixel
# rows y = 2 yy + a and columns x = 2 xx + b of luma block (dy, dx), summed over b. Chroma sample
# (4 dy + yy, 4 dx + xx) is the mean of its two a-rows, so the GEMM itself adds the vertical pairs.
_CHROMA_PAIR_INDEX = np.array(
    [
        (4 * dy + yy) * BLOCK + 4 * dx + xx
        for dy in (0, 1)
        for dx in (0, 1)
        for yy in range(4)
        for _a in range(2)
        for xx in range(4)
    ]
)


RATIONAL_ZIGZAG = np.argsort(ZIGZAG)[[0, 4, 32, 36]]
"""Zigzag index of the frequencies (u, v) with u, v in {0, 4}: their basis is +-1/8, so their DCT of integer
samples is a sum of integers over 8, and exact .5 ties after the quantiser are common (the DC at quality 75:
one block in 64)."""


class EncodeBases(NamedTuple):
    """What the numpy encoder's GEMMs use. The RATIONAL_ZIGZAG rows are +-1 patterns instead: the GEMM then sums
    integers exactly (in any order), and one float32 division by 8 * table (32 * table for chroma, whose GEMM input
    is a 2x2 sum) rounds them as the kernel does, exact ties included."""

    luma: np.ndarray  # [64z, 64px], table folded in
    chroma: np.ndarray  # [64z, 128 pair sums], mean and table folded in
    luma_div: np.ndarray  # [4] float32, for the RATIONAL_ZIGZAG rows
    chroma_div: np.ndarray


@lru_cache(maxsize=128)
def _encode_bases(quality: int) -> EncodeBases:
    luma, chroma = (t.reshape(-1)[ZIGZAG].astype(np.float64)[:, None] for t in quant_tables(quality))
    t = _zigzag_dct()
    luma_basis, chroma_basis = t / luma, t[:, _CHROMA_PAIR_INDEX] * 0.25 / chroma
    exact = np.rint(8.0 * t[RATIONAL_ZIGZAG])
    luma_basis[RATIONAL_ZIGZAG], chroma_basis[RATIONAL_ZIGZAG] = exact, exact[:, _CHROMA_PAIR_INDEX]
    return EncodeBases(
        _frozen(luma_basis),
        _frozen(chroma_basis),
        _frozen(8.0 * luma[RATIONAL_ZIGZAG, 0]),
        _frozen(32.0 * chroma[RATIONAL_ZIGZAG, 0]),
    )


@lru_cache(maxsize=128)
def _decode_bases(quality: int) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """Luma and chroma [64z, 64px] inverse bases (table folded in) and the luma DC offset that adds the 128."""
    luma, chroma = (t.reshape(-1)[ZIGZAG].astype(np.float64)[:, None] for t in quant_tables(quality))
    t = _zigzag_dct()
    return _frozen(t * luma), _frozen(t * chroma), np.float32(128.0 * BLOCK / luma[0, 0])


def kernel() -> Any:
    """The compiled kernel module, or an error saying how to build it."""
    if _dct_kernel is None:
        raise RuntimeError(
            f"the sparse DCT codec's compiled kernel (data_pipeline/codecs/_dct_kernel.c) is {_missing()}: "
            'run `pip install -e ".[test]"` (or `make setup`) in the project root'
        )
    return _dct_kernel


def _missing() -> str:
    """Why there is no kernel: none built, or only builds of older sources (which would read the tables wrongly)."""
    return f"built from older sources ({', '.join(kernel_loader.stale)})" if kernel_loader.stale else "not built"


_warned_numpy_fallback = False


def use_kernel(backend: Backend) -> bool:
    """Whether a call runs the compiled kernel: "auto" uses it when built and otherwise warns once and runs the
    numpy reference; "kernel" requires it; "numpy" is the reference path."""
    global _warned_numpy_fallback
    if backend == "numpy":
        return False
    if backend == "kernel":
        kernel()
        return True
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'kernel' or 'numpy', got {backend!r}")
    if _dct_kernel is not None:
        return True
    if not _warned_numpy_fallback:
        _warned_numpy_fallback = True
        warnings.warn(
            f"data_pipeline.codecs._dct_kernel is {_missing()} (run `pip install -e .`): the sparse DCT codec "
            "runs its numpy reference path, about 2-3x slower at 256x256",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


@lru_cache(maxsize=128)
def kernel_tables(quality: int) -> np.ndarray:
    """The kernel's constants (the Tables struct of _dct_kernel.c), float32 [205]: the DCT basis scaled by sqrt(8)
    (rows 0 and 4 become exactly +-1, so the DC and the other rational coefficients of integer samples are exact
    sums), 8 * luma and 32 * chroma tables transposed, the kernel's block order (the scale and, for chroma, the 2x2
    sum's 1/4 folded into one division), and the two colour matrices as float32, the numbers the numpy path uses."""
    luma, chroma = quant_tables(quality)
    basis = dct_matrix() * np.sqrt(BLOCK)
    basis[[0, 4]] = np.rint(basis[[0, 4]])  # +-1 up to float64 rounding: make it exact
    parts = [
        basis.reshape(-1),
        8.0 * luma.T.reshape(-1),
        32.0 * chroma.T.reshape(-1),
        RGB_TO_YCBCR_FIXED.reshape(-1),
        YCBCR_TO_RGB[[0, 1, 1, 2], [2, 1, 2, 1]],
    ]
    return _frozen(np.concatenate(parts))


def encode_dense_kernel(images: np.ndarray, quality: int) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's encoder on a checked batch: DCT image int16 [B, 384, H/16, W/16] and each image's non-zero
    count (which sparsify needs to size its output)."""
    bsz, height, width, _ = images.shape
    out = np.empty((bsz, NUM_CHANNELS, height // MACROBLOCK, width // MACROBLOCK), dtype=np.int16)
    counts = np.empty(bsz, dtype=np.int64)
    tables = kernel_tables(check_quality(quality))
    kernel().encode_dense(np.ascontiguousarray(images), tables, out, counts, bsz, height, width)
    return out, counts


def check_rgb_batch(images: np.ndarray) -> np.ndarray:
    """The encoder's strict input contract: uint8 [B, H, W, 3] with H, W positive multiples of 16."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be a batch [B, H, W, 3], got shape {images.shape}")
    _, h, w, _ = images.shape
    if h % MACROBLOCK or w % MACROBLOCK or h == 0 or w == 0:
        raise ValueError(f"image size {h}x{w} (HxW) is not a positive multiple of {MACROBLOCK} in both sides")
    return images


def check_dct_image(dct: np.ndarray, channels_last: bool = True) -> np.ndarray:
    """A DCT image is an integer array [B, h, w, 384] (or [B, 384, h, w] with channels_last=False)."""
    dct = np.asarray(dct)
    axis = -1 if channels_last else 1
    if dct.ndim != 4 or dct.shape[axis] != NUM_CHANNELS or not np.issubdtype(dct.dtype, np.integer):
        want = f"[B, h, w, {NUM_CHANNELS}]" if channels_last else f"[B, {NUM_CHANNELS}, h, w]"
        raise ValueError(f"DCT image must be an integer array {want}, got {dct.dtype} {dct.shape}")
    return dct


def _chunks(total: int, size: int, make_buffers: Callable[[int], dict[str, np.ndarray]]
            ) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """(start, count, buffers) per chunk of a batch; buffers are reused, and a short last chunk gets exactly
    fitting ones, so every reshape of them stays a view."""
    buf = make_buffers(size)
    for start in range(0, total, size):
        k = min(size, total - start)
        if k != size:
            buf = make_buffers(k)
        yield start, k, buf


def _encode_buffers(k: int, h: int, w: int) -> dict[str, np.ndarray]:
    pixels = k * h * w * MACROBLOCK * MACROBLOCK
    return {
        # Pixel order (colour, image, h, w, dy, dx, y, x): each 8x8 luma block is 64 contiguous values and each
        # macroblock 256, so one GEMM per chunk covers every block of every image (not one small GEMM per image).
        "rgb": np.empty((3, k, h, w, 2, 2, BLOCK, BLOCK), dtype=np.float32),
        "ycc": np.empty((3, pixels), dtype=np.float32),
        "pairs": np.empty((2, pixels // 2), dtype=np.float32),
        "luma": np.empty((NUM_FREQS, k, h * w, 4), dtype=np.float32),  # [zigzag, image, position, slot]
        "chroma": np.empty((2, NUM_FREQS, k, h * w), dtype=np.float32),  # [Cb/Cr, zigzag, image, position]
    }


def rgb_to_dct_image(
    images: np.ndarray, quality: int, *, channels_last: bool = True, backend: Backend = "auto"
) -> np.ndarray:
    """uint8 RGB [B, H, W, 3] -> quantised DCT image int16 [B, H/16, W/16, 384] (or [B, 384, H/16, W/16]).

    Values are not clipped: with tables >= 1 they stay within +-1024 + 1.
    """
    images = check_rgb_batch(images)
    bsz, height, width, _ = images.shape
    h, w = height // MACROBLOCK, width // MACROBLOCK
    hw = h * w
    if use_kernel(backend):
        out = encode_dense_kernel(images, quality)[0]
        return np.ascontiguousarray(out.transpose(0, 2, 3, 1)) if channels_last else out
    out = np.empty((bsz, NUM_FREQS, 6, hw), dtype=np.int16)
    bases = _encode_bases(quality)
    colour, rounding = RGB_TO_YCBCR_FIXED.astype(np.float32), YCBCR_ROUNDING.astype(np.float32)
    n = max(1, CHUNK_PIXELS // (height * width))
    with single_threaded_blas():
        for start, k, buf in _chunks(bsz, n, lambda size: _encode_buffers(size, h, w)):
            rgb, ycc, pairs, luma, chroma = buf["rgb"], buf["ycc"], buf["pairs"], buf["luma"], buf["chroma"]
            src = images[start : start + k].reshape(k, h, 2, BLOCK, w, 2, BLOCK, 3)
            np.copyto(rgb, src.transpose(7, 0, 1, 4, 2, 5, 3, 6), casting="unsafe")
            # libjpeg's fixed-point conversion (RGB_TO_YCBCR_FIXED): integer sums, exact in float32.
            planes, product = rgb.reshape(3, -1), pairs.reshape(-1)
            for ch in range(3):
                np.multiply(planes[0], colour[ch, 0], out=ycc[ch])
                for src_ch in (1, 2):
                    np.multiply(planes[src_ch], colour[ch, src_ch], out=product)
                    ycc[ch] += product
                ycc[ch] += rounding[ch]
            ycc *= np.float32(1.0 / 65536)
            np.floor(ycc, out=ycc)  # 8-bit YCbCr, as libjpeg stores it
            np.matmul(bases.luma, ycc[0].reshape(-1, NUM_FREQS).T, out=luma.reshape(NUM_FREQS, -1))
            # Chroma: sum horizontal pixel pairs (adjacent in memory); the GEMM sums the vertical ones.
            np.add(ycc[1:, 0::2], ycc[1:, 1::2], out=pairs)
            for ch in (0, 1):
                np.matmul(
                    bases.chroma,
                    pairs[ch].reshape(-1, 2 * NUM_FREQS).T,
                    out=chroma[ch].reshape(NUM_FREQS, -1),
                )
            luma[0] -= np.float32(128 * NUM_FREQS)  # the DC row sums Y; the transform wants Y - 128
            for i, z in enumerate(RATIONAL_ZIGZAG):
                luma[z] /= bases.luma_div[i]
                chroma[:, z] /= bases.chroma_div[i]
            np.rint(luma, out=luma)
            np.rint(chroma, out=chroma)
            dst = out[start : start + k]
            np.copyto(dst[:, :, :4], luma.transpose(1, 0, 3, 2), casting="unsafe")
            np.copyto(dst[:, :, 4:], chroma.transpose(2, 1, 0, 3), casting="unsafe")
    out = out.reshape(bsz, NUM_CHANNELS, h, w)
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1)) if channels_last else out


def _fancy_axis(a: np.ndarray, axis: int, out: np.ndarray) -> None:
    """Double `axis` with libjpeg's triangle filter, edges replicated:
    out[2i] = a[i] - (a[i] - a[i-1]) / 4, out[2i+1] = a[i] + (a[i+1] - a[i]) / 4."""
    n = a.shape[axis]

    def sl(arr: np.ndarray, s: slice) -> np.ndarray:
        idx = [slice(None)] * arr.ndim
        idx[axis] = s
        return arr[tuple(idx)]

    even, odd = sl(out, slice(0, None, 2)), sl(out, slice(1, None, 2))
    d = np.diff(a, axis=axis)
    d *= np.float32(0.25)
    np.subtract(sl(a, slice(1, n)), d, out=sl(even, slice(1, n)))
    np.add(sl(a, slice(0, n - 1)), d, out=sl(odd, slice(0, n - 1)))
    np.copyto(sl(even, slice(0, 1)), sl(a, slice(0, 1)))
    np.copyto(sl(odd, slice(n - 1, n)), sl(a, slice(n - 1, n)))


def upsample_420(c: np.ndarray, mode: Upsampling = "fancy", out: np.ndarray | None = None) -> np.ndarray:
    """[N, h, w] float32 planes -> [N, 2h, 2w], by libjpeg's fancy (triangle) filter or by pixel replication."""
    n, h, w = c.shape
    if out is None:
        out = np.empty((n, 2 * h, 2 * w), dtype=np.float32)
    if mode == "fancy":
        wide = np.empty((n, h, 2 * w), dtype=np.float32)
        _fancy_axis(c, 2, wide)
        _fancy_axis(wide, 1, out)
    elif mode == "nearest":
        wide = np.empty((n, h, 2 * w), dtype=np.float32)
        wide[:, :, 0::2] = c
        wide[:, :, 1::2] = c
        out[:, 0::2] = wide
        out[:, 1::2] = wide
    else:
        raise ValueError(f"upsampling must be 'fancy' or 'nearest', got {mode!r}")
    return out


def _decode_buffers(k: int, h: int, w: int) -> dict[str, np.ndarray]:
    hw, height, width = h * w, h * MACROBLOCK, w * MACROBLOCK
    return {
        "coef": np.empty((k, NUM_FREQS, 6 * hw), dtype=np.float32),
        "luma": np.empty((k, 4 * hw, NUM_FREQS), dtype=np.float32),
        "chroma": np.empty((k, 2 * hw, NUM_FREQS), dtype=np.float32),
        "planes": np.empty((3, k, height, width), dtype=np.float32),
        "small": np.empty((2, k, height // 2, width // 2), dtype=np.float32),
        "rgb": np.empty((3, k * height * width), dtype=np.float32),
    }


def dct_image_to_rgb(
    dct: np.ndarray,
    quality: int,
    *,
    upsampling: Upsampling = "fancy",
    channels_last: bool = True,
    backend: Backend = "auto",
) -> np.ndarray:
    """Quantised DCT image [B, h, w, 384] (or [B, 384, h, w]) -> uint8 RGB [B, 16h, 16w, 3]."""
    if upsampling not in ("fancy", "nearest"):
        raise ValueError(f"upsampling must be 'fancy' or 'nearest', got {upsampling!r}")
    dct = check_dct_image(dct, channels_last)
    if channels_last:
        bsz, h, w, _ = dct.shape
        dct = dct.transpose(0, 3, 1, 2)
    else:
        bsz, _, h, w = dct.shape
    hw, height, width = h * w, h * MACROBLOCK, w * MACROBLOCK
    if use_kernel(backend):
        # int16 holds every value the quantiser makes; wider input is clipped to it, as sparsify does
        dense = dct if dct.dtype == np.int16 else np.clip(dct, -32768, 32767).astype(np.int16)
        out = np.empty((bsz, height, width, 3), dtype=np.uint8)
        kernel().decode_dense(
            np.ascontiguousarray(dense), kernel_tables(check_quality(quality)), out, bsz, height, width,
            upsampling == "fancy",
        )
        return out
    coefs = dct.reshape(bsz, NUM_FREQS, 6 * hw)
    luma_basis, chroma_basis, dc_offset = _decode_bases(quality)
    # Y carries +128.5 instead of +128: every RGB output then carries the +0.5 (the matrix's Y column is all
    # ones), so the final float -> uint8 cast, which truncates, rounds half up without a separate rounding pass.
    dc_offset = dc_offset * np.float32(128.5 / 128.0)
    colour = YCBCR_TO_RGB.astype(np.float32)
    n = max(1, CHUNK_PIXELS // (height * width))
    out = np.empty((bsz, height, width, 3), dtype=np.uint8)
    with single_threaded_blas():
        for start, k, buf in _chunks(bsz, n, lambda size: _decode_buffers(size, h, w)):
            c, planes, small, rgb = buf["coef"], buf["planes"], buf["small"], buf["rgb"]
            np.copyto(c, coefs[start : start + k], casting="unsafe")
            c[:, 0, : 4 * hw] += dc_offset
            np.matmul(c[:, :, : 4 * hw].transpose(0, 2, 1), luma_basis, out=buf["luma"])
            np.matmul(c[:, :, 4 * hw :].transpose(0, 2, 1), chroma_basis, out=buf["chroma"])
            # Blocks back to raster order, clamped to libjpeg's sample range on the way.
            y = buf["luma"].reshape(k, 2, 2, h, w, BLOCK, BLOCK).transpose(0, 3, 1, 5, 4, 2, 6)
            np.clip(y, 0.5, 255.5, out=planes[0].reshape(k, h, 2, BLOCK, w, 2, BLOCK))
            cc = buf["chroma"].reshape(k, 2, h, w, BLOCK, BLOCK).transpose(1, 0, 2, 4, 3, 5)
            np.clip(cc, -128.0, 127.0, out=small.reshape(2, k, h, BLOCK, w, BLOCK))
            full = planes[1:].reshape(2 * k, height, width)
            upsample_420(small.reshape(2 * k, height // 2, width // 2), upsampling, out=full)
            np.matmul(colour, planes.reshape(3, -1), out=rgb)  # [3, 3] @ [3, P]: the fast GEMM orientation
            np.clip(rgb, 0.0, 255.5, out=rgb)
            dst = out[start : start + k].reshape(-1)
            for ch in range(3):  # 1-D strided casts interleave the planes far faster than one 2-D copy
                np.copyto(dst[ch::3], rgb[ch], casting="unsafe")
    return out

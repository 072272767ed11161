"""The sparse DCT codec against the spec's exact checks, against Pillow/libjpeg, and on bad input."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import skimage.data
import sklearn.datasets
from PIL import Image

from data_pipeline.codecs.dct_codec import DCTCodec, decode, encode, encode_jpeg_files, encode_with_stats
from data_pipeline.codecs.dct_config import DCTCodecConfig, Vocab
from data_pipeline.codecs.dct_images import as_rgb_batch
from data_pipeline.codecs.dct_sequence import (
    SequenceError,
    pad_sequences,
    sequence_from_bytes,
    sequence_to_bytes,
    sparsify,
    triples_to_dct_image,
    validate_sequence,
)
from data_pipeline.codecs.dct_tables import CHANNEL_SLOT, CHANNEL_ZIGZAG, ZIGZAG, channel_quant, quant_tables
from data_pipeline.codecs.dct_transform import (
    RGB_TO_YCBCR_FIXED,
    YCBCR_ROUNDING,
    dct2_blocks,
    dct_image_to_rgb,
    idct2_blocks,
    rgb_to_dct_image,
    upsample_420,
)
from data_pipeline.codecs.image import SampleDecodeError
from data_pipeline.codecs.jpeg_coefficients import JPEGReadError, read_jpeg_dct

CHINA = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", "china.jpg")


def _crop16(img: np.ndarray) -> np.ndarray:
    """At most 256x384 (keeps the suite fast), multiples of 16."""
    h, w = min(256, img.shape[0] // 16 * 16), min(384, img.shape[1] // 16 * 16)
    return np.ascontiguousarray(img[:h, :w])


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """Real photos cut to multiples of 16: three from scikit-image, sklearn's china.jpg (decoded), 256x384 or less."""
    out = {name: _crop16(getattr(skimage.data, name)()) for name in ("astronaut", "coffee", "chelsea")}
    out["china"] = _crop16(sklearn.datasets.load_sample_image("china.jpg"))
    return out


@pytest.fixture(scope="module")
def small_batch(photos: dict[str, np.ndarray]) -> np.ndarray:
    src = photos["astronaut"]
    return np.stack([src[i : i + 64, 2 * i : 2 * i + 64] for i in range(0, 160, 5)])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def _pillow_jpeg(img: np.ndarray, quality: int, path: Path | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality, subsampling=2)
    if path is not None:
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _reference_dct_image(img: np.ndarray, quality: int) -> np.ndarray:
    """The spec's steps written plainly in float64, one image: the fast batched path must agree with it."""
    h, w = img.shape[0] // 16, img.shape[1] // 16
    ycc = np.floor((img.astype(np.float64) @ RGB_TO_YCBCR_FIXED.T + YCBCR_ROUNDING) / 65536)  # libjpeg's
    ycc[..., 0] -= 128
    luma = ycc[..., 0].reshape(2 * h, 8, 2 * w, 8).transpose(0, 2, 1, 3)
    chroma = ycc[..., 1:].reshape(8 * h, 2, 8 * w, 2, 2).mean(axis=(1, 3))
    chroma = chroma.reshape(h, 8, w, 8, 2).transpose(4, 0, 2, 1, 3)
    lt, ct = quant_tables(quality)
    yq = np.rint(dct2_blocks(luma) / lt).reshape(h, 2, w, 2, 64).transpose(0, 2, 1, 3, 4).reshape(h, w, 4, 64)
    cq = np.rint(dct2_blocks(chroma) / ct).reshape(2, h, w, 64).transpose(1, 2, 0, 3)
    stacked = np.concatenate([yq[..., ZIGZAG], cq[..., ZIGZAG]], axis=2)  # [h, w, slot, zigzag]
    return stacked.transpose(0, 1, 3, 2).reshape(h, w, 384).astype(np.int64)


# ---------------------------------------------------------------- tables, transform


def test_quant_tables_equal_pillow_for_every_quality() -> None:
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for q in range(10, 96):
        with Image.open(io.BytesIO(_pillow_jpeg(img, q))) as im:
            tables = im.quantization
        luma, chroma = quant_tables(q)
        # Pillow >= 9 lists the tables in natural (row-major) order, not in the zigzag order of the DQT segment.
        assert list(luma.reshape(-1)) == list(tables[0]), q
        assert list(chroma.reshape(-1)) == list(tables[1]), q
    assert (
        quant_tables(50)[0][0, 0] == 16
        and quant_tables(100)[0].max() == 1
        and quant_tables(1)[1].min() == 255
    )
    for bad in (0, 101, 7.5, True):
        with pytest.raises(ValueError, match="quality"):
            quant_tables(bad)


def test_zigzag_and_channel_numbering() -> None:
    assert ZIGZAG[:10].tolist() == [0, 1, 8, 16, 9, 2, 3, 10, 17, 24] and sorted(ZIGZAG) == list(range(64))
    assert ZIGZAG[-3:].tolist() == [55, 62, 63]
    assert CHANNEL_ZIGZAG[:7].tolist() == [0, 0, 0, 0, 0, 0, 1] and CHANNEL_SLOT[:7].tolist() == [
        0,
        1,
        2,
        3,
        4,
        5,
        0,
    ]
    q = channel_quant(75)
    luma, chroma = quant_tables(75)
    assert q[0] == luma[0, 0] and q[4] == chroma[0, 0] and q[6 * 2 + 1] == luma.reshape(-1)[ZIGZAG[2]]


def test_dct_idct_float64_round_trip() -> None:
    x = np.random.default_rng(1).uniform(-128, 128, (100, 8, 8))
    assert np.abs(idct2_blocks(dct2_blocks(x)) - x).max() < 1e-9
    flat = dct2_blocks(np.full((8, 8), 10.0))
    assert flat[0, 0] == pytest.approx(80.0) and np.abs(flat.reshape(-1)[1:]).max() < 1e-12
    assert np.sum(x**2) == pytest.approx(np.sum(dct2_blocks(x) ** 2))  # orthonormal: energy is kept


def test_fast_encoder_agrees_with_plain_float64_reference(photos: dict[str, np.ndarray]) -> None:
    for name in ("astronaut", "china"):
        img = photos[name][:256, :320]
        for q in (10, 50, 95):
            fast = rgb_to_dct_image(img[None], q)[0].astype(np.int64)
            ref = _reference_dct_image(img, q)
            diff = np.abs(fast - ref)
            # float32 vs float64 only break exact .5 ties (8-bit YCbCr rounding) differently
            assert diff.max() <= 1 and (diff > 0).mean() < 2e-3, (name, q, (diff > 0).mean())


def test_chroma_upsampling() -> None:
    c = np.random.default_rng(3).uniform(-100, 100, (2, 5, 7)).astype(np.float32)
    near = upsample_420(c, "nearest")
    assert np.array_equal(near, c.repeat(2, axis=1).repeat(2, axis=2))
    # libjpeg's h2v2 fancy upsampling: 3/4 of the nearest sample + 1/4 of the next one, per axis, edges replicated
    p = np.pad(c.astype(np.float64), ((0, 0), (1, 1), (1, 1)), mode="edge")
    rows = np.stack([0.75 * p[:, 1:-1] + 0.25 * p[:, :-2], 0.75 * p[:, 1:-1] + 0.25 * p[:, 2:]], axis=2)
    rows = rows.reshape(2, 10, 9)
    want = np.stack(
        [0.75 * rows[:, :, 1:-1] + 0.25 * rows[:, :, :-2], 0.75 * rows[:, :, 1:-1] + 0.25 * rows[:, :, 2:]], 3
    )
    assert np.abs(upsample_420(c, "fancy") - want.reshape(2, 10, 14)).max() < 1e-4
    with pytest.raises(ValueError, match="upsampling"):
        upsample_420(c, "bicubic")  # type: ignore[arg-type]


def test_batch_layouts_and_chunking_agree(small_batch: np.ndarray) -> None:
    dct = rgb_to_dct_image(small_batch, 75)
    assert dct.shape == (len(small_batch), 4, 4, 384) and dct.dtype == np.int16
    one_by_one = np.concatenate([rgb_to_dct_image(im[None], 75) for im in small_batch])
    # BLAS blocks a GEMM by its width, so a chunk of 16 images and a single image can round a near-tie apart
    diff = np.abs(dct.astype(np.int64) - one_by_one)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-4
    chw = rgb_to_dct_image(small_batch, 75, channels_last=False)
    assert np.array_equal(chw.transpose(0, 2, 3, 1), dct)
    rgb = dct_image_to_rgb(dct, 75)
    assert np.array_equal(rgb, dct_image_to_rgb(chw, 75, channels_last=False))
    assert np.array_equal(rgb[:5], dct_image_to_rgb(dct[:5], 75))


# ---------------------------------------------------------------- sparse sequence


def test_triples_reproduce_the_quantised_dct_image_exactly(
    photos: dict[str, np.ndarray], small_batch: np.ndarray
) -> None:
    for q in (10, 75, 100):
        cfg = DCTCodecConfig(resolution=64, quality=q)
        dct = rgb_to_dct_image(small_batch, q)
        batch = sparsify(dct, cfg)
        assert batch.clipped.sum() == 0
        assert np.array_equal(triples_to_dct_image(batch.sequences, cfg), dct)
    img = photos["chelsea"][:256, :448]
    cfg = DCTCodecConfig(resolution=img.shape[:2], quality=90)
    dct = rgb_to_dct_image(img[None], 90)
    assert np.array_equal(triples_to_dct_image(encode(img[None], cfg), cfg), dct)
    # Arbitrary integer images within the value range, including the extremes.
    rng = np.random.default_rng(2)
    dense = (rng.integers(-1024, 1025, (3, 2, 3, 384)) * (rng.random((3, 2, 3, 384)) < 0.3)).astype(np.int16)
    dense[0, 0, 0, :2] = (-1024, 1024)
    cfg = DCTCodecConfig(resolution=(32, 48))
    assert np.array_equal(triples_to_dct_image(sparsify(dense, cfg).sequences, cfg), dense)


def test_ordering_invariants(photos: dict[str, np.ndarray], small_batch: np.ndarray) -> None:
    cfg = DCTCodecConfig(resolution=64)
    seqs = encode(small_batch, cfg)
    vocab = cfg.vocab
    for seq in seqs:
        body = seq[:-1].astype(np.int64)
        assert np.array_equal(seq[-1], vocab.eos) and (body[:, 0] < vocab.num_channels).all()
        dc, dp = np.diff(body[:, 0]), np.diff(body[:, 1])
        assert (dc >= 0).all() and (dp[dc == 0] > 0).all()
        assert body[0, 0] == 0  # the luma DC of the first block is practically never zero: coarse comes first
        validate_sequence(seq, vocab)
    lengths = [len(s) for s in seqs]
    assert min(lengths) > 50 and max(lengths) < cfg.max_sequence_length


def test_value_clipping_is_counted() -> None:
    cfg = DCTCodecConfig(resolution=16, value_range=100)
    dense = np.zeros((2, 1, 1, 384), dtype=np.int16)
    dense[0, 0, 0, [0, 5, 9]] = (-500, 101, 100)
    batch = sparsify(dense, cfg)
    assert batch.clipped.tolist() == [2, 0]
    back = triples_to_dct_image(batch.sequences, cfg)
    assert back[0, 0, 0, [0, 5, 9]].tolist() == [-100, 100, 100]
    assert len(batch.sequences[1]) == 1 and np.array_equal(batch.sequences[1][0], cfg.vocab.eos)


def test_vocab_tokens() -> None:
    vocab = DCTCodecConfig(resolution=(64, 128)).vocab
    assert vocab.sizes == (386, 32 + 2, 2048 + 2) and vocab.dtype == np.int16
    values = np.concatenate([np.arange(-1024, 0), np.arange(1, 1025)])
    tokens = vocab.value_to_token(values)
    assert tokens.tolist() == list(range(2048))
    assert np.array_equal(vocab.token_to_value(tokens), values)
    assert vocab.eos.tolist() == [384, 32, 2048] and vocab.pad.tolist() == [385, 33, 2049]
    assert Vocab(num_positions=40000, value_range=1024).dtype == np.int32


def test_partial_and_padded_sequences_decode(small_batch: np.ndarray) -> None:
    cfg = DCTCodecConfig(resolution=64)
    seqs = encode(small_batch[:4], cfg)
    padded = pad_sequences(seqs, cfg.vocab)
    assert padded.shape == (4, max(len(s) for s in seqs), 3)
    assert np.array_equal(decode(padded, cfg), decode(seqs, cfg))
    head = seqs[0][:40]  # a sampler half-way: no EOS yet
    partial = triples_to_dct_image([head], cfg)
    assert np.count_nonzero(partial) == 40
    with pytest.raises(SequenceError, match="does not fit"):
        pad_sequences(seqs, cfg.vocab, length=10)


# ---------------------------------------------------------------- against Pillow / libjpeg


@pytest.mark.parametrize("quality", [25, 50, 75, 90])
def test_decoded_pixels_as_good_as_pillow_jpeg(photos: dict[str, np.ndarray], quality: int) -> None:
    for name, img in photos.items():
        cfg = DCTCodecConfig(resolution=img.shape[:2], quality=quality)
        ours = decode(encode(img[None], cfg), cfg)[0]
        with Image.open(io.BytesIO(_pillow_jpeg(img, quality))) as im:
            pillow = np.asarray(im.convert("RGB"))
        p_ours, p_pillow = _psnr(ours, img), _psnr(pillow, img)
        assert abs(p_ours - p_pillow) < 0.5, (name, quality, p_ours, p_pillow)


@pytest.mark.parametrize("quality", [10, 50, 75, 90, 95])
def test_jpeglib_coefficients_match_our_encoder(
    photos: dict[str, np.ndarray], tmp_path: Path, quality: int
) -> None:
    """libjpeg's integer DCT and its 8-bit chroma averages flip a few roundings by one step, never more."""
    for name, img in photos.items():
        path = tmp_path / f"{name}.jpg"
        _pillow_jpeg(img, quality, path)
        cfg = DCTCodecConfig(resolution=img.shape[:2], quality=quality)
        from_file = read_jpeg_dct(path, cfg).astype(np.int64)
        ours = rgb_to_dct_image(img[None], quality)[0]
        diff = np.abs(from_file - ours)
        assert diff.max() <= 1, (name, quality)
        assert (diff == 0).mean() >= (0.99 if quality <= 90 else 0.98), (name, quality, (diff == 0).mean())
        with Image.open(path) as im:
            pillow = np.asarray(im.convert("RGB"))
        if quality <= 75:  # re-encoding libjpeg's own decode lands on (almost) the same coefficients
            again = np.abs(rgb_to_dct_image(pillow[None], quality)[0] - from_file)
            assert (again == 0).mean() >= 0.99 and (again > 1).mean() < 1e-3, (name, quality)
        # Our decoder on libjpeg's coefficients vs libjpeg's own decode of the file.
        ours_px = dct_image_to_rgb(from_file[None], quality)[0]
        assert _psnr(ours_px, pillow) > 45 and np.abs(ours_px.astype(int) - pillow).max() <= 4, (
            name,
            quality,
        )


@pytest.mark.parametrize("backend", ["kernel", "numpy"])
def test_saturated_and_flat_colours_convert_as_libjpeg_does(tmp_path: Path, backend: str) -> None:
    """Pure blue's Cb is 127.5 above 128: rounded to even it became 256, outside 8 bits, and .5 ties in flat tints
    (Cb = (B - R) / 2 when R = G) went the other way from libjpeg's: at quality 95-100 the JPEG-file path and the
    pixel path then disagreed by 4-8 steps on the same image. libjpeg's fixed-point conversion makes them equal."""
    colours = [(0, 0, 255), (255, 0, 0), (0, 255, 0), (255, 255, 255), (100, 100, 103), (90, 90, 89), (7, 7, 8)]
    img = np.concatenate([np.full((16, 16, 3), c, dtype=np.uint8) for c in colours], axis=1)
    for quality in (95, 100):
        path = tmp_path / f"flat{quality}.jpg"
        _pillow_jpeg(img, quality, path)
        from_file = read_jpeg_dct(path, DCTCodecConfig(resolution=img.shape[:2], quality=quality))
        ours = rgb_to_dct_image(img[None], quality, backend=backend)[0]
        assert np.array_equal(ours, from_file), (quality, np.abs(ours.astype(int) - from_file).max())


def test_jpeg_files_encode_to_sequences(photos: dict[str, np.ndarray], tmp_path: Path) -> None:
    img = photos["coffee"][:128, :192]
    cfg = DCTCodecConfig(resolution=img.shape[:2])
    _pillow_jpeg(img, 75, tmp_path / "baseline.jpg")
    Image.fromarray(img).save(tmp_path / "progressive.jpg", quality=75, subsampling=2, progressive=True)
    batch = encode_jpeg_files([tmp_path / "baseline.jpg", tmp_path / "progressive.jpg"], cfg)
    assert len(batch.sequences) == 2 and batch.clipped.tolist() == [0, 0]
    assert np.array_equal(batch.sequences[0], batch.sequences[1])  # same coefficients, other scan order
    validate_sequence(batch.sequences[0], cfg.vocab)
    assert _psnr(decode(batch.sequences, cfg)[0], img) > 30


def test_jpeg_grey_crop_requantize_and_fallback(photos: dict[str, np.ndarray], tmp_path: Path) -> None:
    grey = photos["astronaut"][:96, :128, 1]
    Image.fromarray(grey).save(tmp_path / "g.jpg", quality=75)
    cfg = DCTCodecConfig(resolution=(96, 128))
    dct = read_jpeg_dct(tmp_path / "g.jpg", cfg)
    assert not dct.reshape(6, 8, 64, 6)[..., 4:].any()
    ours = rgb_to_dct_image(as_rgb_batch([grey], cfg), 75)[0]
    assert (dct == ours).mean() > 0.99 and not ours.reshape(6, 8, 64, 6)[..., 4:].any()

    big = photos["chelsea"][:200, :250]  # not a multiple of 16: only whole macroblocks inside are taken
    _pillow_jpeg(big, 75, tmp_path / "big.jpg")
    crop = DCTCodecConfig(resolution=(160, 224), size_policy="crop")
    from_file = read_jpeg_dct(tmp_path / "big.jpg", crop)
    from_pixels = rgb_to_dct_image(as_rgb_batch([big], crop), 75)[0]
    assert (from_file == from_pixels).mean() > 0.99
    with pytest.raises(JPEGReadError, match=r"big\.jpg.*200x250"):
        read_jpeg_dct(tmp_path / "big.jpg", DCTCodecConfig(resolution=(160, 224)))

    img = photos["coffee"][:64, :64]
    _pillow_jpeg(img, 90, tmp_path / "q90.jpg")
    cfg = DCTCodecConfig(resolution=64, quality=50)
    with pytest.raises(JPEGReadError, match=r"q90\.jpg.*quality 50.*requantize"):
        read_jpeg_dct(tmp_path / "q90.jpg", cfg)
    requantized = read_jpeg_dct(tmp_path / "q90.jpg", cfg, requantize=True)
    direct = rgb_to_dct_image(img[None], 50)[0]
    assert (requantized == direct).mean() > 0.97 and np.abs(requantized - direct.astype(int)).max() <= 1

    # sklearn's china.jpg is 4:4:4 at a non-IJG-scaled quality: refused, or decoded with the pixel fallback.
    cfg = DCTCodecConfig(resolution=(416, 640), size_policy="crop")
    with pytest.raises(JPEGReadError, match=r"china\.jpg.*4:2:0.*pixel_fallback"):
        read_jpeg_dct(CHINA, cfg)
    fallback = read_jpeg_dct(CHINA, cfg, pixel_fallback=True)
    with Image.open(CHINA) as im:
        expected = rgb_to_dct_image(as_rgb_batch([np.asarray(im.convert("RGB"))], cfg), 75)[0]
    assert np.array_equal(fallback, expected)
    too_big = DCTCodecConfig(resolution=(512, 640), size_policy="crop")  # china.jpg is 427 high: crop cannot grow
    with pytest.raises(JPEGReadError, match=r"china\.jpg: size 427x640 \(HxW\) does not match the codec resolution"):
        read_jpeg_dct(CHINA, too_big, pixel_fallback=True)


def test_prepare_takes_jpeg_folders_coefficients_without_a_decode(photos: dict[str, np.ndarray],
                                                                    tmp_path: Path) -> None:
    """`dgm prepare` of an image folder with jpeg_source: a fitting JPEG's tokens are its stored coefficients; a
    file the coefficient path cannot serve (other quality, 4:4:4, rotated by EXIF, PNG) is encoded from pixels."""
    from data_pipeline.manifest import load_manifest
    from data_pipeline.prepare import PrepareConfig, prepare_dataset
    from data_pipeline.sources import build_source

    folder = tmp_path / "photos"
    folder.mkdir()
    img = photos["astronaut"][:64, :64]
    _pillow_jpeg(img, 75, folder / "a_fits.jpg")
    _pillow_jpeg(photos["chelsea"][:64, :64], 90, folder / "b_q90.jpg")
    Image.fromarray(photos["coffee"][:64, :64]).save(folder / "c_444.jpg", quality=75, subsampling=0)
    exif = Image.Exif()
    exif[0x0112] = 3  # rotated 180 degrees: the stored blocks are not the upright image
    Image.fromarray(photos["china"][:64, :64]).save(folder / "d_rotated.jpg", quality=75, subsampling=2, exif=exif)
    Image.fromarray(photos["astronaut"][64:128, :64]).save(folder / "e.png")
    files = sorted(folder.iterdir())
    source = build_source("image_folder", {"path": str(folder)})
    assert [source.sample(i).source_file is not None for i in range(5)] == [True, True, True, False, False]

    said: dict[str, list[str]] = {}
    encodings: dict[str, dict] = {}

    def tokens(jpeg_source: str) -> list[np.ndarray]:
        out = tmp_path / jpeg_source
        said[jpeg_source] = []
        prepare_dataset(PrepareConfig(output=str(out), source="image_folder", source_settings={"path": str(folder)},
                                      codec="dct", codec_settings={"resolution": 64, "jpeg_source": jpeg_source},
                                      samples_per_shard=3, parallel=False), report=said[jpeg_source].append)
        m = load_manifest(str(out))
        assert m.codec["settings"]["jpeg_source"] == jpeg_source
        encodings[jpeg_source] = m.encoding
        # shards [a_fits, b_q90, c_444] and [d_rotated, e.png]: files the coefficient path could not serve
        expected = {"coefficients": [2, 2], "requantize": [1, 2], "pixels": [None, None]}[jpeg_source]
        assert [shard.encoding.get("from_pixels") for shard in m.shards] == expected
        codec = DCTCodec(DCTCodecConfig.from_dict(m.codec["settings"]))
        return [codec.decode({"dct": tar.extractfile(f).read()})["tokens"]
                for shard in m.shards for tar in [tarfile.open(out / shard.name)]
                for f in tar if f.name.endswith(".dct")]

    cfg = DCTCodecConfig(resolution=64)
    pixels = [encode([source.sample(i).image], cfg)[0] for i in range(5)]
    stored = encode_jpeg_files([files[0]], cfg).sequences[0]
    assert not np.array_equal(stored, pixels[0])  # decoding and re-encoding this file rounds differently
    coeff = tokens("coefficients")
    assert np.array_equal(coeff[0], stored)
    assert all(np.array_equal(a, b) for a, b in zip(coeff[1:], pixels[1:], strict=True))
    requant = tokens("requantize")
    assert np.array_equal(requant[0], stored)
    assert np.array_equal(requant[1], encode_jpeg_files([files[1]], cfg, requantize=True).sequences[0])
    assert not np.array_equal(requant[1], pixels[1])
    assert all(np.array_equal(a, b) for a, b in zip(requant[2:], pixels[2:], strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(tokens("pixels"), pixels, strict=True))
    with pytest.raises(ValueError, match="alpha: drop would do nothing for source 'image_folder'"):
        prepare_dataset(PrepareConfig(output=str(tmp_path / "drop"), source="image_folder", codec="dct",
                                      source_settings={"path": str(folder)},
                                      codec_settings={"resolution": 64, "alpha": "drop"}, parallel=False))
    assert not (tmp_path / "drop").exists()  # refused before a shard
    # the manifest sums the shards' encoding reports (samples_per_shard 3: two shards) and prepare says it
    assert encodings["coefficients"] == {"clipped_values": 0, "from_coefficients": 1, "from_pixels": 4,
                                         "examples": encodings["coefficients"]["examples"]}
    assert "b_q90.jpg: its quantisation tables are not this quality's" in encodings["coefficients"]["examples"][0]
    assert len(encodings["coefficients"]["examples"]) == 4  # two per shard
    assert (encodings["requantize"]["from_coefficients"], encodings["requantize"]["from_pixels"]) == (2, 3)
    assert encodings["pixels"] == {"clipped_values": 0}
    assert any(line.startswith("[prepare] dct codec: clipped values 0, from coefficients 1, from pixels 4; "
                               "for example: ") and "b_q90.jpg" in line for line in said["coefficients"])
    codec = DCTCodec(DCTCodecConfig(resolution=64, jpeg_source="coefficients"))
    for i in range(5):
        codec.encode(source.sample(i))
    assert codec.coefficient_files == 1 and len(codec.pixel_fallbacks) == 4
    assert "b_q90.jpg: its quantisation tables are not this quality's (jpeg_source: requantize takes them)" in \
        codec.pixel_fallbacks[0]
    assert "c_444.jpg" in codec.pixel_fallbacks[1] and "pixel_fallback" not in codec.pixel_fallbacks[1]
    assert all("came as pixels, not a JPEG file" in r for r in codec.pixel_fallbacks[2:])  # rotated JPEG, PNG
    with pytest.raises(ValueError, match="jpeg_source must be one of"):
        DCTCodecConfig(resolution=64, jpeg_source="bytes")


def test_corrupt_jpeg_files_name_the_file(photos: dict[str, np.ndarray], tmp_path: Path) -> None:
    cfg = DCTCodecConfig(resolution=64)
    data = _pillow_jpeg(photos["coffee"][:64, :64], 75)
    cases = {
        "truncated.jpg": data[: len(data) // 2],
        "header_only.jpg": data[:300],
        "text.jpg": b"hello world, not a jpeg" * 10,
        "empty.jpg": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(JPEGReadError, match=name.replace(".", r"\.")):
            read_jpeg_dct(tmp_path / name, cfg)
    with pytest.raises(JPEGReadError, match="missing.jpg"):
        read_jpeg_dct(tmp_path / "missing.jpg", cfg)
    # bytes after the EOI (a phone's appended video, which may hold FF DA) are not truncation
    tail = np.random.default_rng(0).bytes(50_000) + b"\xff\xda\x00\x08"
    (tmp_path / "motion.jpg").write_bytes(data + tail)
    (tmp_path / "plain.jpg").write_bytes(data)
    assert np.array_equal(read_jpeg_dct(tmp_path / "motion.jpg", cfg), read_jpeg_dct(tmp_path / "plain.jpg", cfg))
    # stray bytes between two segments (some tools pad after APPn): libjpeg skips them, and so does the check
    app0_end = 4 + int.from_bytes(data[4:6], "big")
    (tmp_path / "padded.jpg").write_bytes(data[:app0_end] + b"\x00\x00" + data[app0_end:])
    assert np.array_equal(read_jpeg_dct(tmp_path / "padded.jpg", cfg), read_jpeg_dct(tmp_path / "plain.jpg", cfg))


# ---------------------------------------------------------------- bad input, config, bytes, shard codec


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="100x100"):
        DCTCodecConfig(resolution=100)
    with pytest.raises(ValueError, match="64x72"):
        DCTCodecConfig(resolution=(64, 72))
    for kwargs in ({"quality": 0}, {"value_range": 0}, {"size_policy": "stretch"}, {"alpha": "black"}):
        with pytest.raises(ValueError):
            DCTCodecConfig(resolution=64, **kwargs)
    cfg = DCTCodecConfig(resolution=(32, 64), quality=90, value_range=512)
    assert cfg.grid == (2, 4) and cfg.num_positions == 8
    assert DCTCodecConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        DCTCodecConfig.from_dict({**cfg.to_dict(), "colour": "rgb"})


def test_bad_and_converted_images(photos: dict[str, np.ndarray]) -> None:
    cfg = DCTCodecConfig(resolution=64)
    img = photos["astronaut"][:64, :64]
    with pytest.raises(ValueError, match="70x64"):
        encode([photos["astronaut"][:70, :64]], cfg)
    with pytest.raises(ValueError, match="60x64"):
        rgb_to_dct_image(photos["astronaut"][None, :60, :64], 75)
    with pytest.raises(TypeError, match="uint8"):
        encode([img.astype(np.float32)], cfg)
    with pytest.raises(ValueError, match="batch"):
        encode(img, cfg)  # a single [H, W, 3] image must come in a list
    with pytest.raises(ValueError, match="shape"):
        encode([img[:, :, :2]], cfg)

    grey = img[:, :, 0]
    for form in (grey, grey[:, :, None]):
        dct = rgb_to_dct_image(as_rgb_batch([form], cfg), 75)
        assert not dct.reshape(4, 4, 64, 6)[..., 4:].any()  # R = G = B: no chroma at all
        assert np.array_equal(
            decode(encode([form], cfg), cfg)[0], decode(encode([np.dstack([grey] * 3)], cfg), cfg)[0]
        )

    rgba = np.dstack([img, np.full((64, 64), 255, np.uint8)])
    rgba[:32, :, 3] = 0
    white = as_rgb_batch([rgba], cfg)[0]
    assert (white[:32] == 255).all() and np.array_equal(white[32:], img[32:])
    dropped = as_rgb_batch([rgba], DCTCodecConfig(resolution=64, alpha="drop"))[0]
    assert np.array_equal(dropped, img)

    odd = photos["astronaut"][:120, :150]
    cropped = as_rgb_batch([odd], DCTCodecConfig(resolution=64, size_policy="crop"))[0]
    assert np.array_equal(cropped, odd[16:80, 32:96])  # centre offsets (28, 43) rounded down to the 16 grid
    padded = as_rgb_batch([odd[:50, :60]], DCTCodecConfig(resolution=64, size_policy="pad"))[0]
    assert np.array_equal(padded[:50, :60], odd[:50, :60]) and (padded[63, 63] == odd[49, 59]).all()
    with pytest.raises(ValueError, match="50x150"):
        as_rgb_batch([odd[:50]], DCTCodecConfig(resolution=64, size_policy="crop"))


def test_bytes_round_trip_and_validating_loader(small_batch: np.ndarray) -> None:
    cfg = DCTCodecConfig(resolution=64)
    vocab = cfg.vocab
    seq = encode(small_batch[:1], cfg)[0]
    data = sequence_to_bytes(seq, vocab)
    assert np.load(io.BytesIO(data)).dtype == np.int16 and len(data) <= 128 + 6 * len(seq)
    assert np.array_equal(sequence_from_bytes(data, vocab, "shard-0/k1"), seq)

    def bad(arr: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, arr)
        return buf.getvalue()

    out_of_range = seq.copy()
    out_of_range[3, 1] = vocab.num_positions + 5
    with pytest.raises(SequenceError, match=r"shard-0/k1: row 3: position token 21"):
        sequence_from_bytes(bad(out_of_range), vocab, "shard-0/k1")
    negative = seq.copy()
    negative[0, 2] = -1
    with pytest.raises(SequenceError, match="value token -1"):
        sequence_from_bytes(bad(negative), vocab)
    with pytest.raises(SequenceError, match="EOS"):
        sequence_from_bytes(bad(seq[:-1]), vocab)
    with pytest.raises(SequenceError, match="row 2.*must not decrease"):
        sequence_from_bytes(bad(seq[[0, 2, 1] + list(range(3, len(seq)))]), vocab)
    with pytest.raises(SequenceError, match="dtype"):
        sequence_from_bytes(bad(seq.astype(np.float32)), vocab)
    with pytest.raises(SequenceError, match="not a .npy"):
        sequence_from_bytes(b"\x93NUMPY garbage", vocab)
    archive = io.BytesIO()
    np.savez(archive, tokens=seq)
    with pytest.raises(SequenceError, match=r"shard-0/k1: not a .npy token array \(an .npz archive\)"):
        sequence_from_bytes(archive.getvalue(), vocab, "shard-0/k1")
    with pytest.raises(SequenceError, match="not a .npy"):
        sequence_from_bytes(bad(np.array([{"a": 1}], dtype=object)), vocab)
    with pytest.raises(SequenceError, match="sequence 1.*position token"):
        triples_to_dct_image([seq, out_of_range], cfg)


def test_shard_codec_contract(small_batch: np.ndarray) -> None:
    cfg = DCTCodecConfig(resolution=64, quality=80)
    codec = DCTCodec(cfg)
    assert codec.settings()["quality"] == 80 and codec.name == "dct"
    sample = SimpleNamespace(key="k7", image=small_batch[0], label=3, caption="a face", attributes={"n": 1})
    fields = codec.encode(sample)
    assert set(fields) == {"dct", "cls", "txt", "json"}
    out = codec.decode({"__key__": "k7", **fields})
    assert out["label"] == 3 and out["caption"] == "a face" and out["attributes"] == {"n": 1}
    assert np.array_equal(out["tokens"], encode_with_stats(small_batch[:1], cfg).sequences[0])
    assert _psnr(codec.decode_images([out["tokens"]])[0], small_batch[0]) > 28
    with pytest.raises(SampleDecodeError, match="k7"):
        codec.decode({"__key__": "k7", "dct": b"junk"})
    with pytest.raises(SampleDecodeError, match="k8.*size"):
        codec.encode(
            SimpleNamespace(key="k8", image=small_batch[0][:40], label=None, caption=None, attributes=None)
        )


def test_codec_report_counts_clipped_values_and_says_what_to_raise(photos: dict[str, np.ndarray]) -> None:
    """Coefficients beyond value_range are clipped (lossy): the shard's report counts them and names the setting."""
    img = photos["astronaut"][:64, :64]
    narrow = DCTCodec(DCTCodecConfig(resolution=64, quality=95, value_range=8))
    wide = DCTCodec(DCTCodecConfig(resolution=64, quality=95))
    sample = SimpleNamespace(key="a", image=img, label=None, caption=None, attributes=None)
    narrow.encode(sample)
    wide.encode(sample)
    expected = int(encode_with_stats([img], narrow.config).clipped[0])
    assert expected > 0
    report = narrow.encode_report()
    assert report["clipped_values"] == expected
    assert report["examples"] == [f"{expected} coefficient values clipped to +-8 (raise codec_settings.value_range "
                                  "to keep them)"]
    assert wide.encode_report() == {"clipped_values": 0}

"""The "tokens" codec and the image tokenisation job (Ray actors + a randomly initialised dVAE export): output equal
to the dVAE's own argmax codes in the input's order, independent of the worker count, resumable, local and s3://."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data_pipeline import storage
from data_pipeline.caption_tokenizer import TOKENIZER_FILE, CaptionTokenizer
from data_pipeline.codecs import build_codec
from data_pipeline.codecs.metadata import SampleDecodeError
from data_pipeline.codecs.tokens import TokenSample
from data_pipeline.manifest import DatasetError, Manifest, ShardInfo, load_manifest, save_manifest
from data_pipeline.prepare import PrepareConfig, prepare_dataset, sample_offsets
from data_pipeline.sources import Sample
from data_pipeline.stream import ShardOpener, StreamConfig
from trainer.dalle.dvae import DVAEConfig
from trainer.dalle.tokenise_job import check_tokenise_output, plan_output, plan_tokenise, tokenise_dataset
from trainer.export import load_export, write_export
from trainer.families.dvae import DVAEFamily

SETTINGS = {"text_vocab": 300, "image_vocab": 64, "image_grid": [2, 3]}


def token_sample(text: list[int], image: list[int]) -> TokenSample:
    return TokenSample("scene-7", np.array(text), np.array(image), "a red circle", {"count": 1})


def test_codec_round_trip() -> None:
    codec = build_codec("tokens", SETTINGS)
    fields = codec.encode(token_sample([5, 299, 0], [0, 1, 2, 3, 62, 63]))
    out = codec.decode({"__key__": "scene-7", **fields})
    assert out["text"].dtype == np.int64 and out["text"].tolist() == [5, 299, 0]
    assert out["image_tokens"].dtype == np.int64 and out["image_tokens"].tolist() == [0, 1, 2, 3, 62, 63]
    assert out["caption"] == "a red circle" and out["attributes"] == {"count": 1}
    assert build_codec("tokens", codec.settings()).settings() == codec.settings()


@pytest.mark.parametrize("text, image, message", [
    ([5, 300], [0] * 6, "sample scene-7: text id 300 out of range \\[0, 300\\)"),
    ([5], [0, 1, 2, 3, 4, 64], "sample scene-7: image token 64 out of range \\[0, 64\\)"),
    ([-1], [0] * 6, "sample scene-7: text id -1 out of range"),
    ([5], [0] * 5, "sample scene-7: expected 6 image tokens \\(grid \\[2, 3\\]\\)"),
    ([], [0] * 6, "sample scene-7: text ids must be a non-empty"),
])
def test_bad_ids_name_the_sample(text: list[int], image: list[int], message: str) -> None:
    codec = build_codec("tokens", SETTINGS)
    with pytest.raises(SampleDecodeError, match=message):
        codec.encode(token_sample(text, image))
    raw = {"__key__": "scene-7", "tid": np.array(text, "<i4").tobytes(), "iid": np.array(image, "<i4").tobytes()}
    with pytest.raises(SampleDecodeError, match=message):  # a shard written with other settings, read with these
        codec.decode(raw)


def test_codec_refuses_bad_settings_and_members() -> None:
    with pytest.raises(ValueError, match="image_grid must be \\[h, w\\]"):
        build_codec("tokens", {**SETTINGS, "image_grid": [8]})
    with pytest.raises(ValueError, match="text_vocab must be a positive int"):
        build_codec("tokens", {**SETTINGS, "text_vocab": 0})
    with pytest.raises(ValueError, match="text_vocab must be a positive int, got True"):  # YAML's `yes`
        build_codec("tokens", {**SETTINGS, "text_vocab": True})
    for level in (10, -3, True, 1.5):  # Pillow's own refusal named neither the setting nor the range
        with pytest.raises(ValueError, match=r"compress_level must be an int in 0..9"):
            build_codec("image", {"compress_level": level})
    codec = build_codec("tokens", SETTINGS)
    with pytest.raises(SampleDecodeError, match="sample k: no .iid member"):
        codec.decode({"__key__": "k", "tid": b"\0" * 4})
    with pytest.raises(SampleDecodeError, match="sample k: .tid is 3 bytes"):
        codec.decode({"__key__": "k", "tid": b"\0" * 3, "iid": b"\0" * 24})


def test_output_plan_spans_input_shards() -> None:
    shards = [ShardInfo(f"shard-{i:06d}.tar", c, 1, "0" * 64, f) for i, (c, f) in enumerate([(32, 0), (32, 32),
                                                                                               (20, 64)])]
    manifest = Manifest({}, {}, shards, url="in")
    plans = plan_output(manifest, 40, "fp")
    assert [(p.plan.first, p.plan.stop) for p in plans] == [(0, 40), (40, 80), (80, 84)]
    assert [(s.url, s.skip, s.take) for s in plans[1].inputs] == [("in/shard-000001.tar", 8, 24),
                                                                  ("in/shard-000002.tar", 0, 16)]


# ---------------------------------------------------------------- the job (Ray)

@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> str:
    """96 captioned 32x32 scenes in 3 shards, with a caption tokenizer."""
    url = str(tmp_path_factory.mktemp("t2i") / "train")
    prepare_dataset(PrepareConfig(output=url, source="shapes", source_settings={
        "num_samples": 96, "resolution": 32, "min_objects": 1, "max_objects": 3, "seed": 3},
        codec="image", codec_settings={"keep": ["caption", "attributes"]}, samples_per_shard=32, parallel=False,
        tokenizer_vocab_size=300), report=lambda _: None)
    return url


@pytest.fixture(scope="module")
def dvae_export(tmp_path_factory) -> str:
    """A randomly initialised small dVAE (no training needed: the job only has to reproduce its argmax codes)."""
    torch.manual_seed(0)
    family = DVAEFamily(DVAEConfig(num_codes=64, width=8, blocks_per_group=1, decoder_init=8),
                        {"image_shape": [32, 32, 3]})
    modules = family.build_modules()
    with torch.no_grad():  # unit-variance layers, so the argmax codes follow the image instead of the biases
        for p in modules["dvae"].encoder.parameters():
            p.normal_(0, p[0].numel() ** -0.5) if p.dim() > 1 else p.zero_()
    out = str(tmp_path_factory.mktemp("dvae") / "export")
    return write_export(out, family, {name: m.state_dict() for name, m in modules.items()})


def read_samples(url: str) -> list[dict]:
    """Every sample of a dataset, in manifest order, decoded with its manifest's codec (shards sha256-checked)."""
    manifest = load_manifest(url)
    codec = build_codec(manifest.codec["name"], manifest.codec["settings"])
    opener = ShardOpener(manifest, StreamConfig())
    return [{"key": raw["__key__"], **codec.decode(raw)} for i in range(len(manifest.shards))
            for raw in opener.samples(i, 0)]


@pytest.mark.slow
def test_job_matches_the_dvae_in_order_and_resumes(ray_local, scenes: str, dvae_export: str, tmp_path: Path,
                                                   s3_bucket: str) -> None:
    lines: list[str] = []
    out2 = str(tmp_path / "tokens-2")
    manifest = tokenise_dataset(scenes, dvae_export, out2, workers=2, batch_size=16, report=lines.append)

    images = read_samples(scenes)
    family, modules, _ = load_export(dvae_export)
    expected = family.encode_tokens(modules, np.stack([s["image"] for s in images])).reshape(len(images), -1)
    tokenizer = CaptionTokenizer.load(os.path.join(scenes, TOKENIZER_FILE))
    tokens = read_samples(out2)
    assert [t["key"] for t in tokens] == [s["key"] for s in images]
    assert np.array_equal(np.stack([t["image_tokens"] for t in tokens]), expected.numpy())
    # A constant encoder would prove nothing: the codes vary across positions and images.
    assert len(np.unique(expected.numpy())) > 4 and len({row.tobytes() for row in expected.numpy()}) > 48
    for t, s in zip(tokens, images, strict=True):
        assert t["text"].tolist() == tokenizer.encode(s["caption"]) and t["caption"] == s["caption"]
        assert t["attributes"] == s["attributes"]
    assert manifest.extra["image_grid"] == [8, 8] and manifest.extra["image_vocab"] == 64
    assert manifest.extra["text_vocab"] == 300 and manifest.extra["image_shape"] == [32, 32, 3]
    assert manifest.extra["tokenizer"] == {"file": TOKENIZER_FILE, "sha256": tokenizer.sha256, "vocab_size": 300}
    assert manifest.extra["dvae_export"] == dvae_export and len(manifest.extra["dvae_weights_sha256"]) == 64
    assert storage.read_bytes(os.path.join(out2, TOKENIZER_FILE)) == tokenizer.to_bytes()
    assert any("shards 3/3, images 96/96" in line and "images/s" in line for line in lines), lines

    # One worker, input, dVAE export and output on S3: byte-identical shards.
    storage.upload_dir(scenes, f"{s3_bucket}/scenes")
    storage.upload_dir(dvae_export, f"{s3_bucket}/dvae")
    out1 = f"{s3_bucket}/tokens-1"
    one = tokenise_dataset(f"{s3_bucket}/scenes", f"{s3_bucket}/dvae", out1, workers=1, batch_size=7,
                           report=lambda _: None)
    assert [s.sha256 for s in one.shards] == [s.sha256 for s in manifest.shards]
    assert storage.read_bytes(f"{out1}/{TOKENIZER_FILE}") == tokenizer.to_bytes()
    assert load_manifest(out1).extra["tokenizer"]["sha256"] == tokenizer.sha256

    # Interrupted run: shard 1 and its info are gone; a re-run writes only that shard.
    stamps = {n: os.stat(os.path.join(out2, n)).st_mtime_ns for n in ("shard-000000.tar", "shard-000002.tar")}
    os.unlink(os.path.join(out2, "shard-000001.tar"))
    os.unlink(os.path.join(out2, "shard-000001.tar.info.json"))
    os.unlink(os.path.join(out2, "manifest.json"))
    lines.clear()
    again = tokenise_dataset(scenes, dvae_export, out2, workers=2, report=lines.append)
    assert "(2 already done, 1 workers)" in lines[0] and "1 workers ready after" in lines[1]
    assert {n: os.stat(os.path.join(out2, n)).st_mtime_ns for n in stamps} == stamps
    assert again.to_json() == manifest.to_json()

    # A shard changed in place (same size): only a verifying re-run finds it, and rewrites just that one.
    shard0 = os.path.join(out2, "shard-000000.tar")
    good = open(shard0, "rb").read()
    with open(shard0, "r+b") as f:
        f.seek(len(good) // 2)
        f.write(bytes(b ^ 0xFF for b in good[len(good) // 2: len(good) // 2 + 64]))
    lines.clear()
    tokenise_dataset(scenes, dvae_export, out2, workers=1, report=lines.append, verify=True)
    assert "(2 already done, 1 workers)" in lines[0] and open(shard0, "rb").read() == good


@pytest.mark.slow
@pytest.mark.parametrize("caption, problem", [("", " has an empty caption"), ("\u200b", r": caption '\\u200b' has no tokens")])
def test_an_empty_caption_names_the_shard_and_sample(ray_local, scenes: str, dvae_export: str, tmp_path: Path,
                                                     caption: str, problem: str) -> None:
    """One line naming shard and sample, not Ray's wrapper (a caption sentencepiece reads as nothing included)."""
    bad = str(tmp_path / "bad")
    os.makedirs(bad)
    codec = build_codec("image", {"keep": ["caption"]})
    samples = read_samples(scenes)[:3]
    shard = os.path.join(bad, "shard-000000.tar")
    with wds.TarWriter(shard) as writer:
        for i, s in enumerate(samples):
            sample = Sample(s["key"], s["image"], caption=caption if i == 1 else s["caption"])
            writer.write({"__key__": s["key"], **codec.encode(sample)})
    info = ShardInfo("shard-000000.tar", 3, os.path.getsize(shard), storage.sha256_of(shard), 0,
                     sample_offsets(shard)[:1])
    save_manifest(bad, Manifest({"name": "shapes"}, {"name": "image", "settings": codec.settings()}, [info], url=bad))
    storage.copy(os.path.join(scenes, TOKENIZER_FILE), os.path.join(bad, TOKENIZER_FILE))
    with pytest.raises(DatasetError, match=f"shard {shard}: sample {samples[1]['key']}{problem}") as failed:
        tokenise_dataset(bad, dvae_export, str(tmp_path / "out"), workers=1, report=lambda _: None)
    assert type(failed.value) is DatasetError  # the cause itself, not Ray's RayTaskError(DatasetError)
    assert not storage.exists(str(tmp_path / "out" / "manifest.json"))


@pytest.mark.slow
def test_a_damaged_export_is_named_before_any_worker_starts(scenes: str, dvae_export: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A damaged dVAE export killed every worker: the CLI got an uncaught ActorDiedError traceback, later each
    worker's stack from Ray before the one clear line. The driver checks the weights' digest first."""
    import trainer.dalle.tokenise_job as job

    def started(*args, **kwargs):
        raise AssertionError("workers were started for a damaged export")

    monkeypatch.setattr(job, "ensure_ray", started)
    damaged = str(tmp_path / "dvae")
    shutil.copytree(dvae_export, damaged)
    with open(os.path.join(damaged, "model.safetensors"), "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(DatasetError, match=rf"{damaged}/model.safetensors: sha256 [0-9a-f]{{12}}\.\.\., but its "
                                           r"config.json records [0-9a-f]{12}\.\.\.: the file is damaged"):
        tokenise_dataset(scenes, damaged, str(tmp_path / "out"), workers=1, report=lambda _: None)


def test_the_plan_names_the_whole_dvae_export_and_its_image_size(scenes: str, dvae_export: str,
                                                                  tmp_path: Path) -> None:
    """Settings such as eps change the codes without changing the weights: a resume must not keep shards of the
    other export. A dVAE of another image size is refused before any worker starts."""
    family, modules, config = load_export(dvae_export)
    states = {name: m.state_dict() for name, m in modules.items()}
    other_eps = DVAEFamily(dataclasses.replace(family.config, eps=0.3), family.data_info)
    again = write_export(str(tmp_path / "eps"), other_eps, states)
    assert plan_tokenise(scenes, again).fingerprint != plan_tokenise(scenes, dvae_export).fingerprint
    # the same tensors; the weights file differs only by the settings digest it records (trainer.export)
    assert plan_tokenise(scenes, again).weights_sha != plan_tokenise(scenes, dvae_export).weights_sha
    bigger = DVAEFamily(family.config, {"image_shape": [64, 64, 3]})
    wide = write_export(str(tmp_path / "wide"), bigger, {n: m.state_dict() for n, m in bigger.build_modules().items()})
    with pytest.raises(DatasetError, match=rf"{scenes}: images of shape \[32, 32, 3\], but the dVAE export .*wide "
                                           r"reads \[64, 64, 3\]"):
        plan_tokenise(scenes, wide)


def test_job_refuses_inputs_it_cannot_tokenise(tmp_path: Path, dvae_export: str) -> None:
    plain = str(tmp_path / "plain")
    prepare_dataset(PrepareConfig(output=plain, source="shapes", source_settings={"num_samples": 4, "resolution": 32},
                                  samples_per_shard=4, parallel=False), report=lambda _: None)
    with pytest.raises(DatasetError, match=f"{plain}/tokenizer.model: missing; prepare the dataset with"):
        tokenise_dataset(plain, dvae_export, str(tmp_path / "out"))
    storage.write_bytes(os.path.join(plain, TOKENIZER_FILE), b"not a model")
    with pytest.raises(ValueError, match=f"{plain}/tokenizer.model: not a sentencepiece model"):
        tokenise_dataset(plain, dvae_export, str(tmp_path / "out"))
    mute = str(tmp_path / "mute")  # a tokenizer, but the shards keep no caption: every sample would fail in a worker
    prepare_dataset(PrepareConfig(output=mute, source="shapes", source_settings={"num_samples": 8, "resolution": 32},
                                  codec="image", codec_settings={"keep": ["attributes"]}, samples_per_shard=8,
                                  parallel=False, tokenizer_vocab_size=290), report=lambda _: None)
    with pytest.raises(DatasetError, match=rf"{mute}: its shards store no captions \(codec_settings.keep "
                                           r"\['attributes'\]\); prepare it again with 'caption'"):
        plan_tokenise(mute, dvae_export)


def test_job_refuses_to_write_over_a_different_dataset(scenes: str, dvae_export: str) -> None:
    before = {n: os.path.getmtime(os.path.join(scenes, n)) for n in os.listdir(scenes)}
    with pytest.raises(DatasetError, match=rf"^{scenes}: already holds a different data set \(96 samples in 3 shards, "
                                           r"source 'shapes', codec 'image'\)"):
        tokenise_dataset(scenes, dvae_export, scenes, workers=1, report=lambda _: None)
    with pytest.raises(DatasetError, match=rf"^{scenes}: already holds a different data set"):
        check_tokenise_output(scenes, dvae_export, scenes)  # what dgm tokenize runs for every split first
    assert {n: os.path.getmtime(os.path.join(scenes, n)) for n in os.listdir(scenes)} == before


def test_splits_with_different_caption_tokenizers_are_refused(scenes: str, dvae_export: str, tmp_path: Path) -> None:
    """Eval captions tokenised with another vocabulary were scored silently: their ids pass every range check."""
    from trainer.dalle.tokenise_job import check_splits_agree

    other = str(tmp_path / "eval")
    prepare_dataset(PrepareConfig(output=other, source="shapes", source_settings={
        "num_samples": 96, "resolution": 32, "min_objects": 1, "max_objects": 3, "seed": 3},
        codec="image", codec_settings={"keep": ["caption", "attributes"]}, samples_per_shard=32, parallel=False,
        tokenizer_vocab_size=290), report=lambda _: None)
    plans = {"train": plan_tokenise(scenes, dvae_export), "eval": plan_tokenise(other, dvae_export)}
    with pytest.raises(DatasetError, match=rf"the splits' caption tokenizers differ \(train: .*{scenes}\), eval: "
                                           rf".*{other}\)\): prepare the held-out split with .*tokenizer_from"):
        check_splits_agree(plans)
    check_splits_agree({"train": plans["train"], "eval": plan_tokenise(scenes, dvae_export)})


def test_a_missing_dvae_export_is_named_once(tmp_path) -> None:
    from trainer.dalle.tokenise_job import _dvae_export

    missing = str(tmp_path / "no-dvae")
    with pytest.raises(DatasetError) as e:
        _dvae_export(missing)
    assert str(e.value) == f"{missing}: not a dVAE export folder ({missing}/config.json: not found)"

"""The data pipeline end to end on real shards: prepare, stream on any world size, resume, S3, bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from data_pipeline import storage
from data_pipeline.codecs import build_codec
from data_pipeline.codecs.dct_tables import CHANNEL_SLOT
from data_pipeline.manifest import FORMAT_VERSION, DatasetError, load_manifest
from data_pipeline.prepare import PrepareConfig, prepare_dataset
from data_pipeline.sources import build_source
from data_pipeline.storage import StorageError
from data_pipeline.stream import RankStream, ShardOpener, ShardUnavailableError, StreamConfig
from sharding.sample_order import OrderError, StreamState

SPS = 257  # 1797 digits -> 7 shards (the last one short): no world size or worker count here divides 7


def _prepare(out: str, **kw) -> None:
    prepare_dataset(PrepareConfig(output=out, source="digits", source_settings={"split": "all"},
                                  samples_per_shard=SPS, parallel=False, **kw), report=lambda _: None)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("digits"))
    _prepare(out)
    return out


def stream_cfg(**kw) -> StreamConfig:
    base = dict(global_batch=24, partitions=12, shuffle_block=32, seed=7, drop_last=False)
    return StreamConfig(**{**base, **kw})


def rank_batches(url: str, cfg: StreamConfig, rank: int, world: int, state=None, limit=None, epochs=1):
    m = load_manifest(url)
    s = RankStream(m, cfg, build_codec(m.codec["name"]).decode, rank, world, state)
    out = []
    for batch in s.iterate(max_epochs=epochs):
        out.append([(x["key"], x["valid"]) for x in batch])
        if limit is not None and len(out) >= limit:
            break
    return out, s.state


def global_batches(url, cfg, world, state=None, limit=None, epochs=1):
    per_rank = [rank_batches(url, cfg, r, world, state, limit, epochs) for r in range(world)]
    states = {st for _, st in per_rank}
    assert len(states) == 1, "ranks disagree on the stream state"
    counts = {len(b) for b, _ in per_rank}
    assert len(counts) == 1, f"ranks yield different numbers of batches: {counts}"
    return [sum((b[i] for b, _ in per_rank), []) for i in range(counts.pop())], states.pop()


def test_manifest_records_shards_and_settings(digits):
    m = load_manifest(digits)
    assert m.total == 1797 and len(m.shards) == 7
    assert m.shard_counts == [SPS] * 6 + [1797 - 6 * SPS]
    assert m.source["name"] == "digits" and m.source["settings"]["split"] == "all"
    assert m.codec["name"] == "image"
    assert all(len(s.sha256) == 64 and s.bytes > 0 for s in m.shards)
    assert m.extra["image_shape"] == [8, 8, 1]
    preview = np.asarray(Image.open(os.path.join(digits, "preview.png")))  # 36 digits, 8x8 scaled to 64
    first = build_source("digits", m.source["settings"]).sample(0).image[..., 0]
    assert preview.shape == (398, 398, 3) and np.array_equal(preview[2:66:8, 2:66:8, 0], first) and first.any()


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_one_epoch_sees_every_sample_once(digits, world, workers):
    batches, state = global_batches(digits, stream_cfg(num_workers=workers), world)
    keys = [k for b in batches for k, valid in b if valid]
    assert len(keys) == 1797 and len(set(keys)) == 1797
    assert all(len(b) == 24 for b in batches)
    assert state == StreamState(1, 0)


def test_global_order_does_not_depend_on_world_size_or_workers(digits):
    ref, _ = global_batches(digits, stream_cfg(), 1)
    assert global_batches(digits, stream_cfg(num_workers=2), 2)[0] == ref
    assert global_batches(digits, stream_cfg(num_workers=2), 3)[0] == ref


def test_drop_last_epochs_differ_and_have_full_batches(digits):
    cfg = stream_cfg(drop_last=True)
    two, state = global_batches(digits, cfg, 2, epochs=2)
    assert len(two) == 2 * (1797 // 24) and state == StreamState(2, 0)
    first, second = two[: len(two) // 2], two[len(two) // 2:]
    assert first != second and all(v for b in two for _, v in b)


def test_resume_on_a_different_world_size_continues_exactly(digits):
    cfg = stream_cfg(drop_last=True)
    full, _ = global_batches(digits, cfg, 1, epochs=2)
    k = 50  # stop inside the first epoch (74 batches), resume on 3 ranks, then on 2 across the epoch boundary
    head, state = global_batches(digits, cfg, 2, limit=k, epochs=2)
    assert state == StreamState(0, k)
    saved = json.loads(json.dumps(state.to_dict()))
    middle, state2 = global_batches(digits, stream_cfg(drop_last=True, num_workers=2), 3,
                                    StreamState.from_dict(saved), limit=40, epochs=2)
    assert state2 == StreamState(1, 16)
    tail, _ = global_batches(digits, cfg, 2, state2, epochs=1)
    assert head + middle + tail == full


def test_prepare_rerun_finishes_only_missing_shards(tmp_path):
    out = str(tmp_path / "ds")
    _prepare(out)
    before = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out) if n.endswith(".tar")}
    os.remove(os.path.join(out, "shard-000003.tar"))
    os.remove(os.path.join(out, "manifest.json"))
    with open(os.path.join(out, "shard-000001.tar"), "r+b") as f:  # truncated: its info no longer fits it
        f.truncate(5000)
    with open(os.path.join(out, "shard-000005.tar.info.json"), "w") as f:  # a damaged info file
        f.write("[]")
    lines: list[str] = []
    prepare_dataset(PrepareConfig(output=out, source="digits", source_settings={"split": "all"},
                                  samples_per_shard=SPS, parallel=False), report=lines.append)
    assert any("4 already done" in line for line in lines)
    after = {n: os.path.getmtime(os.path.join(out, n)) for n in before}
    assert sorted(n for n in before if after[n] != before[n]) == ["shard-000001.tar", "shard-000003.tar",
                                                                  "shard-000005.tar"]
    manifest = load_manifest(out)
    assert manifest.total == 1797
    assert all(storage.sha256_of(os.path.join(out, s.name)) == s.sha256 for s in manifest.shards)


def test_prepare_into_a_file_is_refused_before_any_work(tmp_path):
    """It said 'notes.txt/shard-000000.tar: File exists', after announcing the shards it would write there."""
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    lines: list[str] = []
    for out, problem in ((afile, "is a file"), (afile / "ds", f"is below {afile}, a file")):
        with pytest.raises(ValueError, match=rf"prepare output {out}: {problem}, not a folder"):
            prepare_dataset(PrepareConfig(output=str(out), source="digits", source_settings={"split": "all"},
                                          samples_per_shard=SPS, parallel=False), report=lines.append)
    assert lines == [] and afile.read_text() == "mine"


def test_a_split_of_more_shards_than_names_is_refused_at_once(tmp_path, capsys):
    """10^12 samples planned 3*10^10 shards in memory, without a word, until killed."""
    from data_pipeline.prepare import plan_shards

    cfg = PrepareConfig(output=str(tmp_path / "ds"), source="digits", samples_per_shard=32)
    with pytest.raises(ValueError, match=r"1,000,000,000,000 samples at samples_per_shard=32 would make "
                                         r"31,250,000,000 shards \(at most 1,000,000\)"):
        plan_shards(cfg, 10**12, None)
    # `dgm prepare` checks every split before writing any: a train split was written, then eval refused
    from launch.cli import main

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "data"
    argv = ["prepare", os.path.join(root, "configs", "gan_ring.yaml"), "--no-ray", f"data.train={out}/train",
            f"data.eval={out}/eval", "data.prepare.splits.eval.num_samples=2000000000"]
    assert main(argv) == 2
    assert "data.prepare.splits.eval: 2,000,000,000 samples" in capsys.readouterr().err and not out.exists()


def test_prepare_verify_rewrites_a_shard_damaged_in_place(tmp_path):
    """Bytes changed in place keep the size a plain re-run checks: training then fails on the sha256 and says how
    to repair it; `dgm prepare --verify` re-hashes the finished shards and rewrites that one."""
    out = str(tmp_path / "ds")
    _prepare(out)
    path = os.path.join(out, "shard-000002.tar")
    good = storage.sha256_of(path)
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(b"\xff" * 64)
    with pytest.raises(DatasetError, match=r"shard-000002.tar: sha256 mismatch .*dgm prepare CONFIG --verify"):
        _stream_all(out)
    cfg = dict(output=out, source="digits", source_settings={"split": "all"}, samples_per_shard=SPS, parallel=False)
    lines: list[str] = []
    prepare_dataset(PrepareConfig(**cfg), report=lines.append)
    assert "(7 already done)" in lines[0] and storage.sha256_of(path) != good  # size alone: not found
    lines.clear()
    prepare_dataset(PrepareConfig(**cfg, verify=True), report=lines.append)
    assert "(6 already done)" in lines[0] and storage.sha256_of(path) == good
    assert ("[prepare] rewriting 1 shard(s) that differ from what was recorded (damaged, truncated or changed): "
            "shard-000002.tar") in lines
    assert len(_stream_all(out)[0]) > 0


def test_prepare_to_s3_streams_the_same_samples(s3_bucket, digits, tmp_path):
    url = f"{s3_bucket}/digits"
    _prepare(url)
    cfg = stream_cfg(cache_dir=str(tmp_path / "cache"))
    assert global_batches(url, cfg, 2)[0] == global_batches(digits, stream_cfg(), 2)[0]


def test_transient_s3_failures_lose_nothing(s3_bucket, digits, tmp_path, flaky_s3):
    url = f"{s3_bucket}/flaky"
    _prepare(url)
    flaky_s3.fail_next(4, status=500)
    flaky_s3.drop_next_gets(2)
    got, _ = global_batches(url, stream_cfg(cache_dir=str(tmp_path / "c")), 1)
    assert flaky_s3.errors_injected == 4 and flaky_s3.drops_injected == 2
    assert got == global_batches(digits, stream_cfg(), 1)[0]


@pytest.fixture
def copy_of(digits, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(digits, dst)
    return dst


def _stream_all(url, **kw):
    return global_batches(url, stream_cfg(**kw), 1)


def test_truncated_shard_is_named(copy_of):
    path = os.path.join(copy_of, "shard-000002.tar")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(DatasetError, match=r"shard-000002.tar: sha256 mismatch"):
        _stream_all(copy_of)
    with pytest.raises(DatasetError, match=r"shard-000002.tar: (corrupt or truncated|holds|ended)"):
        _stream_all(copy_of, verify_sha256=False)


def test_corrupt_shard_can_be_skipped_with_a_counter(copy_of, caplog):
    path = os.path.join(copy_of, "shard-000004.tar")
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(b"\xff" * 64)
    with pytest.raises(DatasetError, match="shard-000004.tar: sha256 mismatch"):
        _stream_all(copy_of)
    m = load_manifest(copy_of)
    for workers in (0, 2):  # the shard straddles partitions (and workers): still one shard skipped, one warning
        caplog.clear()
        s = RankStream(m, stream_cfg(on_corrupt="skip", num_workers=workers), build_codec("image").decode, 0, 1)
        batches = list(s.iterate(max_epochs=2))
        seen = [x["key"] for b in batches for x in b if x["valid"]]
        assert s.skipped_shards == 1 and s.skipped == {4}
        if workers == 0:  # loader workers log in their own processes
            warnings = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
            assert len(warnings) == 1 and warnings[0].count("shard-000004") == 1, warnings
            assert warnings[0].startswith("data.stream.on_corrupt=skip: skipping shard ")
        assert len(seen) == 2 * (1797 - SPS) and len(batches) == 2 * -(-1797 // 24)


def test_skip_does_not_skip_a_shard_storage_cannot_serve(s3_bucket, digits, tmp_path, flaky_s3):
    """Access denied is an outage, not corruption: on_corrupt=skip must stop, not train on empty batches.
    A shard deleted from the bucket is missing data, which skip does skip."""
    url = f"{s3_bucket}/denied"
    _prepare(url)
    m = load_manifest(url)
    cfg = stream_cfg(on_corrupt="skip", cache_dir=str(tmp_path / "c"))
    flaky_s3.fail_next(10**6, status=403)
    with pytest.raises(ShardUnavailableError, match=rf"^shard {url}/shard-\d+.tar: cannot be read: access denied"):
        next(iter(RankStream(m, cfg, build_codec("image").decode, 0, 1)))
    flaky_s3.reset()
    storage.delete(f"{url}/shard-000003.tar")
    s = RankStream(m, cfg, build_codec("image").decode, 0, 1)
    assert sum(x["valid"] for b in s.iterate(max_epochs=1) for x in b) == 1797 - SPS and s.skipped == {3}


def test_missing_shard_is_named(copy_of):
    os.remove(os.path.join(copy_of, "shard-000005.tar"))
    with pytest.raises(DatasetError, match="shard-000005.tar: missing"):
        _stream_all(copy_of)


def test_manifest_of_unknown_version_or_missing_is_refused(copy_of, tmp_path):
    p = os.path.join(copy_of, "manifest.json")
    data = json.load(open(p))
    data["format_version"] = 99
    json.dump(data, open(p, "w"))
    with pytest.raises(DatasetError, match="unknown manifest format_version 99"):
        load_manifest(copy_of)
    with pytest.raises(DatasetError, match="cannot read its manifest"):
        load_manifest(str(tmp_path / "nothing-here"))
    open(p, "wb").write(b"\xff\xfe{}")
    with pytest.raises(DatasetError, match="manifest.json: not UTF-8 text, so not a manifest"):
        load_manifest(copy_of)
    data["format_version"] = FORMAT_VERSION  # a hand-edited codec: every reader after this took it for an object
    for key, bad in (("codec", "dct"), ("source", {"settings": {}}), ("codec", {"name": "dct", "settings": 3})):
        json.dump({**data, key: bad}, open(p, "w"))
        with pytest.raises(DatasetError, match=rf"field '{key}' must be an object with a 'name' and 'settings', "
                                               rf"got {re.escape(repr(bad))}"):
            load_manifest(copy_of)


def test_unknown_scheme_and_unreachable_s3_are_named(monkeypatch):
    with pytest.raises(DatasetError, match="ftp://x/y"):
        load_manifest("ftp://x/y")
    monkeypatch.setenv("DGM_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(DatasetError, match=r"s3://nobucket/ds.*(127.0.0.1:9|reach)"):
        load_manifest("s3://nobucket/ds")


def test_world_size_must_divide_partitions(digits):
    with pytest.raises(OrderError, match="does not divide data.stream.partitions"):
        rank_batches(digits, stream_cfg(global_batch=25), 0, 5)


def test_dct_prepare_records_each_sequence_length_and_rewrites_shards_without_them(tmp_path):
    import tarfile

    out = str(tmp_path / "dct")
    cfg = PrepareConfig(output=out, source="shapes", source_settings={"num_samples": 40, "resolution": 32},
                        codec="dct", codec_settings={"resolution": 32, "quality": 75}, samples_per_shard=16,
                        parallel=False)
    prepare_dataset(cfg, report=lambda _: None)
    m = load_manifest(out)
    codec = build_codec("dct", m.codec["settings"])
    read = []
    for shard in m.shards:
        with tarfile.open(os.path.join(out, shard.name)) as tar:
            for member in tar:
                if member.name.endswith(".dct"):
                    read.append(len(codec.decode({"dct": tar.extractfile(member).read()})["tokens"]))
    assert [len(s.lengths) for s in m.shards] == [16, 16, 8]
    assert m.sequence_lengths == read and len(set(read)) > 5
    assert m.extra["sequence_length"] == {"min": min(read), "mean": round(sum(read) / 40, 2), "max": max(read),
                                          "total": sum(read)}
    # preview.png: the first 36 scenes as the shards hold them (through the codec), 6 x 6 cells of 64 pixels
    preview = np.asarray(Image.open(os.path.join(out, "preview.png")))
    assert preview.shape == (6 * 66 + 2, 6 * 66 + 2, 3)
    first = build_source("shapes", m.source["settings"]).sample(0)
    stored = codec.decode_images([codec.decode(codec.encode(first))["tokens"]])[0]
    assert np.array_equal(preview[2:66:2, 2:66:2], stored)
    # a shard finished by a dgm that recorded no lengths is written again, not listed without them
    info_path = os.path.join(out, "shard-000001.tar.info.json")
    info = json.load(open(info_path))
    info["shard"]["lengths"] = []
    json.dump(info, open(info_path, "w"))
    lines: list[str] = []
    prepare_dataset(cfg, report=lines.append)
    assert "(2 already done)" in lines[0]
    assert load_manifest(out).sequence_lengths == read
    # the lengths sit on one line per shard; a manifest whose lengths are wrong is refused, naming the field
    p = os.path.join(out, "manifest.json")
    text = open(p).read()
    assert json.dumps(read[16:32], separators=(",", ":")) in text
    for i, bad, message in [
        (2, lambda v: v[:-1], r"shards\[2\].lengths must list one length per sample \(8\), got 7"),
        (1, lambda v: None, r"shards\[1\].lengths must be a list of ints"),
        (0, lambda v: [True] * len(v), r"shards\[0\].lengths must be positive ints"),
        (1, lambda v: [], r"shards\[1\].lengths is missing: every shard lists"),
    ]:
        data = json.loads(text)
        data["shards"][i]["lengths"] = bad(data["shards"][i]["lengths"])
        json.dump(data, open(p, "w"))
        with pytest.raises(DatasetError, match=message):
            load_manifest(out)
    # each shard's codec report (values clipped) is summed; a manifest from before reports reads as none
    data = json.loads(text)
    assert [shard["encoding"] for shard in data["shards"]] == [{"clipped_values": 0}] * 3
    for i, bad, message in [
        (1, [], r"shards\[1\].encoding must be an object"),
        (0, {"clipped_values": -1}, r"shards\[0\].encoding.clipped_values must be a count"),
        (2, {"clipped_values": 1.5}, r"shards\[2\].encoding.clipped_values must be a count"),
        (2, {"examples": "clipped"}, r"shards\[2\].encoding.examples must be a list of strings"),
    ]:
        data = json.loads(text)
        data["shards"][i]["encoding"] = bad
        json.dump(data, open(p, "w"))
        with pytest.raises(DatasetError, match=message):
            load_manifest(out)
    data = json.loads(text)
    for shard in data["shards"]:
        del shard["encoding"]
    json.dump(data, open(p, "w"))
    assert load_manifest(out).encoding == {}
    open(p, "w").write(text)
    assert load_manifest(out).encoding == {"clipped_values": 0}
    # a shard info whose lengths do not match its count is not reused: that shard is written again
    info = json.load(open(info_path))
    info["shard"]["lengths"] = info["shard"]["lengths"][:-2]
    json.dump(info, open(info_path, "w"))
    lines.clear()
    prepare_dataset(cfg, report=lines.append)
    assert "(2 already done)" in lines[0] and load_manifest(out).sequence_lengths == read


def test_image_folder_prepare_previews_photos_and_refuses_mixed_sizes(tmp_path):
    """Photos larger than a preview cell are fitted into it. Images of several sizes are refused for the image
    codec (the image models batch one shape; the manifest's image_shape would describe only the first) before any
    shard is written, and accepted once the source's resolution gives them one shape."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in [("wide.png", (160, 300, 3)), ("b.png", (160, 300, 3)), ("grey.png", (160, 300))]:
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(folder / name)
    out = str(tmp_path / "ds")
    prepare_dataset(PrepareConfig(output=out, source="image_folder", source_settings={"path": str(folder)},
                                  parallel=False), report=lambda _: None)
    assert load_manifest(out).total == 3 and load_manifest(out).extra["image_shape"] == [160, 300, 3]
    preview = np.asarray(Image.open(os.path.join(out, "preview.png")))
    assert preview.shape == (2 * 130 + 2, 2 * 130 + 2, 3)  # 2 x 2 cells of 128 pixels: every image fitted

    Image.fromarray(rng.integers(0, 255, (500, 90, 3), dtype=np.uint8)).save(folder / "tall.png")
    mixed = str(tmp_path / "mixed")
    with pytest.raises(ValueError, match=r"2 different sizes \(HxW 160x300, 500x90\).*resolution"):
        prepare_dataset(PrepareConfig(output=mixed, source="image_folder", source_settings={"path": str(folder)},
                                      parallel=False), report=lambda _: None)
    assert not os.path.exists(mixed)
    prepare_dataset(PrepareConfig(output=mixed, source="image_folder", parallel=False,
                                  source_settings={"path": str(folder), "resolution": 24}), report=lambda _: None)
    assert load_manifest(mixed).extra["image_shape"] == [24, 24, 3]
    # The DCT codec resizes by its size policy: a size it cannot serve (crop only shrinks) is refused up front,
    # not in the shard task that meets the file, after other shards were written.
    dct = str(tmp_path / "dct")
    with pytest.raises(ValueError, match=r"source images: size 500x90 \(HxW\) does not match the codec resolution "
                                         r"128x128 under size_policy='crop'"):
        prepare_dataset(PrepareConfig(output=dct, source="image_folder", source_settings={"path": str(folder)},
                                      codec="dct", codec_settings={"resolution": 128, "size_policy": "crop"},
                                      samples_per_shard=1, parallel=False), report=lambda _: None)
    assert not os.path.exists(dct)


def test_prepare_resumed_on_a_changed_folder_rewrites_every_shard(tmp_path):
    """A prepare cut short, resumed after files were added, must not keep shards of the old listing beside shards
    of the new one (duplicates and holes): the folder's listing is part of the plan's fingerprint."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("b", "c", "d"):
        Image.fromarray(np.full((4, 4, 3), ord(name), np.uint8)).save(folder / f"{name}.png")
    out = str(tmp_path / "ds")
    cfg = PrepareConfig(output=out, source="image_folder", source_settings={"path": str(folder)},
                        samples_per_shard=1, parallel=False)
    prepare_dataset(cfg, report=lambda _: None)
    os.remove(os.path.join(out, "manifest.json"))  # as if cut before the manifest, one shard short
    os.remove(os.path.join(out, "shard-000002.tar"))
    Image.fromarray(np.full((4, 4, 3), ord("a"), np.uint8)).save(folder / "a.png")
    lines: list[str] = []
    prepare_dataset(cfg, report=lines.append)
    assert "(0 already done)" in lines[0]
    m = load_manifest(out)
    keys = [x["key"] for batch in RankStream(m, stream_cfg(global_batch=1, partitions=1, shuffle_block=1),
                                              build_codec("image").decode, 0, 1).iterate(max_epochs=1)
            for x in batch]
    assert sorted(k[0] for k in keys) == ["a", "b", "c", "d"]


def test_prepare_names_a_codec_that_cannot_read_the_source(tmp_path):
    with pytest.raises(ValueError, match="codec 'tokens' cannot encode samples of source 'digits'"):
        _prepare(str(tmp_path / "ds"), codec="tokens",
                 codec_settings={"text_vocab": 64, "image_vocab": 64, "image_grid": [4, 4]})
    assert not os.path.exists(tmp_path / "ds")


def test_dct_prepare_of_upscaled_digits_has_luma_only(tmp_path):
    out = str(tmp_path / "digits-dct")
    prepare_dataset(PrepareConfig(output=out, source="digits", source_settings={"split": "all", "upscale": 2},
                                  codec="dct", codec_settings={"resolution": 16, "quality": 90},
                                  samples_per_shard=600, parallel=False), report=lambda _: None)
    m = load_manifest(out)
    assert m.total == 1797 and m.extra["image_shape"] == [16, 16, 1] and len(m.sequence_lengths) == 1797
    codec = build_codec("dct", m.codec["settings"])
    stream = RankStream(m, stream_cfg(global_batch=32), codec.decode, 0, 1)
    tokens = [x["tokens"] for x in next(iter(stream.iterate(max_epochs=1)))]
    body = [t[:-1] for t in tokens]
    # grey digits: every coefficient is luma (slots 0-3 of a macroblock); chroma, DC included, is exactly zero
    assert all(len(b) and (CHANNEL_SLOT[b[:, 0]] < 4).all() for b in body)


def _files(folder: str) -> dict[str, bytes]:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def test_prepare_refuses_to_write_over_a_different_dataset(tmp_path):
    """Another plan at the same output would break the complete data set there shard by shard: refused; with
    overwrite it is replaced whole, and the shards the new one does not list are removed."""
    out = str(tmp_path / "ds")
    _prepare(out)
    before = _files(out)
    bigger = PrepareConfig(output=out, source="digits", source_settings={"split": "all"}, samples_per_shard=300,
                           parallel=False)
    with pytest.raises(DatasetError, match=rf"^{out}: already holds a different data set \(1797 samples in 7 shards, "
                                           r"source 'digits', codec 'image'\).*--overwrite"):
        prepare_dataset(bigger, report=lambda _: None)
    assert _files(out) == before

    lines: list[str] = []
    prepare_dataset(dataclasses.replace(bigger, overwrite=True), report=lines.append)
    assert any("--overwrite: replacing a different data set (1797 samples in 7 shards" in line for line in lines)
    assert any("removed 2 shard files of an earlier data set" in line for line in lines)
    m = load_manifest(out)
    assert [s.name for s in m.shards] == [f"shard-{i:06d}.tar" for i in range(6)] and m.total == 1797
    assert sorted(n for n in os.listdir(out) if n.startswith("shard-000006")) == []
    assert len(global_batches(out, stream_cfg(), 1)[0]) == -(-1797 // 24)

    # the same plan again (this manifest records its fingerprint; an older one is matched through its shards' info)
    lines.clear()
    prepare_dataset(bigger, report=lines.append)
    assert any("6 already done" in line for line in lines)
    data = json.load(open(os.path.join(out, "manifest.json")))
    del data["extra"]["fingerprint"]
    json.dump(data, open(os.path.join(out, "manifest.json"), "w"))
    lines.clear()
    prepare_dataset(bigger, report=lines.append)
    assert any("6 already done" in line for line in lines)
    with pytest.raises(DatasetError, match="already holds a different data set"):
        _prepare(out)


def test_cached_shards_follow_a_rewrite_even_without_sha256_checks(s3_bucket, tmp_path):
    """The cache keys entries by the manifest's digest even when it does not verify it: a data set rewritten at
    the same URL is downloaded again, never served from the old copies."""
    url = f"{s3_bucket}/rewritten"
    _prepare(url)
    cfg = stream_cfg(cache_dir=str(tmp_path / "cache"), verify_sha256=False)
    first, _ = global_batches(url, cfg, 1)
    prepare_dataset(PrepareConfig(output=url, source="digits", source_settings={"split": "train"},
                                  samples_per_shard=SPS, parallel=False, overwrite=True), report=lambda _: None)
    again, _ = global_batches(url, cfg, 1)
    fresh, _ = global_batches(url, stream_cfg(cache_dir=str(tmp_path / "fresh")), 1)
    assert again == fresh and again != first


def test_skipping_a_shard_that_breaks_part_way_does_not_depend_on_workers_or_ranks(copy_of):
    """Which samples survive a shard that breaks in the middle is decided per partition and epoch: the same with
    any number of loader workers or ranks (a worker must not carry "this shard is bad" into other partitions)."""
    path = os.path.join(copy_of, "shard-000003.tar")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) * 2 // 3)
        f.write(b"\xff" * 4096)
    decode = build_codec("image").decode
    m = load_manifest(copy_of)

    def survivors(workers: int, world: int) -> list[str]:
        cfg = stream_cfg(on_corrupt="skip", verify_sha256=False, num_workers=workers)
        keys, skipped = [], set()
        for rank in range(world):
            s = RankStream(m, cfg, decode, rank, world)
            keys += [x["key"] for b in s.iterate(max_epochs=2) for x in b if x["valid"]]
            skipped |= s.skipped
        assert skipped == {3}
        return sorted(keys)

    readable = []  # shard 3's samples before the damage, read straight through
    with pytest.raises(DatasetError, match="shard-000003.tar: (corrupt or truncated at sample|holds)"):
        for raw in ShardOpener(m, stream_cfg(verify_sha256=False)).samples(3, 0):
            readable.append(raw["__key__"])
    alone = survivors(0, 1)
    assert 0 < len(readable) < SPS and 0 < 2 * 1797 - len(alone) < 2 * SPS
    assert all(alone.count(key) == 2 for key in readable)  # read in both epochs, wherever the partitions cut
    assert survivors(2, 1) == alone and survivors(0, 2) == alone


def test_a_resume_past_a_shard_that_broke_part_way_uses_what_the_uninterrupted_run_used(copy_of):
    """A resumed reader jumped to its block with the offset index, past the damage, and used samples the
    uninterrupted run had dropped with the rest of the shard (27 of 74 resume points differed)."""
    path = os.path.join(copy_of, "shard-000003.tar")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) * 2 // 3)
        f.write(b"\xff" * 4096)
    cfg = stream_cfg(on_corrupt="skip", verify_sha256=False)
    full, _ = global_batches(copy_of, cfg, 1)
    for batch in range(2, len(full), 6):
        resumed, _ = global_batches(copy_of, cfg, 1, StreamState(0, batch))
        assert resumed == full[batch:], batch


def test_prepare_refuses_an_unreadable_manifest_and_storage_errors(tmp_path, s3_bucket, flaky_s3):
    """What cannot be read is not known to be replaceable: a manifest of a newer format or a damaged one is
    refused without --overwrite; access denied is an error, never taken for "nothing there"."""
    out = str(tmp_path / "ds")
    _prepare(out)
    manifest = os.path.join(out, "manifest.json")
    data = json.load(open(manifest))
    data["format_version"] = 99
    json.dump(data, open(manifest, "w"))
    storage.write_bytes(os.path.join(out, "tokenizer.model"), b"an older data set's tokenizer")
    before = _files(out)
    with pytest.raises(DatasetError, match=r"already holds a manifest this dgm cannot read \(.*format_version 99"):
        _prepare(out)
    assert _files(out) == before
    lines: list[str] = []
    prepare_dataset(PrepareConfig(output=out, source="digits", source_settings={"split": "all"},
                                  samples_per_shard=SPS, parallel=False, overwrite=True), report=lines.append)
    assert any("--overwrite: replacing a manifest this dgm cannot read" in line for line in lines)
    assert load_manifest(out).total == 1797 and not os.path.exists(os.path.join(out, "tokenizer.model"))

    url = f"{s3_bucket}/denied-prepare"
    _prepare(url)
    flaky_s3.fail_next(10**6, status=403)
    with pytest.raises(StorageError, match="access denied"):
        prepare_dataset(PrepareConfig(output=url, source="digits", source_settings={"split": "train"},
                                      samples_per_shard=SPS, parallel=False, overwrite=True), report=lambda _: None)
    flaky_s3.reset()
    assert load_manifest(url).total == 1797


def test_prepare_refuses_another_tools_shards_without_overwrite(tmp_path, s3_bucket):
    """A folder of WebDataset shards some other tool wrote, named shard-NNNNNN.tar, had its shards overwritten and
    the rest deleted as leftovers, without --overwrite, because it held no manifest."""
    import webdataset as wds

    for out in (str(tmp_path / "foreign"), f"{s3_bucket}/foreign"):
        local = str(tmp_path / "written")
        os.makedirs(local, exist_ok=True)
        with wds.ShardWriter(os.path.join(local, "shard-%06d.tar"), maxcount=10, verbose=0) as w:
            for i in range(30):
                w.write({"__key__": f"k{i:03d}", "txt": "theirs"})
        for name in sorted(os.listdir(local)):
            storage.upload_file(os.path.join(local, name), storage.join(out, name))
        before = {name: storage.read_bytes(storage.join(out, name)) for name in sorted(os.listdir(local))}
        with pytest.raises(DatasetError, match=rf"^{out}: holds 3 shard file\(s\) that no dgm job wrote \(e.g. "
                                               r"shard-000000.tar, .*pass --overwrite"):
            _prepare(out)
        assert {name: storage.read_bytes(storage.join(out, name)) for name in before} == before
    lines: list[str] = []
    prepare_dataset(PrepareConfig(output=out, source="digits", source_settings={"split": "train"},
                                  samples_per_shard=SPS, parallel=False, overwrite=True), report=lines.append)
    assert any("--overwrite: replacing 3 shard file(s) no dgm job wrote" in line for line in lines)
    assert load_manifest(out).total > 0


def test_a_bad_file_met_in_a_ray_shard_task_is_raised_as_itself(tmp_path, ray_local):
    """A file that passes a header-only scan but cannot be decoded fails its shard task; the user sees that
    error (BadImageError naming the file), not Ray's wrapper with the remote traceback."""
    from data_pipeline.sources.image_folder import BadImageError

    folder = tmp_path / "photos"
    folder.mkdir()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "a.jpg")
    (folder / "b.jpg").write_bytes((folder / "a.jpg").read_bytes()[:2000])
    with pytest.raises(BadImageError, match="b.jpg: cannot decode image") as caught:
        prepare_dataset(PrepareConfig(output=str(tmp_path / "ds"), source="image_folder", samples_per_shard=1,
                                      source_settings={"path": str(folder), "verify": "header"}),
                        report=lambda _: None)
    assert type(caught.value) is BadImageError and "Traceback" not in str(caught.value)


def test_prepare_progress_rates_only_this_runs_shards(monkeypatch):
    """Shards an earlier run finished count toward the total, not the rate (a re-run printed 3,105,592 shards/s)."""
    import data_pipeline.prepare as prepare

    clock = iter([100.0, 102.0])
    monkeypatch.setattr(prepare.time, "monotonic", lambda: next(clock))
    lines: list[str] = []
    progress = prepare.Progress(10, "prepare shards", lines.append, every_s=0, done=7)
    progress.update()
    assert lines == ["[prepare shards] 8/10 (80%) 0.50/s ETA 4s"]


def test_a_micro_batch_whose_samples_were_all_skipped_is_one_invalid_stand_in(copy_of):
    """One partition per rank and big shuffle blocks: a block often lies inside the corrupt shard, and its rank got
    an empty micro-batch, which no family can collate (np.stack of nothing) and which would leave the step."""
    path = os.path.join(copy_of, "shard-000004.tar")
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(b"\xff" * 64)
    m = load_manifest(copy_of)
    cfg = stream_cfg(global_batch=24, partitions=12, shuffle_block=256, seed=0, drop_last=True, on_corrupt="skip")
    stand_ins, real = 0, set()
    for rank in range(12):
        for batch in RankStream(m, cfg, build_codec("image").decode, rank, 12).iterate(max_epochs=1):
            assert batch, rank
            if len(batch) == 1 and not batch[0]["valid"]:
                stand_ins += 1
            real |= {x["key"] for x in batch if x["valid"]}
    assert stand_ins > 0  # the layout above does produce them
    first, last = m.shards[4].first_index, m.shards[4].first_index + m.shards[4].count
    assert not any(first <= int(key.rsplit("-", 1)[-1]) < last for key in real)  # nothing of shard 4 counted

"""The streaming data path under stress: exact resume of the global RNG, a shard cache shared with other processes
(evictions mid-download, between fetch and open), exhausted transfer retries, bad manifest indexes, file:// forms."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from data_pipeline import s3, storage
from data_pipeline.codecs import build_codec
from data_pipeline.manifest import DatasetError, Manifest, ShardInfo, load_manifest, parse_manifest
from data_pipeline.shard_cache import ChecksumMismatchError, ShardCache
from data_pipeline.storage import StorageError, StorageNotFoundError, configure_s3
from data_pipeline.stream import RankStream, ShardOpener, ShardUnavailableError, StreamConfig
from tests.fixtures_s3 import FlakyS3Proxy
from tests.test_stream import _prepare, rank_batches, stream_cfg


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("digits"))
    _prepare(out)
    return out


@pytest.fixture
def s3_settings() -> Iterator[Callable[..., None]]:
    """Change process-wide S3Settings fields for one test; the previous settings come back afterwards."""
    before = s3.current_settings()
    yield lambda **changes: configure_s3(dataclasses.replace(before, **changes))
    configure_s3(before)


def _big_tar_shard(url: str, size: int) -> Manifest:
    """A one-sample shard of ``size`` random bytes at ``url`` (big enough for boto3's multipart transfer)."""
    data = os.urandom(size)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        member = tarfile.TarInfo("sample0.bin")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    blob = buf.getvalue()
    storage.write_bytes(url, blob)
    base, name = url.rsplit("/", 1)
    info = ShardInfo(name, 1, len(blob), hashlib.sha256(blob).hexdigest(), 0)
    return Manifest(source={}, codec={}, shards=[info], url=base)


def _while_running(work: Callable[[], object], meanwhile: Callable[[], None]) -> dict[str, object]:
    """Run ``work`` in a thread, calling ``meanwhile`` in a loop until it ends; its result or error."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["result"] = work()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    while t.is_alive():
        meanwhile()
        time.sleep(0.005)
    t.join()
    return out


def test_loader_workers_do_not_draw_from_the_global_rng(digits):
    """Starting a DataLoader with workers draws a base seed; from torch's global RNG that draw would happen before
    step 1 in an unbroken run but after the checkpoint's RNG state was restored in a resumed one."""
    m = load_manifest(digits)
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    s = RankStream(m, stream_cfg(num_workers=2), build_codec("image").decode, 0, 1)
    batches = s.iterate(max_epochs=1)
    assert next(batches)
    batches.close()
    assert torch.equal(torch.random.get_rng_state(), before)


def test_a_download_in_progress_is_never_an_entry_so_never_evicted(s3_bucket, s3_settings, tmp_path):
    """boto3's transfer manager writes '<dest>.<8 hex>' while downloading: another process sharing the cache must
    neither count nor evict it, and a healthy shard must then not be reported missing (nor skipped)."""
    s3_settings(multipart_threshold=1 << 20, multipart_chunksize=5 << 20, max_concurrency=1)
    m = _big_tar_shard(f"{s3_bucket}/ds/shard-000000.tar", 20 << 20)
    cache_dir = str(tmp_path / "cache")
    opener = ShardOpener(m, StreamConfig(cache_dir=cache_dir, cache_max_bytes=1 << 20, on_corrupt="skip"))
    other = ShardCache(cache_dir, 1 << 20)  # another rank's view of the same cache folder
    final = other.path_for(m.shard_url(0), m.shards[0].sha256)
    listed: list[str] = []

    def evict() -> None:  # the finished entry itself may go once opened: the open file stays readable
        listed.extend(os.path.basename(p) for _, _, p in other.entries() if p != final)
        other.evict()

    out = _while_running(lambda: next(opener.samples(0, 0)), evict)
    assert "error" not in out, out
    assert out["result"]["__key__"] == "sample0" and len(out["result"]["bin"]) == 20 << 20
    assert listed == [], f"in-progress download listed as a cache entry: {sorted(set(listed))}"


def test_a_download_whose_local_file_vanishes_is_not_reported_missing_from_storage(s3_bucket, s3_settings, tmp_path):
    s3_settings(multipart_threshold=1 << 20, multipart_chunksize=5 << 20, max_concurrency=1)
    url = f"{s3_bucket}/big.bin"
    storage.write_bytes(url, os.urandom(20 << 20))
    folder = tmp_path / "dl"
    folder.mkdir()

    def delete_everything() -> None:
        for name in os.listdir(folder):
            try:
                os.unlink(folder / name)
            except FileNotFoundError:
                pass

    out = _while_running(lambda: storage.download_file(url, str(folder / "big.bin")), delete_everything)
    err = out.get("error")
    assert isinstance(err, StorageError) and not isinstance(err, StorageNotFoundError), repr(err)
    assert str(err).startswith(f"{folder / 'big.bin'}: the download's partial file") and "vanished" in str(err)


def test_exhausted_transfer_retries_name_the_url_and_the_last_error(flaky_s3: FlakyS3Proxy, s3_bucket, s3_settings,
                                                                     tmp_path):
    url = f"{s3_bucket}/big.bin"
    storage.write_bytes(url, os.urandom(6 << 20))
    s3_settings(multipart_threshold=1 << 20, max_attempts=2)
    flaky_s3.drop_next_gets(1000)  # every body read is cut: s3transfer retries, then gives up
    with pytest.raises(StorageError, match=rf"^{url}: S3 transfer from {flaky_s3.endpoint_url} gave up after 2 "
                                           r"attempts, the last one failing with: .+") as info:
        storage.download_file(url, str(tmp_path / "d" / "big.bin"))
    assert not isinstance(info.value, StorageNotFoundError)
    assert os.listdir(tmp_path / "d") == []  # no partial file left


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d, s: s["offsets"].__setitem__(1, s["offsets"][2]),
         r"shards\[0\] \(shard-000000.tar\): field 'offsets' must be strictly increasing, but offsets\[2\]="),
        (lambda d, s: s["offsets"].__setitem__(0, 512),
         r"shards\[0\] \(shard-000000.tar\): field 'offsets' must start at 0 \(the first sample\), got 512"),
        (lambda d, s: s["offsets"].__setitem__(-1, s["bytes"]),
         r"shards\[0\] \(shard-000000.tar\): field 'offsets' has offsets\[16\]=\d+, not below the shard's size"),
        (lambda d, s: s["offsets"].__setitem__(1, -512),
         r"shards\[0\] \(shard-000000.tar\): field 'offsets' must be strictly increasing"),
        (lambda d, s: s["offsets"].__setitem__(1, s["offsets"][1] + 1),
         r"shards\[0\] \(shard-000000.tar\): field 'offsets' has offsets\[1\]=\d+, not a tar header position"),
        (lambda d, s: s["offsets"].__setitem__(1, "1024"),
         r"shards\[0\] \(shard-000000.tar\): field 'offsets' must be a list of ints"),
        (lambda d, s: s["offsets"].pop(),
         r"shards\[0\] \(shard-000000.tar\): field 'offsets' lists 16 positions; 257 samples at "
         r"extra.index_stride=16 need 17"),
        (lambda d, s: d["extra"].__setitem__("index_stride", 0), r"extra.index_stride must be a positive int, got 0"),
        (lambda d, s: d["extra"].__setitem__("index_stride", "16"),
         r"extra.index_stride must be a positive int, got '16'"),
        # a shard listed twice read its samples twice an epoch and another's never (an edited manifest)
        (lambda d, s: d["shards"].__setitem__(1, {**s, "first_index": 257}),
         r"shard 'shard-000000.tar' is listed twice: its samples would be read twice an epoch"),
        (lambda d, s: d["shards"][2].__setitem__("first_index", 600),
         r"shards\[2\].first_index is 600, but the shards before it hold 514 samples"),
        (lambda d, s: s.__setitem__("sha256", s["sha256"].upper()),
         r"shards\[0\].sha256 must be 64 lower-case hex digits"),
    ],
)
def test_manifest_refuses_a_bad_seek_index(digits, change, problem):
    url = os.path.join(digits, "manifest.json")
    data = json.loads(open(url).read())
    assert parse_manifest(json.dumps(data), url).shards[0].offsets == data["shards"][0]["offsets"]
    change(data, data["shards"][0])
    with pytest.raises(DatasetError, match=rf"^{url}: {problem}"):
        parse_manifest(json.dumps(data), url)


@pytest.mark.parametrize("form", ["file://{}", "file://localhost{}", "FILE://{}"])
def test_local_shards_open_under_every_file_url_form(digits, form):
    m = load_manifest(form.format(digits))
    plain = ShardOpener(load_manifest(digits), StreamConfig())
    assert next(ShardOpener(m, StreamConfig()).samples(0, 17))["__key__"] == next(plain.samples(0, 17))["__key__"]


def test_an_entry_evicted_between_fetch_and_open_is_fetched_again(digits, s3_bucket, tmp_path, monkeypatch):
    url = f"{s3_bucket}/digits"
    storage.upload_dir(digits, url)
    m = load_manifest(url)
    fetch = ShardCache.fetch
    evicted: list[str] = []

    def fetch_then_evicted(self: ShardCache, *args, **kwargs) -> str:
        path = fetch(self, *args, **kwargs)
        if not evicted:  # another process evicts the entry before this one opens it
            os.unlink(path)
            evicted.append(path)
        return path

    monkeypatch.setattr(ShardCache, "fetch", fetch_then_evicted)
    opener = ShardOpener(m, StreamConfig(cache_dir=str(tmp_path / "cache")))
    expected = next(ShardOpener(load_manifest(digits), StreamConfig()).samples(0, 0))["__key__"]
    assert next(opener.samples(0, 0))["__key__"] == expected and evicted


def test_an_entry_cached_without_verification_is_checked_before_a_verified_fetch(s3_bucket, tmp_path):
    url = f"{s3_bucket}/shard-000000.tar"
    good = os.urandom(10_000)
    digest = hashlib.sha256(good).hexdigest()
    storage.write_bytes(url, good)
    cache = ShardCache(str(tmp_path / "cache"), max_bytes=1 << 20)
    unchecked = cache.fetch(url, digest, verify=False)
    with open(unchecked, "r+b") as f:  # damaged on disk after an unverified download (or a bad download)
        f.write(b"\0" * 100)
    path = cache.fetch(url, digest)
    assert open(path, "rb").read() == good  # checked, found bad, downloaded again
    assert cache.fetch(url, digest, verify=False) == path  # verified copies serve unverified fetches too

    other = f"{s3_bucket}/shard-000001.tar"
    storage.write_bytes(other, b"not what the manifest says")
    cache.fetch(other, digest, verify=False)  # served unchecked, as asked
    with pytest.raises(ChecksumMismatchError, match=rf"^{other}: sha256 mismatch: expected {digest}"):
        cache.fetch(other, digest)
    assert cache.total_bytes() == len(good)  # the unverified bad copy is gone


def test_cache_entries_are_only_names_of_finished_downloads(s3_bucket, tmp_path):
    """Temporary files (a download by an older dgm, or boto3's '<dest>.<8 hex>') are not entries: never counted
    nor evicted, and deleted only once untouched for an hour."""
    url = f"{s3_bucket}/s.tar"
    storage.write_bytes(url, os.urandom(1000))
    cache = ShardCache(str(tmp_path / "cache"), max_bytes=2000)
    entry = cache.fetch(url)
    data = tmp_path / "cache" / "data"
    fresh, stale = data / ".x.tar.0123456789ab.tmp.AbCd1234", data / f"{'0' * 40}-x.tar.0123456789ab.tmp"
    for f in (fresh, stale):
        f.write_bytes(os.urandom(5000))
    os.utime(stale, (1, 1))
    assert [p for _, _, p in cache.entries()] == [entry] and cache.evict() == []
    assert fresh.exists() and not stale.exists()


def test_a_disk_read_error_is_not_taken_for_a_corrupt_shard(digits, monkeypatch):
    """EIO half-way through a local shard: always an error, never skipped as corrupt (on_corrupt=skip skipped it)."""
    import errno
    import io

    m = load_manifest(digits)
    opener = ShardOpener(m, StreamConfig(on_corrupt="skip", verify_sha256=False))
    data = open(os.path.join(digits, m.shards[0].name), "rb").read()

    class FailingDisk(io.BytesIO):
        def read(self, n: int = -1) -> bytes:
            if self.tell() > len(data) // 2:
                raise OSError(errno.EIO, "Input/output error")
            return super().read(n)

    monkeypatch.setattr(opener, "_open", lambda i: FailingDisk(data))
    with pytest.raises(ShardUnavailableError, match=r"shard-000000.tar: cannot be read at sample \d+ of 257 "
                                                     r"\(Input/output error\)"):
        list(opener.samples(0, 0))


def test_a_local_shard_replaced_during_the_run_is_checked_again(digits, tmp_path, monkeypatch):
    """The sha256 of a local shard was checked at its first open only: a shard rewritten while the run went on (a
    `dgm prepare --overwrite` into its folder) was read against the manifest's counts, duplicating or dropping
    samples without a word. An unchanged file is not hashed again."""
    import hashlib as hashlib_module
    import shutil

    data = str(tmp_path / "digits")
    shutil.copytree(digits, data)
    opener = ShardOpener(load_manifest(data), StreamConfig())
    hashed = []
    digest = hashlib_module.file_digest
    monkeypatch.setattr(hashlib_module, "file_digest", lambda f, name: hashed.append(name) or digest(f, name))
    first = [s["__key__"] for s in opener.samples(1, 0)]
    assert [s["__key__"] for s in opener.samples(1, 0)] == first and len(hashed) == 1
    for replace in (shutil.copyfile, lambda a, b: (shutil.copyfile(a, b + ".new"), os.replace(b + ".new", b))):
        replace(os.path.join(data, "shard-000002.tar"), os.path.join(data, "shard-000001.tar"))
        with pytest.raises(DatasetError, match=r"shard-000001.tar: sha256 mismatch \(changed since this run first "
                                               r"read it\)"):
            next(opener.samples(1, 0))
        shutil.copyfile(os.path.join(digits, "shard-000001.tar"), os.path.join(data, "shard-000001.tar"))
        assert [s["__key__"] for s in opener.samples(1, 0)] == first  # put back: read again


def test_a_shard_holding_more_samples_than_its_manifest_says_is_refused(digits, tmp_path):
    """The reader stops after the manifest's count, so a count too small (or an index offset pointing at an
    earlier sample) dropped samples silently; the check meant for it ran only when the count was too large."""
    import shutil

    data = str(tmp_path / "digits")
    shutil.copytree(digits, data)
    url = os.path.join(data, "manifest.json")
    manifest = json.loads(open(url).read())
    last = manifest["shards"][-1]
    held = last["count"]
    last["count"] -= 1
    del last["labels"]  # (the manifest's own check would find 1 labelled sample too many)
    open(url, "w").write(json.dumps(manifest))
    opener = ShardOpener(load_manifest(data), StreamConfig())
    with pytest.raises(DatasetError, match=rf"{last['name']}: holds more samples than the manifest's {held - 1} "
                                           r"\(\S+ follows its last"):
        list(opener.samples(len(manifest["shards"]) - 1, 0))
    with pytest.raises(DatasetError, match=r"holds more samples than the manifest's"):
        rank_batches(data, stream_cfg(), 0, 1)


def test_a_loader_workers_data_error_reaches_the_rank_as_itself(digits, tmp_path):
    """With data.stream.num_workers > 0 the user read torch's 'Caught DatasetError in DataLoader worker process 1'
    and 30 lines of the worker's traceback instead of the one line a loader without workers gives."""
    import shutil

    data = str(tmp_path / "digits")
    shutil.copytree(digits, data)
    os.remove(os.path.join(data, "shard-000004.tar"))
    with pytest.raises(DatasetError) as caught:
        rank_batches(data, stream_cfg(num_workers=2), 0, 1)
    assert str(caught.value) == f"shard {data}/shard-000004.tar: missing (listed in the manifest, not on disk)"

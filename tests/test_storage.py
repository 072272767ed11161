"""storage.py against the real thing: local disk, moto's S3 server, and a proxy that injects 500s and cut connections."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest

from data_pipeline import s3, scratch, storage
from data_pipeline.storage import (
    BucketNotFoundError,
    ShardCache,
    StorageError,
    StorageNotFoundError,
    configure_s3,
)
from tests.fixtures_s3 import FlakyS3Proxy, free_port
from trainer.checkpoint import CheckpointMeta, CheckpointStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def s3_settings() -> Iterator[Callable[..., None]]:
    """Change process-wide S3Settings fields for one test; the previous settings come back afterwards."""
    before = s3.current_settings()
    yield lambda **changes: configure_s3(dataclasses.replace(before, **changes))
    configure_s3(before)


@pytest.fixture(params=["path", "file", "s3"])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    """A folder URL of each kind: plain path, file:// URL, s3://bucket/prefix."""
    if request.param == "path":
        return str(tmp_path / "root")
    if request.param == "file":
        return f"file://{tmp_path}/root"
    return request.getfixturevalue("s3_bucket") + "/root"


def _raw(url: str) -> tuple[object, str, str]:
    bucket, key = s3.split_url(url, need_key=False)
    return boto3.client("s3", endpoint_url=os.environ["DGM_S3_ENDPOINT_URL"]), bucket, key


def test_unknown_scheme_names_url() -> None:
    for call in (
        storage.read_bytes,
        storage.exists,
        storage.is_remote,
        lambda u: storage.write_bytes(u, b"x"),
    ):
        with pytest.raises(StorageError, match=r"gs://bucket/key: unknown scheme 'gs'"):
            call("gs://bucket/key")


def test_an_s3_scheme_not_in_lower_case_is_refused() -> None:
    """Listings come back as s3://, so under S3:// the output checks saw an empty folder: a prepare wrote over
    another tool's shards there."""
    for call in (storage.exists, storage.list_prefix, lambda u: storage.write_bytes(u, b"x")):
        with pytest.raises(StorageError, match=r"S3://bucket/key: write the scheme in lower case, s3:// \(not S3"):
            call("S3://bucket/key")


@pytest.mark.parametrize("url", ["s3:/bucket/ckpt", "S3:bucket", "file:/tmp/x"])
def test_a_url_missing_a_slash_is_refused_not_taken_for_a_local_folder(url, tmp_path, monkeypatch) -> None:
    """`checkpoint_root=s3:/bucket/ckpt` used to train a whole run into a local folder named 's3:'."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match=rf"{url}/x: looks like a .*:// URL with a slash missing"):
        storage.write_bytes(f"{url}/x", b"x")
    assert not os.listdir(tmp_path)
    assert not storage.is_remote("s3-notes/x") and not storage.is_remote("C:/data")


def test_join_and_kinds() -> None:
    assert storage.join("s3://b", "run", "/ckpt/", "x.pt") == "s3://b/run/ckpt/x.pt"
    assert storage.join("s3://b/run/", "x") == "s3://b/run/x"
    assert storage.join("file:///tmp/a", "b") == "file:///tmp/a/b"
    assert storage.join("/tmp/a", "b", "c") == "/tmp/a/b/c"
    with pytest.raises(StorageError, match="no bucket name"):
        storage.join("s3://", "x")
    assert (
        storage.is_remote("s3://b/k") and not storage.is_remote("/x") and not storage.is_remote("file:///x")
    )
    assert storage.local_path("file://localhost/tmp/x") == "/tmp/x"
    with pytest.raises(StorageError, match="only local files"):
        storage.local_path("file://otherhost/tmp/x")


def test_storage_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(StorageNotFoundError("s3://b/k", "not found")))
    assert (
        isinstance(err, StorageNotFoundError) and str(err) == "s3://b/k: not found" and err.url == "s3://b/k"
    )


def test_round_trips(root: str, tmp_path) -> None:
    data = os.urandom(100_000)
    a = storage.join(root, "a.bin")
    storage.write_bytes(a, data)
    storage.write_bytes(storage.join(root, "sub", "b.txt"), b"hello")
    assert storage.read_bytes(a) == data
    assert storage.size(a) == len(data) and storage.exists(a) and storage.exists(root)
    assert not storage.exists(storage.join(root, "nope")) and not storage.exists(root + "x")
    with storage.open_read(a) as f:
        assert f.read(10) == data[:10] and f.read() == data[10:]
    assert storage.sha256_of(a) == hashlib.sha256(data).hexdigest()
    assert storage.list_prefix(root) == [storage.join(root, "a.bin"), storage.join(root, "sub", "b.txt")]

    local = tmp_path / "local"
    storage.download_file(a, local / "a.bin")  # local paths may be os.PathLike
    assert (local / "a.bin").read_bytes() == data
    storage.upload_file(str(local / "a.bin"), storage.join(root, "copy.bin"))
    assert storage.read_bytes(storage.join(root, "copy.bin")) == data

    storage.download_dir(root, str(tmp_path / "dl"))
    assert (tmp_path / "dl" / "sub" / "b.txt").read_bytes() == b"hello"
    storage.upload_dir(str(tmp_path / "dl"), storage.join(root, "mirror"))
    assert storage.list_prefix(storage.join(root, "mirror")) == [
        storage.join(root, "mirror", name) for name in ("a.bin", "copy.bin", "sub/b.txt")
    ]

    storage.delete(a)
    storage.delete(a)  # already gone: not an error
    assert not storage.exists(a)
    storage.delete_prefix(storage.join(root, "mirror"))
    assert storage.list_prefix(root) == [storage.join(root, "copy.bin"), storage.join(root, "sub", "b.txt")]
    storage.delete_prefix(root)
    assert storage.list_prefix(root) == [] and not storage.exists(root)


def test_missing_is_not_found(root: str, tmp_path) -> None:
    url = storage.join(root, "missing.bin")
    for call in (storage.read_bytes, storage.size, storage.sha256_of, lambda u: storage.open_read(u).read()):
        with pytest.raises(StorageNotFoundError, match=rf"^{url}: not found"):
            call(url)
    target = tmp_path / "t.bin"
    target.write_bytes(b"keep")
    with pytest.raises(StorageNotFoundError, match="not found"):
        storage.download_file(url, str(target))
    assert target.read_bytes() == b"keep" and os.listdir(tmp_path) == ["t.bin"]
    with pytest.raises(StorageNotFoundError, match="no files below"):
        storage.download_dir(root, str(tmp_path / "d"))
    with pytest.raises(StorageNotFoundError, match="not found"):
        storage.upload_file(str(tmp_path / "absent"), url)


def test_missing_bucket_is_reported_not_taken_for_empty(s3_server: str, tmp_path) -> None:
    for url in ("s3://no-such-bucket-x/k", "s3://no-such-bucket-x", "s3://no-such-bucket-x/run/"):
        with pytest.raises(BucketNotFoundError, match=rf"^{url}: bucket not found at {s3_server}"):
            storage.exists(url)
    # HEAD answers carry no error body: a vanished bucket must not read as a missing object (or shard)
    for call in (storage.size, s3.head, lambda u: storage.download_file(u, str(tmp_path / "x"))):
        with pytest.raises(BucketNotFoundError, match="bucket not found"):
            call("s3://no-such-bucket-x/shard-000000.tar")
    with pytest.raises(BucketNotFoundError, match="bucket not found"):
        ShardCache(str(tmp_path / "cache"), 1 << 20).fetch("s3://no-such-bucket-x/shard-000000.tar")
    with pytest.raises(BucketNotFoundError, match=r"s3://no-such-bucket-x/k: bucket not found"):
        storage.write_bytes("s3://no-such-bucket-x/k", b"x")
    # a resuming run must not see "no checkpoint yet" and start over at step 0
    with pytest.raises(BucketNotFoundError, match=r"no-such-bucket-x/run/latest: bucket not found"):
        CheckpointStore("s3://no-such-bucket-x/run").latest()
    with pytest.raises(StorageError, match="no object key"):
        storage.read_bytes("s3://bucket-only")


def test_a_profile_this_host_lacks_is_named_not_a_botocore_traceback(s3_bucket: str, tmp_path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """What a node sees when it is handed a laptop's AWS_PROFILE: boto3's ProfileNotFound, deep in a worker."""
    url = storage.join(s3_bucket, "x.bin")
    storage.write_bytes(url, b"x")  # a client made before the profile was set is not reused after it
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws here
    monkeypatch.setenv("AWS_PROFILE", "laptop-sso")
    with pytest.raises(StorageError, match=r"AWS_PROFILE='laptop-sso' names no profile in the AWS config of host "
                                           r".*: unset it to use this host's default credentials"):
        storage.read_bytes(url)
    monkeypatch.delenv("AWS_PROFILE")
    assert storage.read_bytes(url) == b"x"


def test_local_write_is_atomic(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.bin"
    storage.write_bytes(str(target), b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(StorageError, match=rf"{target}: Input/output error"):
        storage.write_bytes(str(target), b"new" * 1000)
    with pytest.raises(StorageError):
        storage.download_file(str(target), str(tmp_path / "copy.bin"))
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temporary file left behind


def test_download_refuses_escaping_keys(s3_bucket: str, tmp_path) -> None:
    client, bucket, _ = _raw(s3_bucket)
    client.put_object(Bucket=bucket, Key="run/../../evil.txt", Body=b"x")
    if not any(u.endswith("../evil.txt") for u in storage.list_prefix(s3_bucket + "/run")):
        pytest.skip("this moto version normalizes '..' in keys")
    with pytest.raises(StorageError, match=r"unsafe object name"):
        storage.download_dir(s3_bucket + "/run", str(tmp_path / "d"))
    assert not (tmp_path / "evil.txt").exists()


def test_unreachable_endpoint_fails_fast(s3_settings) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    s3_settings(endpoint_url=endpoint, max_attempts=2, connect_timeout=1, read_timeout=1)
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.read_bytes("s3://bucket/key")
    assert time.monotonic() - start < 5
    assert "s3://bucket/key" in str(info.value) and f"cannot reach S3 endpoint {endpoint}" in str(info.value)


def test_silent_endpoint_times_out_and_says_so_at_its_first_timeout(s3_settings, capsys, monkeypatch) -> None:
    """Each try waits read_timeout (60 s by default, 8 tries): minutes of silence before the error, unless said."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")  # signed requests need some: the store never reads them
    with socket.socket() as listener:  # accepts connections (kernel backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        s3_settings(endpoint_url=endpoint, max_attempts=2, connect_timeout=1, read_timeout=1)
        start = time.monotonic()
        with pytest.raises(StorageError, match=rf"s3://bucket/key: cannot reach S3 endpoint {endpoint}"):
            storage.exists("s3://bucket/key")
        assert time.monotonic() - start < 8
        err = capsys.readouterr().err
        assert err.count(f"[s3] {endpoint} did not answer in time (ReadTimeoutError); retrying, up to 2 tries "
                         "of 1 s each") == 1


def test_500s_are_retried_transparently(flaky_s3: FlakyS3Proxy, s3_bucket: str, tmp_path) -> None:
    url = s3_bucket + "/data.bin"
    data = os.urandom(300_000)
    flaky_s3.fail_next(3)
    storage.write_bytes(url, data)
    assert flaky_s3.errors_injected == 3
    flaky_s3.fail_next(3)
    assert storage.read_bytes(url) == data
    flaky_s3.fail_next(2)
    assert storage.list_prefix(s3_bucket) == [url]
    flaky_s3.fail_next(2)
    storage.download_file(url, str(tmp_path / "d.bin"))
    assert (tmp_path / "d.bin").read_bytes() == data
    assert flaky_s3.errors_injected == 10
    assert sum(r.outcome == "error" for r in flaky_s3.requests) == 10


def test_persistent_500s_become_a_clear_error(flaky_s3: FlakyS3Proxy, s3_bucket: str, s3_settings) -> None:
    s3_settings(max_attempts=2)
    flaky_s3.fail_next(100)
    with pytest.raises(
        StorageError, match=rf"{s3_bucket}/k: S3 error InternalError at {flaky_s3.endpoint_url}"
    ):
        storage.write_bytes(s3_bucket + "/k", b"x")
    assert flaky_s3.errors_injected == 2


def test_failed_uploads_name_the_object_and_why(flaky_s3: FlakyS3Proxy, s3_bucket: str, s3_settings,
                                               tmp_path) -> None:
    """Uploads go through boto3's transfer manager, whose failures (single or multipart) must read like the
    other storage errors: the URL, then what S3 said, never a bare transfer exception."""
    small, big = tmp_path / "small.bin", tmp_path / "big.bin"
    small.write_bytes(b"x" * 100)
    big.write_bytes(os.urandom(12 << 20))  # above the multipart threshold
    with pytest.raises(BucketNotFoundError, match=r"^s3://no-such-bucket-x/k: bucket not found"):
        storage.upload_file(str(small), "s3://no-such-bucket-x/k")
    s3_settings(max_attempts=2)
    for src in (small, big):
        flaky_s3.fail_next(1000)
        url = f"{s3_bucket}/{src.name}"
        with pytest.raises(StorageError, match=rf"^{url}: .*(InternalError|500)"):
            storage.upload_file(str(src), url)
        flaky_s3.reset()
        assert not storage.exists(url)  # nothing half-written is visible


def test_dropped_connection_resumes_exactly(flaky_s3: FlakyS3Proxy, s3_bucket: str, tmp_path) -> None:
    url = s3_bucket + "/big.bin"
    data = os.urandom(3 << 20)
    storage.write_bytes(url, data)
    flaky_s3.drop_next_gets(3, after_bytes=700_000)
    assert storage.read_bytes(url) == data
    assert flaky_s3.drops_injected == 3
    gets = [r for r in flaky_s3.requests if r.method == "GET" and r.path.endswith("/big.bin")]
    offsets = [int(r.range.split("=")[1].rstrip("-")) for r in gets[1:]]
    assert gets[0].range is None and len(offsets) == 3
    assert (
        0 < offsets[0] < offsets[1] < offsets[2] < len(data)
    )  # each retry resumes where the last one stopped

    for read in (
        lambda: storage.open_read(url).read(),
        lambda: (storage.download_file(url, str(tmp_path / "d.bin")), (tmp_path / "d.bin").read_bytes())[1],
    ):
        flaky_s3.drop_next_gets(2, after_bytes=500_000)
        before = flaky_s3.drops_injected
        assert read() == data
        assert flaky_s3.drops_injected == before + 2
    assert storage.sha256_of(url) == hashlib.sha256(data).hexdigest()


def test_a_resumed_read_answered_from_the_start_is_refused_not_spliced(flaky_s3: FlakyS3Proxy,
                                                                        s3_bucket: str) -> None:
    """A proxy that drops Range sent the object from byte 0 again, and those bytes were appended after the ones
    already read: a manifest or checkpoint file read whole came back longer and wrong."""
    url = s3_bucket + "/resume.bin"
    data = os.urandom(1 << 20)
    storage.write_bytes(url, data)
    flaky_s3.drop_next_gets(1, after_bytes=300_000)
    flaky_s3.ignore_ranges(1)
    with pytest.raises(StorageError, match=rf"^{url}: resuming the read at byte \d+, the store answered with the "
                                           r"whole object \(no Content-Range\).* ignored the Range / If-Match"):
        storage.read_bytes(url)
    assert storage.read_bytes(url) == data  # a store that honours them reads as before


def test_drops_without_progress_are_bounded(flaky_s3: FlakyS3Proxy, s3_bucket: str, s3_settings) -> None:
    url = s3_bucket + "/x.bin"
    storage.write_bytes(url, os.urandom(50_000))
    s3_settings(max_attempts=3, backoff_base=0.01)
    flaky_s3.drop_next_gets(100, after_bytes=0)
    with pytest.raises(
        StorageError, match=rf"{url}: reading from S3 endpoint .* failed 3 times in a row at byte 0"
    ):
        storage.read_bytes(url)
    assert flaky_s3.drops_injected == 3


def test_multipart_transfer(s3_bucket: str, s3_settings, tmp_path) -> None:
    s3_settings(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    src = tmp_path / "big.bin"
    data = os.urandom((11 << 20) + 123)
    src.write_bytes(data)
    url = s3_bucket + "/big.bin"
    storage.upload_file(str(src), url)
    client, bucket, key = _raw(url)
    assert client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"').endswith("-3")  # three parts
    storage.download_file(url, str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == data
    assert sorted(os.listdir(tmp_path)) == ["back.bin", "big.bin"]  # no temporary file left behind


def test_shard_cache_hit_and_miss(s3_bucket: str, tmp_path) -> None:
    url = s3_bucket + "/shard-000.tar"
    data = os.urandom(10_000)
    storage.write_bytes(url, data)
    cache = ShardCache(str(tmp_path / "cache"), max_bytes=1 << 20)
    digest = hashlib.sha256(data).hexdigest()
    path = cache.fetch(url, digest)
    assert open(path, "rb").read() == data and (cache.hits, cache.misses) == (0, 1)
    storage.delete(url)  # a hit must not touch S3 at all
    assert cache.fetch(url, digest) == path and (cache.hits, cache.misses) == (1, 1)
    with pytest.raises(StorageNotFoundError, match="not found"):
        cache.fetch(url)  # a different entry (no digest): a miss, and the object is gone
    local = tmp_path / "local.tar"
    local.write_bytes(data)
    assert cache.fetch(f"file://{local}", digest) == str(local)  # local shards are served in place


def test_shard_cache_rejects_bad_sha256(s3_bucket: str, tmp_path) -> None:
    url = s3_bucket + "/shard-bad.tar"
    storage.write_bytes(url, b"corrupted bytes")
    cache = ShardCache(str(tmp_path / "cache"), max_bytes=1 << 20)
    expected = "0" * 64
    actual = hashlib.sha256(b"corrupted bytes").hexdigest()
    with pytest.raises(StorageError, match=rf"{url}: sha256 mismatch: expected {expected}, actual {actual}"):
        cache.fetch(url, expected)
    assert os.listdir(tmp_path / "cache" / "data") == []  # the bad download is not kept
    with pytest.raises(StorageError, match="not 64 hex digits"):
        cache.fetch(url, "abc")


def test_shard_cache_evicts_least_recently_used(s3_bucket: str, tmp_path) -> None:
    urls = [f"{s3_bucket}/s{i}.tar" for i in range(3)]
    for url in urls:
        storage.write_bytes(url, os.urandom(1000))
    cache = ShardCache(str(tmp_path / "cache"), max_bytes=2500)
    a = cache.fetch(urls[0])
    b = cache.fetch(urls[1])
    time.sleep(0.02)
    cache.fetch(urls[0])  # a is now more recent than b
    c = cache.fetch(urls[2])  # 3000 bytes > 2500: the least recently used (b) goes
    assert os.path.exists(a) and os.path.exists(c) and not os.path.exists(b)
    assert cache.total_bytes() == 2000
    big = ShardCache(str(tmp_path / "cache"), max_bytes=10)
    assert os.path.exists(big.fetch(urls[1]))  # an entry larger than the limit is still served
    assert [os.path.basename(p) for _, _, p in big.entries()] == [os.path.basename(big.path_for(urls[1]))]


_WORKER = """
import sys
from data_pipeline.storage import ShardCache, sha256_of
cache = ShardCache(sys.argv[1], max_bytes=1 << 30)
print(" ".join(sha256_of(cache.fetch(u)) for u in sys.argv[2:]))
"""


def test_shard_cache_shared_by_processes(s3_bucket: str, tmp_path) -> None:
    """Several processes filling one cache folder at once (endpoint inherited via DGM_S3_ENDPOINT_URL)."""
    urls = [f"{s3_bucket}/p{i}.tar" for i in range(4)]
    blobs = [os.urandom(200_000) for _ in urls]
    for url, blob in zip(urls, blobs, strict=True):
        storage.write_bytes(url, blob)
    cache_dir = str(tmp_path / "cache")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, cache_dir, *urls], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    want = " ".join(hashlib.sha256(b).hexdigest() for b in blobs)
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and out.strip() == want
    assert (
        len(os.listdir(os.path.join(cache_dir, "data"))) == 4
    )  # one entry each, no leftover temporary files


def test_s3_stream_seeks_and_detects_a_changed_object(s3_bucket: str) -> None:
    url = s3_bucket + "/obj.bin"
    data = os.urandom(1 << 20)
    storage.write_bytes(url, data)
    with storage.open_read(url) as f:
        f.seek(700_000)
        assert f.read(100) == data[700_000:700_100]
        assert f.seek(-10, os.SEEK_END) == len(data) - 10 and f.read() == data[-10:]
        f.seek(5)
        storage.write_bytes(url, b"replaced")  # the next ranged request is pinned to the old ETag
        with pytest.raises(StorageError, match=rf"{url}: the object changed while it was being read"):
            f.read(10)


def test_checkpoint_local_copy_never_reuses_a_cut_download(s3_bucket: str, tmp_path, monkeypatch) -> None:
    """A download of an s3:// checkpoint cut short must not pass for the checkpoint on the next try."""
    root = f"{s3_bucket}/ckpt"
    files = {"meta.json": b"{}", "model/ds/state.pt": b"w" * 1000, "rng-rank0.safetensors": b"r"}
    for name, data in files.items():
        storage.write_bytes(f"{root}/step-00000001/{name}", data)
    store = CheckpointStore(root, staging=str(tmp_path))
    real, calls = storage.download_file, []

    def cut(url: str, local: str) -> None:
        calls.append(url)
        if len(calls) == 2:
            raise StorageError(url, "connection reset (injected)")
        real(url, local)

    monkeypatch.setattr(storage, "download_file", cut)
    with pytest.raises(StorageError, match="injected"):
        store.local_copy("step-00000001")
    final = tmp_path / "dgm-ckpt-load-rank0" / \
        hashlib.sha256(root.encode()).hexdigest()[:12] / "step-00000001"
    assert not final.exists()
    (final / "model").mkdir(parents=True)  # a copy left by an older dgm: meta.json there, the rest missing
    (final / "meta.json").write_bytes(b"{}")
    path = store.local_copy("step-00000001")
    assert path == str(final) and len(calls) == 2 + len(files)
    assert {n: (final / n).read_bytes() for n in files} == files
    assert store.local_copy("step-00000001") == path and len(calls) == 2 + len(files)  # complete: reused
    assert sorted(os.listdir(final.parent)) == ["step-00000001"]
    for name, data in files.items():  # a later resume loads a later tag: the older copy does not pile up
        storage.write_bytes(f"{root}/step-00000002/{name}", data)
    store.local_copy("step-00000002")
    assert sorted(os.listdir(final.parent)) == ["step-00000002"]


def test_checkpoint_local_copies_follow_their_root_and_a_rewritten_tag(s3_bucket: str, tmp_path) -> None:
    """Two runs' step-1 are different checkpoints (one staging folder may serve both, e.g. two exports beside each
    other), and a run restarted from scratch rewrites its tags: a local copy is reused only for its own root and
    while the remote meta.json is the one it was downloaded with."""
    copies = {}
    for run in ("runA", "runB"):
        storage.write_bytes(f"{s3_bucket}/{run}/ckpt/step-00000001/meta.json", f'{{"run": "{run}"}}'.encode())
        storage.write_bytes(f"{s3_bucket}/{run}/ckpt/step-00000001/model/w", run.encode())
        copies[run] = CheckpointStore(f"{s3_bucket}/{run}/ckpt", staging=str(tmp_path)).local_copy("step-00000001")
    assert copies["runA"] != copies["runB"]
    assert [(Path(copies[r]) / "model" / "w").read_bytes() for r in ("runA", "runB")] == [b"runA", b"runB"]
    storage.write_bytes(f"{s3_bucket}/runA/ckpt/step-00000001/meta.json", b'{"run": "runA", "again": 1}')
    storage.write_bytes(f"{s3_bucket}/runA/ckpt/step-00000001/model/w", b"runA-again")
    again = CheckpointStore(f"{s3_bucket}/runA/ckpt", staging=str(tmp_path)).local_copy("step-00000001")
    assert again == copies["runA"] and (Path(again) / "model" / "w").read_bytes() == b"runA-again"


def test_checkpoint_save_clears_an_interrupted_save_and_prune_keeps_later_tags(s3_bucket: str, tmp_path) -> None:
    """Markers left by an interrupted save of the same step (on more ranks) must not count towards the new save;
    pruning after a save leaves checkpoints after it (an orphan or an upload in flight) alone."""
    root = f"{s3_bucket}/ckpt"
    for tag in ("step-00000004", "step-00000008", "step-00000016"):
        storage.write_bytes(f"{root}/{tag}/meta.json", b"{}")
    for r in range(1, 4):  # a 4-rank save of step 16 that died before rank 0's upload
        storage.write_bytes(f"{root}/step-00000016/_uploaded/rank{r}", b"")
    storage.write_bytes(f"{root}/latest", b"step-00000008")
    store = CheckpointStore(root, world_size=2, keep=1, staging=str(tmp_path))
    store._clear_remote("step-00000008")  # the checkpoint latest names is never cleared
    store._clear_remote("step-00000016")
    assert store._uploaded_ranks("step-00000016") == 0 and not storage.exists(f"{root}/step-00000016/")
    assert storage.exists(f"{root}/step-00000008/meta.json")
    storage.write_bytes(f"{root}/step-00000016/meta.json", b"{}")  # again an orphan after the newest save
    storage.write_bytes(f"{root}/step-00000012/meta.json", b"{}")
    store._point_latest("step-00000012")
    assert store.all_tags() == ["step-00000012", "step-00000016"]


def test_prune_keeps_complete_checkpoints_and_removes_older_cut_uploads(s3_bucket: str, tmp_path) -> None:
    """A tag whose upload a crash cut (a run resumed from the one before it, under another checkpoint cadence) was
    counted towards `keep`: a complete checkpoint was deleted in its place, and it stayed for good."""
    root = f"{s3_bucket}/ckpt"
    meta = CheckpointMeta(step=0, stream_state={}, world_size=2, family="x", engines=["model"], zero_stage=2,
                          config={}, data_info={})
    for tag, ranks in (("step-00000004", 2), ("step-00000008", 2), ("step-00000010", 1), ("step-00000012", 2)):
        storage.write_bytes(f"{root}/{tag}/meta.json", json.dumps(dataclasses.asdict(meta)).encode())
        for r in range(ranks):
            storage.write_bytes(f"{root}/{tag}/_uploaded/rank{r}", b"")
    storage.write_bytes(f"{root}/step-00000006/meta.json", b"{}")  # unreadable: proves nothing, counted as before
    store = CheckpointStore(root, world_size=2, keep=3, staging=str(tmp_path))
    store._point_latest("step-00000012")
    assert store.all_tags() == ["step-00000006", "step-00000008", "step-00000012"]


def test_an_s3_checkpoint_is_complete_once_every_rank_uploaded(s3_bucket: str, tmp_path) -> None:
    """``dgm export --tag`` of a checkpoint whose upload is still missing ranks is refused (its meta.json, written
    by rank 0, is there long before the other ranks' files)."""
    root = f"{s3_bucket}/ckpt"
    meta = CheckpointMeta(step=16, stream_state={}, world_size=4, family="x", engines=["model"], zero_stage=2,
                          config={}, data_info={})
    storage.write_bytes(f"{root}/step-00000016/meta.json", json.dumps(dataclasses.asdict(meta)).encode())
    store = CheckpointStore(root, staging=str(tmp_path))
    for r in range(1, 4):
        storage.write_bytes(f"{root}/step-00000016/_uploaded/rank{r}", b"")
    assert not store.is_complete("step-00000016") and not store.is_complete("step-00000099")
    storage.write_bytes(f"{root}/step-00000016/_uploaded/rank0", b"")
    assert store.is_complete("step-00000016")


def test_ray_workers_do_not_log_where_boto_found_credentials() -> None:
    """Each rank's S3 client logged "Found credentials in environment variables." at INFO under Ray."""
    import logging

    from trainer.ray_env import quiet_worker_noise

    quiet_worker_noise()
    assert not logging.getLogger("botocore.credentials").isEnabledFor(logging.INFO)


def test_scratch_left_by_killed_processes_is_swept_and_live_ones_kept(tmp_path) -> None:
    """A SIGKILLed writer never removes its temporary shard or export folder; the next writer of the same kind on
    this host does, and leaves alone what live processes (and other hosts sharing the folder) are writing."""
    make = ("import os, sys; from data_pipeline.scratch import scratch_dir, scratch_file; "
            "fd, path = scratch_file('dgm-shard-', '.tar', sys.argv[1]); os.write(fd, b'half a shard'); "
            "d = scratch_dir('dgm-shard-', sys.argv[1]); open(os.path.join(d, 'part'), 'w').write('x'); "
            "print(path, d, flush=True); sys.stdin.readline(); os._exit(0)")
    killed = subprocess.Popen([sys.executable, "-c", make, str(tmp_path)], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    dead_file, dead_dir = killed.stdout.readline().split()
    killed.kill()
    killed.wait()
    live = subprocess.Popen([sys.executable, "-c", make, str(tmp_path)], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        live_file, live_dir = live.stdout.readline().split()
        other_host = tmp_path / f"dgm-shard-some-other-host-{killed.pid}-abc.tar"
        other_host.write_bytes(b"x")
        unrelated = tmp_path / f"dgm-export-{os.path.basename(dead_file)[len('dgm-shard-'):]}"
        unrelated.write_bytes(b"x")
        fd, mine = scratch.scratch_file("dgm-shard-", ".tar", str(tmp_path))
        os.close(fd)
        left = set(os.listdir(tmp_path))
        assert os.path.basename(dead_file) not in left and os.path.basename(dead_dir) not in left
        assert {os.path.basename(p) for p in (live_file, live_dir, mine, other_host, unrelated)} <= left
    finally:
        live.communicate("\n")

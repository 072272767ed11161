"""S3 access behind data_pipeline.storage: clients, retries, resumable streaming reads, error translation.

Import the public API from ``data_pipeline.storage``; this module holds the boto3 details so storage.py stays a
readable dispatcher. Credentials come only from boto3's own chain (env, profile, instance role): nothing here reads,
stores or logs keys.
"""

from __future__ import annotations

import http.client
import io
import os
import random
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import boto3
import urllib3.exceptions
from boto3.exceptions import RetriesExceededError as Boto3RetriesExceededError
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
    ResponseStreamingError,
)
from s3transfer.exceptions import RetriesExceededError

_READ_CHUNK = 256 << 10
ENDPOINT_ENV_VARS = ("DGM_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
_DENIED_CODES = {"403", "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
# Errors raised while reading a response body mid-way: botocore does not retry these, ResumableReader does.
_STREAM_ERRORS = (
    ResponseStreamingError,
    IncompleteReadError,
    ReadTimeoutError,
    ConnectionClosedError,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)


class StorageError(RuntimeError):
    """A storage operation failed; the message always names the URL and the problem.

    Defined here (the lowest layer) and re-exported by data_pipeline.storage, where callers should import it.
    """

    def __init__(self, url: str, problem: str) -> None:
        super().__init__(f"{url}: {problem}")
        self.url = url
        self.problem = problem

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray and multiprocessing pickle exceptions; the default would call __init__ with one argument.
        return (type(self), (self.url, self.problem))


class StorageNotFoundError(StorageError):
    """The object or file does not exist (callers probing for optional files catch just this)."""


class BucketNotFoundError(StorageError):
    """The bucket itself does not exist: a typo or the wrong endpoint far more often than an empty place, so it is
    not a StorageNotFoundError and probes (exists, a checkpoint root's ``latest``) report it instead of answering
    "nothing there" and letting a run start over from step 0."""


@dataclass
class S3Settings:
    """Process-wide S3 client settings. endpoint_url None: DGM_S3_ENDPOINT_URL, then AWS_ENDPOINT_URL, then AWS.

    max_attempts counts every try, the first included: botocore's total_max_attempts for requests (its own
    "max_attempts" key would count retries only), and the bound on consecutive resumptions of a broken body.
    backoff_* pace those resumptions; multipart_* and max_concurrency configure boto3's transfer manager.
    """

    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 8
    connect_timeout: float = 5
    read_timeout: float = 60
    retry_mode: str = "standard"
    backoff_base: float = 0.2
    backoff_max: float = 10.0
    multipart_threshold: int = 64 << 20
    multipart_chunksize: int = 16 << 20
    max_concurrency: int = 8

    def validate(self) -> None:
        if self.retry_mode not in ("standard", "adaptive"):
            raise ValueError(
                f"S3Settings.retry_mode must be 'standard' or 'adaptive', got {self.retry_mode!r}"
            )
        if self.max_attempts < 1:
            raise ValueError(f"S3Settings.max_attempts must be >= 1, got {self.max_attempts}")
        if min(self.connect_timeout, self.read_timeout) <= 0 or self.backoff_base < 0:
            raise ValueError("S3Settings timeouts must be > 0 and backoff_base >= 0")
        if self.multipart_chunksize < 5 << 20:
            raise ValueError(
                f"S3Settings.multipart_chunksize must be >= 5 MiB (S3's minimum part), got {self.multipart_chunksize}"
            )


_settings = S3Settings()
_generation = 0
_local = threading.local()


def configure_s3(settings: S3Settings) -> None:
    """Replace the process-wide settings; every thread builds a fresh client on its next call."""
    global _settings, _generation
    settings.validate()
    _settings = settings
    _generation += 1


def current_settings() -> S3Settings:
    return _settings


def endpoint_url() -> str | None:
    """The endpoint in force now: configured, else from the environment (read per call, so tests can switch it)."""
    if _settings.endpoint_url:
        return _settings.endpoint_url
    for name in ENDPOINT_ENV_VARS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def client() -> Any:
    """This thread's S3 client, created lazily: one per process and thread (boto3 sessions are not thread-safe)."""
    endpoint = endpoint_url()
    key = (os.getpid(), _generation, endpoint, os.environ.get("AWS_PROFILE"))
    cached = getattr(_local, "entry", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    s = _settings
    config = Config(
        retries={"mode": s.retry_mode, "total_max_attempts": s.max_attempts},
        connect_timeout=s.connect_timeout,
        read_timeout=s.read_timeout,
        max_pool_connections=max(10, s.max_concurrency),
        s3={"addressing_style": "path"} if endpoint else None,
    )
    try:
        made = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=s.region, config=config)
    except ProfileNotFound as e:
        import socket

        raise StorageError(describe_endpoint(), f"AWS_PROFILE={e.kwargs.get('profile')!r} names no profile in the "
                           f"AWS config of host {socket.gethostname()} (~/.aws/config, ~/.aws/credentials): unset "
                           "it to use this host's default credentials, or add the profile there") from None
    made.meta.events.register("needs-retry.s3", _say_slow_endpoint)
    _local.entry = (key, made)
    return made


_said_slow: set[str] = set()


def _say_slow_endpoint(caught_exception: BaseException | None = None, **_: Any) -> None:
    """A store that takes connections and never answers was minutes of silence (each try waits read_timeout):
    said once per endpoint, at the first try that timed out. Returns None: the retry decision stays botocore's."""
    if isinstance(caught_exception, ReadTimeoutError | ConnectTimeoutError):
        where = describe_endpoint()
        if where not in _said_slow:
            _said_slow.add(where)
            s = _settings
            wait = s.connect_timeout if isinstance(caught_exception, ConnectTimeoutError) else s.read_timeout
            print(f"[s3] {where} did not answer in time ({type(caught_exception).__name__}); retrying, up to "
                  f"{s.max_attempts} tries of {wait:g} s each", file=sys.stderr, flush=True)


def describe_endpoint() -> str:
    return endpoint_url() or "the default AWS S3 endpoint"


def split_url(url: str, need_key: bool = True) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key); a missing bucket (or key, where one is needed) is a StorageError."""
    rest = url[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(url, "no bucket name in the s3:// URL")
    if need_key and (not key or key.endswith("/")):
        raise StorageError(url, "no object key in the s3:// URL (it names a bucket or a folder)")
    return bucket, key


def bucket_not_found(url: str, detail: str = "") -> BucketNotFoundError:
    said = f" ({detail})" if detail else ""
    return BucketNotFoundError(
        url, f"bucket not found at {describe_endpoint()}{said}; check the name and the endpoint, or create it"
    )


def _client_error(url: str, e: ClientError) -> StorageError:
    err = e.response.get("Error", {})
    code = str(err.get("Code", ""))
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    message = err.get("Message") or code
    if code == "NoSuchBucket":
        return bucket_not_found(url, message)
    if code in _NOT_FOUND_CODES or status == 404:
        return StorageNotFoundError(url, "not found")
    if code in _DENIED_CODES or status == 403:
        return StorageError(url, f"access denied by S3 at {describe_endpoint()} ({code}: {message})")
    if code in ("PreconditionFailed", "412"):
        return StorageError(url, "the object changed while it was being read")
    return StorageError(url, f"S3 error {code or status} at {describe_endpoint()}: {message}")


@contextmanager
def errors(url: str) -> Iterator[None]:
    """Turn boto3/botocore exceptions into StorageError naming the URL (and the endpoint, for connection trouble)."""
    try:
        yield
    except StorageError:
        raise
    except ClientError as e:
        raise _client_error(url, e) from e
    except NoCredentialsError as e:
        raise StorageError(
            url, "no AWS credentials found by boto3's credential chain (env, profile, instance role)"
        ) from e
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError) as e:
        raise StorageError(url, f"cannot reach S3 endpoint {describe_endpoint()}: {e}") from e
    except BotoCoreError as e:
        raise StorageError(url, f"S3 request to {describe_endpoint()} failed: {e}") from e
    except (RetriesExceededError, Boto3RetriesExceededError) as e:
        # The transfer manager's "Max Retries Exceeded" says neither what nor why; the last error does.
        raise StorageError(
            url, f"S3 transfer from {describe_endpoint()} gave up after {_settings.max_attempts} attempts, the last "
            f"one failing with: {e.last_exception}",
        ) from e


def backoff(failures: int) -> float:
    """Exponential backoff with jitter for the n-th consecutive failure (n >= 1)."""
    s = _settings
    return min(s.backoff_max, s.backoff_base * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)


class ResumableReader(io.RawIOBase):
    """An object's bytes as a stream that survives dropped connections.

    botocore retries failed requests but not errors raised while reading a body; here such an error closes the
    body and a Range request resumes from the byte offset reached (pinned to the first response's ETag, so a
    changed object is an error, not silently mixed data). Consecutive failures without progress are bounded by
    S3Settings.max_attempts, with exponential backoff between them.
    """

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self._bucket, self._key = split_url(url)
        self._pos = 0
        self._body: Any = None
        self._etag: str | None = None
        self._opened = False
        self.size = 0
        self.resumptions = 0
        self._request()

    def _request(self) -> None:
        args: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key}
        if self._opened:
            args["Range"] = f"bytes={self._pos}-"
            if self._etag:
                args["IfMatch"] = self._etag
        with errors(self.url):
            response = client().get_object(**args)
        if self._opened:  # a store or proxy that ignores Range would splice the object's start in here
            answered = str(response.get("ContentRange") or "")
            etag = response.get("ETag")
            if not answered.startswith(f"bytes {self._pos}-") or (self._etag and etag and etag != self._etag):
                with suppress(Exception):
                    response["Body"].close()
                raise StorageError(self.url, f"resuming the read at byte {self._pos}, the store answered with "
                                   f"{answered or 'the whole object (no Content-Range)'}, ETag {etag}: it ignored "
                                   "the Range / If-Match request, so the read cannot go on safely")
        if not self._opened:
            self._opened = True
            self.size = int(response["ContentLength"])
            self._etag = response.get("ETag")
        self._body = response["Body"]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        target = base + offset
        if target < 0:
            raise StorageError(self.url, f"cannot seek to negative offset {target}")
        if target != self._pos:
            self._drop_body()
            self._pos = target
        return self._pos

    def _drop_body(self) -> None:
        if self._body is not None:
            with suppress(Exception):  # a broken connection may fail to close; it is discarded anyway
                self._body.close()
            self._body = None

    def readinto(self, buffer: Any) -> int:
        # Bounded reads: urllib3 discards the partial data of a read that hits a dropped connection.
        want = min(len(buffer), self.size - self._pos, _READ_CHUNK)
        if want <= 0:
            return 0
        failures = 0
        while True:
            try:
                if self._body is None:
                    self._request()
                chunk = self._body.read(want)
                if not chunk:
                    raise IncompleteReadError(actual_bytes=self._pos, expected_bytes=self.size)
                break
            except _STREAM_ERRORS as e:
                self._drop_body()
                failures += 1
                if failures >= _settings.max_attempts:
                    raise StorageError(
                        self.url,
                        f"reading from S3 endpoint {describe_endpoint()} failed {failures} times in a row at byte "
                        f"{self._pos} of {self.size}: {e}",
                    ) from e
                self.resumptions += 1
                time.sleep(backoff(failures))
        n = len(chunk)
        buffer[:n] = chunk
        self._pos += n
        return n

    def readall(self) -> bytes:
        out = bytearray(max(0, self.size - self._pos))
        view = memoryview(out)
        filled = 0
        while filled < len(out):
            n = self.readinto(view[filled : filled + (8 << 20)])
            if n == 0:
                break
            filled += n
        return bytes(out)

    def close(self) -> None:
        self._drop_body()
        super().close()


def head(url: str) -> dict[str, Any] | None:
    """The object's HEAD answer, or None when it does not exist; a missing bucket is a BucketNotFoundError.

    A HEAD answer has no body, so S3 cannot say NoSuchBucket there: on a 404 the bucket is asked about itself
    (one more request, on misses only), or a vanished bucket would read as a missing object.
    """
    bucket, key = split_url(url)
    try:
        with errors(url):
            return client().head_object(Bucket=bucket, Key=key)
    except StorageNotFoundError:
        pass
    try:
        with errors(url):
            client().head_bucket(Bucket=bucket)
    except StorageNotFoundError as e:
        raise bucket_not_found(url) from e
    return None


def list_keys(url: str) -> Iterator[str]:
    """Keys under the folder ``url`` (a trailing / is implied); folder-marker keys ending in / are skipped."""
    bucket, key = split_url(url, need_key=False)
    prefix = key if not key or key.endswith("/") else key + "/"
    with errors(url):
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):
                    yield item["Key"]


def put_bytes(url: str, data: bytes) -> None:
    bucket, key = split_url(url)
    with errors(url):
        client().put_object(Bucket=bucket, Key=key, Body=data)


def _transfer_config() -> TransferConfig:
    s = _settings
    return TransferConfig(
        multipart_threshold=s.multipart_threshold,
        multipart_chunksize=s.multipart_chunksize,
        max_concurrency=s.max_concurrency,
        num_download_attempts=s.max_attempts,
    )


def upload_file(local_path: str, url: str) -> None:
    """Upload through boto3's transfer manager (multipart above the threshold; S3 makes the object visible whole)."""
    bucket, key = split_url(url)
    with errors(url), create_transfer_manager(client(), _transfer_config()) as manager:
        manager.upload(local_path, bucket, key).result()


def download_file(url: str, local_path: str) -> None:
    """Download into ``local_path`` (the caller makes it atomic): ranged multipart transfer for big objects,
    a ResumableReader stream for the rest."""
    info = head(url)
    if info is None:
        raise StorageNotFoundError(url, "not found")
    if int(info["ContentLength"]) >= _settings.multipart_threshold:
        bucket, key = split_url(url)
        with errors(url), create_transfer_manager(client(), _transfer_config()) as manager:
            manager.download(bucket, key, local_path).result()
        return
    with ResumableReader(url) as reader, open(local_path, "wb") as out:
        while chunk := reader.read(8 << 20):
            out.write(chunk)


def delete_object(url: str) -> None:
    bucket, key = split_url(url)
    with errors(url):
        client().delete_object(Bucket=bucket, Key=key)


def delete_keys(url: str, keys: list[str]) -> None:
    """Delete many keys of the bucket in ``url``, 1000 per request; a per-key failure is a StorageError."""
    bucket, _ = split_url(url, need_key=False)
    for start in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[start : start + 1000]]
        with errors(url):
            answer = client().delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        failed = answer.get("Errors") or []
        if failed:
            first = failed[0]
            raise StorageError(
                url,
                f"{len(failed)} objects could not be deleted, e.g. {first.get('Key')}: {first.get('Code')}",
            )

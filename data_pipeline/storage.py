"""One way to read and write bytes wherever they live: plain paths, file:// and s3://bucket/key URLs.

Shard writers/readers and checkpoint code call these functions and never branch on the scheme themselves. Every
failure is a StorageError naming the URL; local writes are atomic (temporary file + os.replace) so a crash never
leaves a half-written file under the final name, and S3 objects become visible whole. Folder-like functions
(list_prefix, delete_prefix, upload_dir, download_dir) treat the URL as a folder: "s3://b/run" covers
"s3://b/run/..." but not "s3://b/run2/...".
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, BinaryIO

from data_pipeline import s3
from data_pipeline.s3 import BucketNotFoundError, S3Settings, StorageError, StorageNotFoundError, configure_s3

if TYPE_CHECKING:
    from data_pipeline.shard_cache import ShardCache

__all__ = [
    "BucketNotFoundError",
    "S3Settings",
    "ShardCache",
    "StorageError",
    "StorageNotFoundError",
    "configure_s3",
    "copy",
    "delete",
    "delete_prefix",
    "download_dir",
    "download_file",
    "exists",
    "folder_problem",
    "is_remote",
    "join",
    "list_prefix",
    "local_path",
    "open_read",
    "read_bytes",
    "sha256_of",
    "size",
    "upload_dir",
    "upload_file",
    "version_of",
    "write_bytes",
]


def __getattr__(name: str) -> Any:
    """ShardCache lives in shard_cache.py (which uses this module); loading it lazily avoids an import cycle."""
    if name == "ShardCache":
        from data_pipeline.shard_cache import ShardCache

        return ShardCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_MISTYPED = re.compile(r"^(s3|file):(?!//)", re.IGNORECASE)  # s3:/bucket, s3:bucket: a local folder "s3:" otherwise
_CHUNK = 8 << 20


def _scheme(url: str) -> str:
    """'local' or 's3'; anything else is a StorageError naming the URL."""
    if not isinstance(url, str) or not url:
        raise StorageError(
            repr(url), f"not a URL or path (expected a non-empty str, got {type(url).__name__})"
        )
    m = _SCHEME.match(url)
    if m is None:
        typo = _MISTYPED.match(url)
        if typo:
            raise StorageError(url, f"looks like a {typo.group(1).lower()}:// URL with a slash missing (as a path it "
                                    "would be a local folder of that name)")
        return "local"
    scheme = m.group(1).lower()
    if scheme == "file":
        return "local"
    if scheme == "s3":
        if m.group(1) != "s3":  # listings come back as s3://: the guards that read the output's listing saw none
            raise StorageError(url, f"write the scheme in lower case, s3:// (not {m.group(1)}://)")
        return "s3"
    raise StorageError(url, f"unknown scheme {scheme!r}: expected a path, file:// or s3://")


def is_remote(url: str) -> bool:
    return _scheme(url) == "s3"


def folder_problem(url: str) -> str | None:
    """Why a local folder cannot be made at ``url`` ("is a file", "is below /x, a file"), or None (S3: None)."""
    if is_remote(url):
        return None
    path = probe = os.path.abspath(local_path(url))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if os.path.isdir(probe):
        return None
    return "is a file" if probe == path else f"is below {probe}, a file"


def local_path(url: str) -> str:
    """The filesystem path of a plain path or file:// URL (file://localhost/... too)."""
    if _scheme(url) != "local":
        raise StorageError(url, "not a local path")
    if not url.lower().startswith("file://"):
        return url
    rest = url[len("file://") :]
    host, slash, path = rest.partition("/")
    if host not in ("", "localhost"):
        raise StorageError(url, f"file:// URL names host {host!r}; only local files are supported")
    return slash + path


def join(url: str, *parts: str) -> str:
    """Append path parts with '/': join("s3://b/run", "ckpt", "x.pt") -> "s3://b/run/ckpt/x.pt"."""
    kind = _scheme(url)
    if kind == "s3":
        s3.split_url(url, need_key=False)  # "s3://" + "x" must not become the local-looking "s3:/x"
    pieces = [p.strip("/") for p in parts if p.strip("/")]
    if kind == "local" and "://" not in url:
        return os.path.join(url, *pieces)
    if not pieces:
        return url
    return url.rstrip("/") + "/" + "/".join(pieces)


@contextmanager
def _local_errors(url: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError as e:
        raise StorageNotFoundError(url, "not found") from e
    except IsADirectoryError as e:
        raise StorageError(url, "is a directory, not a file") from e
    except NotADirectoryError as e:
        raise StorageError(url, "a parent of this path is a file, not a directory") from e
    except PermissionError as e:
        raise StorageError(url, "access denied (file permissions)") from e
    except OSError as e:
        raise StorageError(url, f"{e.strerror or e} (errno {e.errno})") from e


@contextmanager
def _download_errors(local_file: str) -> Iterator[None]:
    """_local_errors for writing a download: a local file that vanishes mid-way (removed by another process) is a
    local problem, never a StorageNotFoundError, which would read as the object missing from storage."""
    with _local_errors(local_file):
        try:
            yield
        except FileNotFoundError as e:
            raise StorageError(
                local_file,
                f"the download's partial file {e.filename or ''} vanished before it was complete (removed by another "
                "process, or its folder deleted?)",
            ) from e


def atomic_write(path: str, fill: Callable[[BinaryIO], None]) -> None:
    """Create ``path`` whole or not at all: ``fill`` writes a temporary file beside it, then os.replace.

    The temporary name is created with O_EXCL (no two writers share it) and removed on any failure.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def exists(url: str) -> bool:
    """True for an existing file/object, or a folder (S3: a prefix with at least one object under it).

    A missing bucket is a BucketNotFoundError, not False: "nothing there" would let a resuming run start over.
    """
    if _scheme(url) == "local":
        return os.path.exists(local_path(url))
    _, key = s3.split_url(url, need_key=False)
    if key and not key.endswith("/") and s3.head(url) is not None:
        return True
    return next(iter(s3.list_keys(url)), None) is not None


def version_of(url: str) -> tuple[int, str]:
    """What changes when a file or object is replaced: its size and mtime (local), its size and ETag (S3)."""
    if _scheme(url) == "local":
        with _local_errors(url):
            stat = os.stat(local_path(url))
        return stat.st_size, str(stat.st_mtime_ns)
    info = s3.head(url)
    if info is None:
        raise StorageNotFoundError(url, "not found")
    return int(info["ContentLength"]), str(info.get("ETag", ""))


def size(url: str) -> int:
    if _scheme(url) == "local":
        path = local_path(url)
        with _local_errors(url):
            if os.path.isdir(path):
                raise IsADirectoryError(path)
            return os.path.getsize(path)
    info = s3.head(url)
    if info is None:
        raise StorageNotFoundError(url, "not found")
    return int(info["ContentLength"])


def open_read(url: str) -> BinaryIO:
    """A buffered binary stream; on S3 it resumes dropped connections by Range and raises only StorageError."""
    if _scheme(url) == "local":
        with _local_errors(url):
            return open(local_path(url), "rb")
    return io.BufferedReader(s3.ResumableReader(url), buffer_size=1 << 20)  # type: ignore[return-value]


def read_bytes(url: str) -> bytes:
    if _scheme(url) == "local":
        with _local_errors(url), open(local_path(url), "rb") as f:
            return f.read()
    with s3.ResumableReader(url) as reader:
        return reader.readall()


def write_bytes(url: str, data: bytes) -> None:
    """Atomic: local tmp + os.replace; an S3 put_object is visible whole or not at all."""
    if _scheme(url) == "s3":
        s3.put_bytes(url, bytes(data))
        return
    with _local_errors(url):
        atomic_write(local_path(url), lambda f: f.write(data))


def _copy_stream(src: BinaryIO, dst: BinaryIO) -> None:
    while chunk := src.read(_CHUNK):
        dst.write(chunk)


def upload_file(local_file: str | os.PathLike[str], url: str) -> None:
    """Copy a local file to ``url`` (multipart on S3 above S3Settings.multipart_threshold)."""
    local_file = os.fspath(local_file)
    with _local_errors(local_file):
        if not os.path.isfile(local_file):
            raise (IsADirectoryError if os.path.isdir(local_file) else FileNotFoundError)(local_file)
    if _scheme(url) == "s3":
        s3.upload_file(local_file, url)
        return
    with _local_errors(url), open(local_file, "rb") as src:
        atomic_write(local_path(url), lambda dst: _copy_stream(src, dst))


def download_file(url: str, local_file: str | os.PathLike[str]) -> None:
    """Copy ``url`` to a local file atomically: on failure the destination is untouched and no tmp remains."""
    local_file = os.fspath(local_file)
    if _scheme(url) == "local":
        with _local_errors(url), open(local_path(url), "rb") as src:
            atomic_write(local_file, lambda dst: _copy_stream(src, dst))
        return
    directory = os.path.dirname(os.path.abspath(local_file))
    tmp = os.path.join(directory, f".{os.path.basename(local_file)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with _local_errors(local_file):
            os.makedirs(directory, exist_ok=True)
        with _download_errors(local_file):
            s3.download_file(url, tmp)
            os.replace(tmp, local_file)
    finally:
        with suppress(FileNotFoundError):
            os.unlink(tmp)


def copy(src_url: str, dst_url: str) -> None:
    """Copy one file/object to another URL (any pair of schemes), through a local temporary file if needed."""
    if _scheme(src_url) == "local":
        upload_file(local_path(src_url), dst_url)
    elif _scheme(dst_url) == "local":
        download_file(src_url, local_path(dst_url))
    else:
        write_bytes(dst_url, read_bytes(src_url))


def _relative(url: str, prefix: str) -> str:
    """The part of ``url`` below the folder ``prefix``, refusing names that would escape a local folder."""
    rel = url[len(prefix.rstrip("/")) + 1 :]
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") for p in parts):
        raise StorageError(url, f"unsafe object name below {prefix} (empty, '.' or '..' path segment)")
    return rel


def list_prefix(url: str) -> list[str]:
    """Full URLs of all files/objects below the folder ``url`` (recursive), sorted; [] when there are none."""
    if _scheme(url) == "s3":
        bucket, _ = s3.split_url(url, need_key=False)
        return sorted(f"s3://{bucket}/{key}" for key in s3.list_keys(url))
    root = local_path(url)
    found: list[str] = []
    if not os.path.isdir(root):
        return found
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            found.append(join(url, rel))
    return sorted(found)


def delete(url: str) -> None:
    """Delete one file/object; deleting something already absent is not an error (as on S3)."""
    if _scheme(url) == "s3":
        s3.delete_object(url)
        return
    path = local_path(url)
    with _local_errors(url), suppress(FileNotFoundError):
        if os.path.isdir(path):
            raise IsADirectoryError(path)
        os.unlink(path)


def delete_prefix(url: str) -> None:
    """Delete everything below the folder ``url`` (and the local folder itself); absent is not an error."""
    if _scheme(url) == "s3":
        keys = list(s3.list_keys(url))
        if keys:
            s3.delete_keys(url, keys)
        return
    path = local_path(url)
    with _local_errors(url):
        if os.path.isfile(path):
            raise NotADirectoryError(path)
        if os.path.isdir(path):
            shutil.rmtree(path)


def upload_dir(local_dir: str | os.PathLike[str], url: str) -> list[str]:
    """Copy every file below ``local_dir`` to the folder ``url`` (file by file, each atomic); returns the URLs."""
    local_dir = os.fspath(local_dir)
    with _local_errors(local_dir):
        if not os.path.isdir(local_dir):
            raise (NotADirectoryError if os.path.exists(local_dir) else FileNotFoundError)(local_dir)
    written = []
    for dirpath, _dirs, files in os.walk(local_dir):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            target = join(url, os.path.relpath(path, local_dir).replace(os.sep, "/"))
            upload_file(path, target)
            written.append(target)
    return sorted(written)


def download_dir(url: str, local_dir: str | os.PathLike[str]) -> list[str]:
    """Copy every file/object below the folder ``url`` into ``local_dir``; returns the local paths.

    An empty or missing folder is StorageNotFoundError; object names with '..' segments are refused.
    """
    local_dir = os.fspath(local_dir)
    urls = list_prefix(url)
    if not urls:
        raise StorageNotFoundError(url, "not found (no files below this folder)")
    written = []
    for item in urls:
        target = os.path.join(local_dir, *_relative(item, url).split("/"))
        download_file(item, target)
        written.append(target)
    return written


def sha256_of(url_or_path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file/object, streamed (S3 reads resume after dropped connections)."""
    url_or_path = os.fspath(url_or_path)
    digest = hashlib.sha256()
    with open_read(url_or_path) as f, _local_errors(url_or_path):
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()

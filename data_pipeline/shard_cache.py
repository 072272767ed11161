"""A local disk cache for remote shards, bounded in size, shared safely by the processes of one machine.

Every data-loader worker of every rank may ask for the same shard at once: a per-entry lock (fcntl.flock on one of
256 striped lock files, released by the kernel if a process dies) makes one of them download while the others wait
and then hit. Downloads land in ``tmp/`` (never scanned as entries, so eviction cannot delete a half-written file,
whatever temporary names boto3's transfer manager picks) and are renamed into ``data/`` only after the sha256
check, so a cached file is always complete. An entry fetched with ``verify=False`` gets its own name, so a later
fetch asking for the check hashes it before serving it. Least-recently-used entries (by access time, refreshed on
every hit) are evicted under a cache-wide lock once the total passes ``max_bytes``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import BinaryIO

from data_pipeline import storage
from data_pipeline.s3 import StorageError

_STALE_TMP_SECONDS = 3600
_ENTRY_NAME = re.compile(r"[0-9a-f]{40}-[A-Za-z0-9._-]*")


class ChecksumMismatchError(StorageError):
    """The bytes read are not the ones expected: the shard itself is bad (unlike an outage, retrying will not help)."""


def _normalize_sha256(url: str, sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise StorageError(url, f"expected sha256 {sha256!r} is not 64 hex digits")
    return value


class ShardCache:
    """Remote shards copied to ``directory`` (kept under ``max_bytes``); local URLs are served in place."""

    def __init__(self, directory: str, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"ShardCache max_bytes must be > 0, got {max_bytes}")
        self.directory = os.path.abspath(directory)
        self.max_bytes = int(max_bytes)
        self.hits = 0
        self.misses = 0
        self._data = os.path.join(self.directory, "data")
        self._locks = os.path.join(self.directory, "locks")
        self._tmp = os.path.join(self.directory, "tmp")
        try:
            for folder in (self._data, self._locks, self._tmp):
                os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise StorageError(self.directory, f"cannot create the shard cache folder: {e}") from e

    def path_for(self, url: str, sha256: str | None = None, verified: bool = True) -> str:
        """Where ``url`` is cached; the expected digest is part of the name, so a new version is a new entry.

        ``verified=False``: the name of a copy downloaded without checking that digest (the same as the verified
        name when there is no digest to check).
        """
        expected = _normalize_sha256(url, sha256)
        flag = "\nunverified" if expected is not None and not verified else ""
        key = hashlib.sha256(f"{url}\n{expected or ''}{flag}".encode()).hexdigest()[:40]
        base = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[-80:]
        return os.path.join(self._data, f"{key}-{base}")

    def fetch(self, url: str, sha256: str | None = None, verify: bool = True) -> str:
        """A local path holding the bytes of ``url``, downloaded on a miss and verified against ``sha256``.

        A mismatch is a ChecksumMismatchError naming the URL, the expected and the actual digest; the bad download
        is not kept. ``verify=False`` skips the check but still keys the entry by ``sha256``, so an object
        rewritten at the same URL (a new manifest digest) is downloaded again, never served stale; such an entry
        is kept under its own name and checked before a ``verify=True`` fetch serves it. Prefer open(): an entry
        can be evicted by another process between fetch() and opening its path.
        """
        expected = _normalize_sha256(url, sha256)
        if not storage.is_remote(url):
            path = storage.local_path(url)
            if expected is not None and verify:
                self._verify(url, path, expected)
            return path
        path = self.path_for(url, expected)
        unchecked = self.path_for(url, expected, verified=False)
        if self._touch(path):
            self.hits += 1
            return path
        if not verify and self._touch(unchecked):
            self.hits += 1
            return unchecked
        with self._locked(f"{os.path.basename(path)[:2]}.lock"):
            if self._touch(path):
                self.hits += 1
                return path
            if not verify and self._touch(unchecked):
                self.hits += 1
                return unchecked
            if verify and unchecked != path and self._promote(unchecked, path, expected):
                self.hits += 1
                return path
            target = path if verify else unchecked
            tmp = os.path.join(self._tmp, f"{os.path.basename(target)}.{uuid.uuid4().hex[:12]}.tmp")
            try:
                storage.download_file(url, tmp)
                if expected is not None and verify:
                    self._verify(url, tmp, expected)
                os.replace(tmp, target)
            finally:
                with suppress(FileNotFoundError):
                    os.unlink(tmp)
            self.misses += 1
        self.evict(keep=target)
        return target

    def open(self, url: str, sha256: str | None = None, verify: bool = True) -> BinaryIO:
        """fetch() and open, fetching again if another process evicted the entry in between."""
        for _ in range(3):
            path = self.fetch(url, sha256, verify)
            with suppress(FileNotFoundError):
                return open(path, "rb")
        raise StorageError(
            url, f"cached copy in {self.directory} keeps being evicted; is max_bytes too small?"
        )

    def _promote(self, unchecked: str, path: str, expected: str | None) -> bool:
        """Check a copy cached without verification and rename it to its verified name; False when there is no such
        copy (or it does not match, and is deleted: the caller downloads again, and a bad object then fails)."""
        try:
            if storage.sha256_of(unchecked) != expected:
                os.unlink(unchecked)
                return False
            os.replace(unchecked, path)
            os.utime(path)
        except (FileNotFoundError, storage.StorageNotFoundError):  # never cached, or evicted meanwhile
            return False
        return True

    def _verify(self, url: str, path: str, expected: str) -> None:
        actual = storage.sha256_of(path)
        if actual != expected:
            raise ChecksumMismatchError(url, f"sha256 mismatch: expected {expected}, actual {actual}")

    @staticmethod
    def _touch(path: str) -> bool:
        """Mark an entry as just used (LRU by access time); False when it is not cached."""
        try:
            os.utime(path)
            return True
        except FileNotFoundError:
            return False

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        fd = os.open(os.path.join(self._locks, name), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def entries(self) -> list[tuple[float, int, str]]:
        """(access time, size, path) of the complete entries, oldest first.

        Only names of the entry pattern in ``data/`` count; anything else (downloads in progress, under any temporary
        name) is never listed, so never evicted, and is deleted only once untouched for an hour (its process died).
        """
        found = []
        now = time.time()
        for folder in (self._data, self._tmp):
            with os.scandir(folder) as it:
                for entry in it:
                    with suppress(FileNotFoundError):
                        if not entry.is_file(follow_symlinks=False):
                            continue
                        st = entry.stat()
                        complete = folder == self._data and _ENTRY_NAME.fullmatch(entry.name) is not None
                        if complete and not entry.name.endswith(".tmp"):
                            found.append((st.st_atime, st.st_size, entry.path))
                        elif now - st.st_mtime > _STALE_TMP_SECONDS:
                            os.unlink(entry.path)
        return sorted(found)

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def evict(self, keep: str | None = None) -> list[str]:
        """Delete least-recently-used entries until the total fits ``max_bytes``; never ``keep``. Returns them."""
        removed: list[str] = []
        with self._locked("evict.lock"):
            entries = self.entries()
            total = sum(size for _, size, _ in entries)
            for _, size, path in entries:
                if total <= self.max_bytes:
                    break
                if path == keep:
                    continue
                with suppress(FileNotFoundError):
                    os.unlink(path)
                    removed.append(path)
                total -= size
        return removed

"""Where a job writes a data set: never over a different complete one, and no stale shards left beside it.

Writers (``dgm prepare``, ``dgm tokenize``) name their shards shard-NNNNNN.tar and resume by the plan fingerprint in
each shard's info file. Writing data set B where data set A is complete would overwrite A's shards one by one while
A's manifest still lists their old checksums: A breaks the moment the first shard lands, and stays broken if B's
job stops. So a different complete data set is refused unless the user asks to replace it, and then its manifest is
removed first (A reads as incomplete, never as silently corrupt). After the new manifest is written, shard files of
an earlier, larger data set that the new one does not list are removed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable

from data_pipeline import storage
from data_pipeline.manifest import DatasetError, Manifest, load_manifest, manifest_url

FINGERPRINT_KEY = "fingerprint"
_SHARD_FILE = re.compile(r"^shard-\d{6}\.tar(\.info\.json)?$")


def _fingerprint_of(manifest: Manifest, output: str) -> str | None:
    """The plan fingerprint a manifest was written under: recorded in it, or (older manifests) in its first shard's
    info file; None when neither says."""
    recorded = manifest.extra.get(FINGERPRINT_KEY)
    if isinstance(recorded, str):
        return recorded
    try:
        info = json.loads(storage.read_bytes(storage.join(output, manifest.shards[0].name + ".info.json")))
        return info.get("fingerprint") if isinstance(info, dict) else None
    except (storage.StorageError, ValueError):
        return None


def check_output(output: str, fingerprint: str, *, overwrite: bool, say: Callable[[str], None],
                 job: str = "prepare") -> None:
    """Refuse ``output`` when it holds a complete data set of another plan; with ``overwrite``, remove that data
    set's manifest so it reads as incomplete while the new one is written. A manifest that cannot be read is
    reported and written over (that data set is unusable already)."""
    url = manifest_url(output)
    if not storage.exists(url):
        return
    try:
        existing = load_manifest(output)
    except DatasetError as e:
        say(f"[{job}] {url}: replacing a manifest that cannot be read ({e})")
        return
    if _fingerprint_of(existing, output) == fingerprint:
        return
    what = (f"{existing.total} samples in {len(existing.shards)} shards, source {existing.source.get('name')!r}, "
            f"codec {existing.codec.get('name')!r}")
    if not overwrite:
        raise DatasetError(f"{output}: already holds a different data set ({what}); writing this one over it would "
                           "break it. Choose another output, delete that data set, or pass --overwrite to replace it")
    say(f"[{job}] --overwrite: replacing the data set at {output} ({what})")
    storage.delete(url)


def remove_leftovers(output: str, keep: Iterable[str], say: Callable[[str], None], job: str = "prepare") -> list[str]:
    """Delete shard files (shard-NNNNNN.tar and their .info.json) directly under ``output`` that are not among
    ``keep`` (shard names): what a larger earlier data set left there. Returns the URLs removed."""
    wanted = set(keep)
    wanted |= {name + ".info.json" for name in wanted}
    base = output.rstrip("/")
    removed = []
    for item in storage.list_prefix(output):
        name = item[len(base) + 1:] if item.startswith(base + "/") else item.rsplit("/", 1)[-1]
        if _SHARD_FILE.match(name.replace("\\", "/")) and name not in wanted:
            storage.delete(item)
            removed.append(item)
    if removed:
        say(f"[{job}] removed {len(removed)} shard files of an earlier data set that this one does not list")
    return removed

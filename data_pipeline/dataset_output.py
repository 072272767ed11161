"""Where a job writes a data set: never over a different complete one, and no stale shards left beside it.

Writers (``dgm prepare``, ``dgm tokenize``) name their shards shard-NNNNNN.tar and resume by the plan fingerprint in
each shard's info file. Writing data set B where data set A is complete would overwrite A's shards one by one while
A's manifest still lists their old checksums: A breaks the moment the first shard lands, and stays broken if B's
job stops. So a different complete data set is refused unless the user asks to replace it, and then its manifest,
tokenizer and preview are removed first (A reads as incomplete, never as silently corrupt). After the new manifest
is written, shard files of an earlier, larger data set that the new one does not list are removed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable

from data_pipeline import storage
from data_pipeline.caption_tokenizer import TOKENIZER_FILE
from data_pipeline.manifest import MANIFEST_NAME, DatasetError, Manifest, manifest_url, parse_manifest
from data_pipeline.preview import PREVIEW_NAME

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
                 job: str = "prepare", retire: bool = True) -> None:
    """Refuse ``output`` when it holds a complete data set of another plan, or a manifest this dgm cannot read
    (a newer format, damage: what it describes is unknown); with ``overwrite``, retire that data set first: its
    manifest, tokenizer and preview are removed, so it reads as incomplete while the new one is written. Storage
    errors (access denied, an outage) propagate: they say nothing about what is there. ``retire=False`` checks
    only (a job writing several outputs checks them all before it retires any)."""
    url = manifest_url(output)
    if not storage.exists(url):
        foreign = _foreign_shards(output)
        if foreign and not overwrite:
            raise DatasetError(f"{output}: holds {len(foreign)} shard file(s) that no dgm job wrote (e.g. {foreign[0]}, "
                               "with no .info.json beside it) and no manifest; writing here would overwrite or "
                               "delete them. Choose another output, or pass --overwrite to replace them")
        if foreign:
            say(f"[{job}] --overwrite: replacing {len(foreign)} shard file(s) no dgm job wrote at {output}")
        return
    data = storage.read_bytes(url)
    try:
        existing = parse_manifest(data.decode("utf-8"), url)
        if _fingerprint_of(existing, output) == fingerprint:
            return
        what = (f"a different data set ({existing.total} samples in {len(existing.shards)} shards, source "
                f"{existing.source.get('name')!r}, codec {existing.codec.get('name')!r})")
    except (DatasetError, UnicodeDecodeError) as e:
        what = f"a manifest this dgm cannot read ({e})"
    if not overwrite:
        raise DatasetError(f"{output}: already holds {what}; writing this data set over it would break it. Choose "
                           "another output, delete that data set, or pass --overwrite to replace it")
    if not retire:
        return
    say(f"[{job}] --overwrite: replacing {what} at {output}")
    for name in (MANIFEST_NAME, TOKENIZER_FILE, PREVIEW_NAME):
        storage.delete(storage.join(output, name))


def _foreign_shards(output: str) -> list[str]:
    """Shard files named as dgm names them in an output without a single info file of dgm's: another tool's
    WebDataset shards (a dgm job cut short has the info file of every shard it finished)."""
    base = output.rstrip("/")
    names = [item[len(base) + 1:] for item in storage.list_prefix(output) if item.startswith(base + "/")]
    if any(_SHARD_FILE.match(name) and name.endswith(".info.json") for name in names):
        return []
    return sorted(name for name in names if _SHARD_FILE.match(name))


def remove_leftovers(output: str, keep: Iterable[str], say: Callable[[str], None], job: str = "prepare") -> list[str]:
    """Delete shard files (shard-NNNNNN.tar and their .info.json) directly under ``output`` that are not among
    ``keep`` (shard names): what a larger earlier data set left there. Returns the URLs removed."""
    wanted = set(keep)
    wanted |= {name + ".info.json" for name in wanted}
    base = output.rstrip("/")
    removed = []
    for item in storage.list_prefix(output):
        if not item.startswith(base + "/"):
            continue  # spelled differently (a local path listed another way): never guess which file it is
        name = item[len(base) + 1:]
        if _SHARD_FILE.match(name) and name not in wanted:
            storage.delete(item)
            removed.append(item)
    if removed:
        say(f"[{job}] removed {len(removed)} shard files of an earlier data set that this one does not list")
    return removed

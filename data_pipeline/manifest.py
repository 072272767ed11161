"""The dataset manifest: the one file that says what a sharded dataset is and how to check it."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from data_pipeline import storage

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
EXAMPLES_KEPT = 5  # encoding examples a manifest keeps over all its shards


class DatasetError(ValueError):
    """A dataset (manifest, shard or sample) that is missing, malformed or does not match its manifest."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    bytes: int
    sha256: str
    first_index: int
    offsets: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    """Each sample's sequence length (rows, end token included) for codecs that write variable-length sequences;
    empty for the others."""
    encoding: dict[str, Any] = field(default_factory=dict)
    """What the codec reported of this shard's encodes (codecs with ``encode_report``): counts such as values
    clipped or JPEG files read for their coefficients, and under ``examples`` the first reasons for anything the
    user may want to fix; empty for other codecs."""
    labels: dict[str, int] = field(default_factory=dict)
    """How many of the shard's samples carry each class label (keys are the labels as JSON strings): what lets a
    run refuse labels its model has no class for before it starts, and sampling default to the classes the data
    holds. Empty for unlabelled sources and for shards written by an older dgm."""


@dataclass
class Manifest:
    """What `dgm prepare` wrote: shard list with counts, sizes and checksums, plus the source and codec settings."""

    source: dict[str, Any]
    codec: dict[str, Any]
    shards: list[ShardInfo]
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    url: str = ""

    @property
    def total(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def shard_counts(self) -> list[int]:
        return [s.count for s in self.shards]

    @property
    def sequence_lengths(self) -> list[int]:
        """Every sample's sequence length in dataset order ([] when the codec writes none)."""
        return [n for s in self.shards for n in s.lengths]

    @property
    def encoding(self) -> dict[str, Any]:
        """The shards' encoding reports summed (counts) and joined (the first ``EXAMPLES_KEPT`` examples)."""
        total: dict[str, Any] = {}
        for shard in self.shards:
            for key, value in shard.encoding.items():
                if key == "examples":
                    total["examples"] = (total.get("examples", []) + value)[:EXAMPLES_KEPT]
                else:
                    total[key] = total.get(key, 0) + value
        return total

    @property
    def label_counts(self) -> dict[str, int]:
        """Samples per class label over all shards, in label order (``{}``: no shard records labels)."""
        total: dict[str, int] = {}
        for shard in self.shards:
            for label, n in shard.labels.items():
                total[label] = total.get(label, 0) + n
        return dict(sorted(total.items(), key=lambda kv: int(kv[0])))

    def shard_url(self, i: int) -> str:
        return storage.join(self.url, self.shards[i].name)

    def to_json(self) -> str:
        """Indented JSON, each shard's lengths on one line (a million samples add megabytes, not a million
        lines); an empty ``lengths`` is left out, so manifests of other codecs read as before."""
        data = asdict(self)
        data.pop("url")
        rows = {}
        for i, shard in enumerate(data["shards"]):
            if shard["lengths"]:
                rows[f"@lengths-{i}@"] = json.dumps(shard["lengths"], separators=(",", ":"))
                shard["lengths"] = f"@lengths-{i}@"
            else:
                del shard["lengths"]
            for key in ("encoding", "labels"):
                if not shard[key]:
                    del shard[key]
        text = json.dumps(data, indent=1, sort_keys=True)
        for placeholder, row in rows.items():
            text = text.replace(f'"{placeholder}"', row, 1)
        return text


def manifest_url(dataset_url: str) -> str:
    return dataset_url if dataset_url.endswith(".json") else storage.join(dataset_url, MANIFEST_NAME)


def _require(cond: bool, url: str, what: str) -> None:
    if not cond:
        raise DatasetError(f"{url}: {what}")


def parse_manifest(text: str, url: str) -> Manifest:
    """Parse and validate a manifest's JSON text; every problem names the manifest and the field."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{url}: not valid JSON ({e})") from e
    _require(isinstance(data, dict), url, "manifest must be a JSON object")
    version = data.get("format_version")
    _require(
        version == FORMAT_VERSION,
        url,
        f"unknown manifest format_version {version!r} (this dgm reads version {FORMAT_VERSION})",
    )
    for key in ("source", "codec", "shards"):
        _require(key in data, url, f"missing field {key!r}")
    for key in ("source", "codec"):  # {"name": ..., "settings": {...}}: read with .get() everywhere after this
        _require(isinstance(data[key], dict) and isinstance(data[key].get("name"), str)
                 and isinstance(data[key].get("settings", {}), dict), url,
                 f"field {key!r} must be an object with a 'name' and 'settings', got {data[key]!r}")
    _require(isinstance(data["shards"], list) and data["shards"], url, "field 'shards' must be a non-empty list")
    extra = data.get("extra", {})
    _require(isinstance(extra, dict), url, "field 'extra' must be an object")
    stride = extra.get("index_stride")
    _require(stride is None or (type(stride) is int and stride >= 1), url,
             f"extra.index_stride must be a positive int, got {stride!r}")
    shards = []
    before, names = 0, set()
    for i, raw in enumerate(data["shards"]):
        _require(isinstance(raw, dict), url, f"shards[{i}] must be an object")
        try:
            info = ShardInfo(**raw)
        except TypeError as e:
            raise DatasetError(f"{url}: shards[{i}] has wrong fields ({e})") from e
        _require(isinstance(info.count, int) and info.count > 0, url, f"shards[{i}].count must be a positive int")
        _require(isinstance(info.sha256, str) and len(info.sha256) == 64
                 and all(c in "0123456789abcdef" for c in info.sha256), url,
                 f"shards[{i}].sha256 must be 64 lower-case hex digits")
        _require("/" not in info.name and info.name.endswith(".tar"), url, f"shards[{i}].name {info.name!r} is bad")
        _require(isinstance(info.lengths, list), url, f"shards[{i}].lengths must be a list of ints")
        _require(not info.lengths or len(info.lengths) == info.count, url,
                 f"shards[{i}].lengths must list one length per sample ({info.count}), got {len(info.lengths)}")
        _require(all(type(n) is int and n >= 1 for n in info.lengths), url,
                 f"shards[{i}].lengths must be positive ints")
        _check_encoding(info.encoding, url, f"shards[{i}].encoding")
        _check_labels(info, url, f"shards[{i}].labels")
        _check_offsets(info, stride, url, f"shards[{i}] ({info.name})")
        _require(info.first_index == before, url,
                 f"shards[{i}].first_index is {info.first_index}, but the shards before it hold {before} samples "
                 "(each shard starts where the last one ended)")
        _require(info.name not in names, url, f"shard {info.name!r} is listed twice: its samples would be read "
                 "twice an epoch")
        before += info.count
        names.add(info.name)
        shards.append(info)
    listed = [bool(s.lengths) for s in shards]
    if any(listed) and not all(listed):
        raise DatasetError(f"{url}: shards[{listed.index(False)}].lengths is missing: every shard lists its "
                           "samples' sequence lengths or none does")
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    return Manifest(
        source=data["source"], codec=data["codec"], shards=shards, extra=extra, url=base
    )


def _check_offsets(info: ShardInfo, stride: int | None, url: str, where: str) -> None:
    """Readers seek straight to ``offsets[k]`` for sample ``k * stride``: a wrong offset would silently start a
    shard at the wrong sample, so the index must be one a tar of this shard's size can have."""
    offsets = info.offsets
    _require(isinstance(offsets, list) and all(type(o) is int for o in offsets), url,
             f"{where}: field 'offsets' must be a list of ints")
    if not offsets:
        return
    _require(type(info.bytes) is int and info.bytes > 0, url, f"{where}: field 'bytes' must be a positive int")
    _require(offsets[0] == 0, url, f"{where}: field 'offsets' must start at 0 (the first sample), got {offsets[0]}")
    for k in range(1, len(offsets)):
        _require(offsets[k] > offsets[k - 1], url, f"{where}: field 'offsets' must be strictly increasing, but "
                 f"offsets[{k}]={offsets[k]} follows offsets[{k - 1}]={offsets[k - 1]}")
    _require(offsets[-1] < info.bytes, url, f"{where}: field 'offsets' has offsets[{len(offsets) - 1}]="
             f"{offsets[-1]}, not below the shard's size (bytes={info.bytes})")
    misaligned = next((k for k, o in enumerate(offsets) if o % 512), None)
    _require(misaligned is None, url, f"{where}: field 'offsets' has offsets[{misaligned}]="
             f"{offsets[misaligned or 0]}, not a tar header position (a multiple of 512)")
    if stride is not None:
        want = -(-info.count // stride)
        _require(len(offsets) == want, url, f"{where}: field 'offsets' lists {len(offsets)} positions; {info.count} "
                 f"samples at extra.index_stride={stride} need {want}")


def _check_encoding(encoding: Any, url: str, where: str) -> None:
    _require(isinstance(encoding, dict), url, f"{where} must be an object")
    for key, value in encoding.items():
        if key == "examples":
            _require(isinstance(value, list) and all(isinstance(v, str) for v in value), url,
                     f"{where}.examples must be a list of strings")
        else:
            _require(type(value) is int and value >= 0, url, f"{where}.{key} must be a count (an int >= 0)")


def _check_labels(info: ShardInfo, url: str, where: str) -> None:
    labels = info.labels
    _require(isinstance(labels, dict), url, f"{where} must be an object of label -> count")
    for key, value in labels.items():
        _require(re.fullmatch(r"0|[1-9][0-9]*", key) is not None, url, f"{where}: label {key!r} is not an integer >= 0")
        _require(type(value) is int and value >= 1, url, f"{where}.{key} must be a count (an int >= 1)")
    _require(sum(labels.values()) <= info.count, url,
             f"{where} counts {sum(labels.values())} labelled samples, but the shard holds {info.count}")


def load_manifest(dataset_url: str) -> Manifest:
    """Read the manifest of a dataset folder (local or s3://) or of an explicit manifest.json URL."""
    try:
        url = manifest_url(dataset_url)
        text = storage.read_bytes(url).decode("utf-8")
    except storage.StorageError as e:
        raise DatasetError(f"dataset {dataset_url}: cannot read its manifest ({e}); `dgm prepare CONFIG` writes a "
                           "config's data sets") from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"{url}: not UTF-8 text, so not a manifest ({e})") from e
    return parse_manifest(text, url)


def save_manifest(dataset_url: str, manifest: Manifest) -> None:
    storage.write_bytes(manifest_url(dataset_url), manifest.to_json().encode("utf-8"))

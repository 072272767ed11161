"""A sample's label, caption and attributes as the WebDataset members every codec writes beside its payload:
``.cls`` (ASCII int), ``.txt`` (UTF-8), ``.json``."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

METADATA = ("label", "caption", "attributes")


class SampleDecodeError(ValueError):
    """A shard member that cannot be decoded into a sample."""


def encode_metadata(sample: Any, keep: Iterable[str] = METADATA) -> dict[str, bytes]:
    """The kept metadata of a source Sample as shard members (absent values write nothing)."""
    keep = set(keep)
    fields: dict[str, bytes] = {}
    if sample.label is not None and "label" in keep:
        fields["cls"] = str(int(sample.label)).encode()
    if sample.caption is not None and "caption" in keep:
        fields["txt"] = sample.caption.encode("utf-8")
    if sample.attributes is not None and "attributes" in keep:
        fields["json"] = json.dumps(sample.attributes, sort_keys=True).encode("utf-8")
    return fields


def decode_metadata(fields: dict[str, Any]) -> dict[str, Any]:
    """Shard members -> {"label"?, "caption"?, "attributes"?}; malformed bytes name the sample."""
    out: dict[str, Any] = {}
    try:
        if "cls" in fields:
            out["label"] = int(fields["cls"].decode())
        if "txt" in fields:
            out["caption"] = fields["txt"].decode("utf-8")
        if "json" in fields:
            out["attributes"] = json.loads(fields["json"].decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SampleDecodeError(f"sample {fields.get('__key__', '?')}: malformed metadata ({e})") from e
    return out

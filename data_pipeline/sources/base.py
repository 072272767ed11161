"""The contract every data source keeps, and the generic checks shared by all of them.

A source is a finite, indexable collection of samples: random access by index is what lets one Ray task write
one shard without reading the others, and a stable key per sample is what lets a manifest, a resumed run and a
scorer agree on which sample is which.
"""
from __future__ import annotations

import dataclasses
import operator
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import numpy as np

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
"""Keys become tar member prefixes in WebDataset shards: a dot would split the key, a slash would make a folder."""


@dataclass
class Sample:
    """One sample. `image` is uint8 HxWx3 (RGB) or HxWx1 (grey); the other fields are optional metadata."""

    key: str
    image: np.ndarray
    label: int | None = None
    caption: str | None = None
    attributes: dict | None = None
    source_file: str | None = None
    """The file ``image`` was decoded from, set only when the image is that file's content unchanged (no resize,
    rotation or crop): a codec that can read the file's own encoding (JPEG coefficients) may use it instead."""

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not KEY_PATTERN.match(self.key):
            raise ValueError(f"sample key {self.key!r} must be non-empty and use only [A-Za-z0-9_-]")
        img = self.image
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
            raise TypeError(f"sample {self.key}: image must be a uint8 numpy array")
        if img.ndim != 3 or img.shape[2] not in (1, 3) or img.shape[0] == 0 or img.shape[1] == 0:
            raise ValueError(f"sample {self.key}: image shape {img.shape} is not HxWx1 or HxWx3")


@runtime_checkable
class Source(Protocol):
    """What shard writers need: a length, a JSON description for the manifest, and samples by index."""

    name: str

    def __len__(self) -> int: ...

    def settings(self) -> dict:
        """JSON-serialisable settings; `build_source(name, settings)` rebuilds the same source from them."""
        ...

    def sample(self, index: int) -> Sample: ...


def check_index(index: int, length: int, source_name: str) -> int:
    """Validate a sample index; negative indices are refused because keys must not depend on how one asked."""
    try:
        i = operator.index(index)
    except TypeError:
        raise TypeError(f"{source_name}: sample index must be an integer, got {type(index).__name__}") from None
    if not 0 <= i < length:
        raise IndexError(f"{source_name}: sample index {i} out of range (source has {length} samples, 0..{length - 1})")
    return i


C = TypeVar("C")


def _matches(value: Any, hint: Any) -> bool:
    """True when `value` fits the type hint; bool is not accepted as an int, int is accepted as a float."""
    if hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(hint))
    if origin in (list, tuple):
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return False
        return not args or all(_matches(v, args[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint)


class SettingsError(TypeError, ValueError):
    """A setting of the wrong type: a TypeError for callers, a ValueError for the CLI's one-line user errors."""


def _number_hint(value: Any) -> str:
    """YAML 1.1 reads ``1e4`` (no dot) as text: say so when a string would have been a fine number."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (YAML reads numbers like 1e4 as text: write 10000 or 1.0e4)"
    return ""


def config_from_settings(config_cls: type[C], settings: Mapping[str, Any] | None, where: str) -> C:
    """Build a typed config dataclass from plain settings, naming the offending key on any mismatch.

    Checks unknown keys and type hints here; value ranges are checked by each config's `__post_init__`.
    """
    settings = {} if settings is None else settings
    if not isinstance(settings, Mapping):
        raise SettingsError(f"{where}: settings must be a mapping, got {type(settings).__name__}")
    fields = {f.name: f for f in dataclasses.fields(config_cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(config_cls)
    values: dict[str, Any] = {}
    for key, value in settings.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ValueError(f"{where}: unknown setting {key!r} (known settings: {known})")
        hint = hints[key]
        if not _matches(value, hint):
            raise SettingsError(f"{where}: setting {key!r} must be {_describe(hint)}, got {value!r}"
                                f"{_number_hint(value)}")
        if hint is float and isinstance(value, int):
            value = float(value)
        values[key] = value
    return config_cls(**values)


def config_settings(config: Any) -> dict:
    """The JSON-serialisable form of a config dataclass (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def sanitise_key(text: str, max_len: int = 80) -> str:
    """Map arbitrary text to the key alphabet: every other character becomes '_'."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", text)[:max_len]
    return cleaned or "_"

"""Data sources: indexable, reproducible collections of samples that shard writers turn into WebDataset shards.

`build_source(name, settings)` is the one entry point used by `dgm prepare`; `SOURCES` maps each registry name to
(typed config dataclass, builder taking that config). Settings are checked against the config's fields and type
hints, so a typo or a wrong type is reported with the key's name before any work starts.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .base import Sample, Source, config_from_settings
from .digits import DigitsConfig, DigitsSource
from .image_folder import ImageFolderConfig, ImageFolderSource
from .mixtures import MixtureConfig, MixtureSource
from .shapes import ShapesConfig, ShapesSource

SOURCES: dict[str, tuple[type, Callable[[Any], Source]]] = {
    ShapesSource.name: (ShapesConfig, ShapesSource),
    DigitsSource.name: (DigitsConfig, DigitsSource),
    ImageFolderSource.name: (ImageFolderConfig, ImageFolderSource),
    MixtureSource.name: (MixtureConfig, MixtureSource),
}


def build_source(name: str, settings: Mapping[str, Any] | None = None) -> Source:
    """Build the named source from plain (e.g. YAML or manifest) settings; unknown names and keys are errors."""
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r} (known sources: {', '.join(sorted(SOURCES))})")
    config_cls, builder = SOURCES[name]
    return builder(config_from_settings(config_cls, settings, where=f"source {name!r}"))


__all__ = ["SOURCES", "Sample", "Source", "build_source", "ShapesConfig", "ShapesSource", "DigitsConfig",
           "DigitsSource", "ImageFolderConfig", "ImageFolderSource"]

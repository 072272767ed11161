"""Finding the codec's compiled kernel, also from a copy of the project that lacks it.

A Ray job runs a copy of the project's sources (its working_dir: what git tracks, so no build products) ahead of
the node's installed dgm on sys.path. That copy's ``data_pipeline/codecs`` has no ``_dct_kernel`` extension, while
the node's install (``pip install -e`` in the cluster's setup commands) built one for the node's own Python. The
kernel is a self-contained C extension, so when the package's own import fails it is loaded from the installed
dgm distribution instead: from the files a wheel install recorded, or from the folder of an editable install.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
from importlib import metadata
from pathlib import Path
from types import ModuleType
from urllib.parse import unquote, urlparse

MODULE = "data_pipeline.codecs._dct_kernel"
HERE = Path(__file__).resolve().parent
INTERFACE = 2
"""The kernel build these sources need (``DCTK_INTERFACE`` in _dct_kernel.c): a build of older sources reads the
tables of these ones wrongly, without an error, so it is not used."""

stale: list[str] = []
"""Builds found but refused as built from other sources (the fallback warning names them)."""


def _current(module: ModuleType) -> bool:
    if getattr(module, "INTERFACE", 1) == INTERFACE:
        return True
    stale.append(str(getattr(module, "__file__", module)))
    return False


def load_kernel() -> ModuleType | None:
    """The kernel module: this package's own build, else the installed dgm's; None when neither imports or every
    build found is of other sources (rebuild with `pip install -e .`, which `make setup` runs)."""
    try:
        from data_pipeline.codecs import _dct_kernel
    except ImportError:
        pass
    else:
        if _current(_dct_kernel):
            return _dct_kernel
    for path in installed_kernels():
        try:
            spec = importlib.util.spec_from_file_location(MODULE, path)
            if spec is None or spec.loader is None:
                continue
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except ImportError:  # built for another Python: try the next
            continue
        if _current(module):
            return module
    return None


def installed_kernels() -> list[Path]:
    """Built kernels of the installed dgm that are not this package's own, in the order to try them."""
    try:
        dist = metadata.distribution("dgm")
    except metadata.PackageNotFoundError:
        return []
    found = [Path(str(dist.locate_file(f))) for f in dist.files or []
             if f.parent.as_posix() == "data_pipeline/codecs" and f.name.startswith("_dct_kernel.")]
    url = urlparse(json.loads(dist.read_text("direct_url.json") or "{}").get("url", ""))
    if url.scheme == "file":  # an editable install: its project folder holds the build
        folder = Path(unquote(url.path)) / "data_pipeline" / "codecs"
        found += [folder / f"_dct_kernel{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    return [p for p in found if p.is_file() and p.resolve().parent != HERE]

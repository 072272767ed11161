"""JPEG / PNG files under a folder, or the sample photographs shipped inside scikit-image and scikit-learn.

Files are found recursively (hidden files and folders, whose names start with '.', are ignored) and sorted by
relative path, so index i and its key are stable for an unchanged folder. The key is the sanitised relative path
plus 8 hex digits of its SHA-1, so two paths that sanitise alike still get different keys.

Folders are followed through symbolic links (each real folder once); a folder that cannot be listed is an error
naming it, never silently left out. File names need not be UTF-8: keys hash the name's bytes.

Every file's header is read when the source is built; with `verify="decode"` (the default when `skip_bad=True`)
all of it is decoded. An unreadable file raises `BadImageError` naming it, or with `skip_bad=True` is left out with
a warning. A file that passes a header-only scan but fails to decode later raises `BadImageError` naming it. The
scan is done once: `content_digest` (paths, sizes, modes, dimensions, EXIF orientations, what was
skipped) is what `dgm prepare` fingerprints, so shards written from one listing are never reused for another.

Conversions to uint8 RGB: EXIF orientation is applied (an EXIF block that cannot be parsed counts as "upright");
grey (L, 1, I;16, I, F) is replicated to three channels (the 16-bit I modes scaled by 1/257, F clipped to 0..255);
images with alpha (RGBA, LA, PA, or any mode with a PNG transparency entry) are composited on white; other
modes (P, CMYK, YCbCr) go through Pillow's RGB conversion. With `resolution`, the centred square of side
min(w, h) is resized to resolution x resolution (Lanczos), i.e. shorter side resized then centre-cropped.
Without `resolution`, an upright (EXIF orientation 1 or none) YCbCr or grey JPEG also hands over its path
(`Sample.source_file`), so the DCT codec can take its stored coefficients (`jpeg_source`) instead of its pixels.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from .base import Sample, check_index, config_settings, sanitise_key

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
BUILTIN_SAMPLES = "builtin:samples"
_SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
    "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png",
    "retina.jpg", "rocket.jpg",
)
_SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
ORIENTATION_TAG = 0x0112  # EXIF orientation: 1 means the stored pixels are upright
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


class BadImageError(ValueError):
    """A file that is not a readable JPEG/PNG image; the message names the file."""


def _package_dir(package: str) -> Path:
    """Installed folder of a package, found without importing it (importing scikit-learn takes seconds)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"image_folder: {BUILTIN_SAMPLES!r} needs {package} installed (it ships the files)")
    return Path(spec.origin).parent


def builtin_sample_images() -> dict[str, Path]:
    """The photographs installed with scikit-image (skimage/data) and scikit-learn (sklearn/datasets/images).

    Maps a relative name ('skimage/astronaut.png', 'sklearn/china.jpg') to the installed file; nothing is copied.
    Files missing from an installation are left out.
    """
    dirs = {
        "skimage": (_package_dir("skimage") / "data", _SKIMAGE_PHOTOS),
        "sklearn": (_package_dir("sklearn") / "datasets" / "images", _SKLEARN_PHOTOS),
    }
    return {
        f"{prefix}/{name}": folder / name
        for prefix, (folder, names) in dirs.items()
        for name in names
        if (folder / name).is_file()
    }


def find_images(root: Path) -> dict[str, Path]:
    """JPEG/PNG files under `root` (recursive, hidden entries skipped), keyed by POSIX relative path, sorted."""
    if not root.is_dir():
        raise FileNotFoundError(f"image_folder: {root} is not a folder")
    def unreadable(error: OSError) -> None:
        raise ValueError(f"image_folder: cannot list folder {error.filename} ({error.strerror or error})")

    found: dict[str, Path] = {}
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back to a folder already walked (a loop, or two links to one folder)
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                path = Path(dirpath) / name
                found[path.relative_to(root).as_posix()] = path
    return dict(sorted(found.items()))


def image_key(relative_path: str) -> str:
    """Stable sample key of a file: sanitised relative path + short hash of the exact path."""
    digest = hashlib.sha1(os.fsencode(relative_path)).hexdigest()[:8]
    return f"{sanitise_key(relative_path)}-{digest}"


def display_path(relative_path: str) -> str:
    """The path as text that can always be printed and stored (bytes that are not UTF-8 shown as U+FFFD)."""
    return os.fsencode(relative_path).decode("utf-8", "replace")


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8) of an opened image; 1 when there is none or the EXIF block cannot be parsed."""
    try:
        value = img.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # Pillow raises many types on damaged EXIF; the pixels as stored are still an image
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB with the documented rules (module doc)."""
    mode = img.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or ("transparency" in img.info and not mode.startswith("I")):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return img
    if mode in ("L", "1"):
        return img.convert("L").convert("RGB")
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if mode != "F":  # I modes come from 16-bit PNGs (older Pillow opens them as "I", newer as "I;16")
            arr = arr / 257.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        if "transparency" in img.info:  # a 16-bit grey PNG's tRNS names one value: on white, as other modes
            grey[np.asarray(img) == img.info["transparency"]] = 255
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB")
    return img.convert("RGB")


def load_image(path: Path, resolution: int | None = None) -> np.ndarray:
    """Decode one file to uint8 HxWx3 RGB (resized and centre-cropped when `resolution` is given)."""
    return _load(path, resolution)[0]


def _load(path: Path, resolution: int | None) -> tuple[np.ndarray, bool]:
    """(uint8 HxWx3 RGB, whether it is a JPEG file's own YCbCr or grey content, unrotated and unresized)."""
    try:
        with Image.open(path) as opened:
            turn = orientation(opened)
            plain = resolution is None and opened.format in ("JPEG", "MPO") and opened.mode in ("RGB", "L") \
                and turn == 1
            img = to_rgb(opened)
            if turn != 1:
                img = img.transpose(_TRANSPOSE[turn])
            if resolution is not None:
                w, h = img.size
                s = min(w, h)
                left, top = (w - s) // 2, (h - s) // 2
                img = img.resize((resolution, resolution), Image.Resampling.LANCZOS,
                                 box=(left, top, left + s, top + s))
            return np.array(img, dtype=np.uint8), plain
    except Exception as e:  # Pillow's decoders raise OSError, ValueError, SyntaxError, struct.error, ...
        raise BadImageError(f"{display_path(str(path))}: cannot decode image ({type(e).__name__}: {e})") from e


def _probe(path: Path, decode: bool) -> tuple[list[int], str, int, int]:
    """(size [w, h] as stored, mode, EXIF orientation, file bytes) after reading the header (and decoding it all
    when `decode`, as sample() would)."""
    try:
        with Image.open(path) as img:
            if img.format not in ("JPEG", "PNG", "MPO"):
                raise BadImageError(f"{display_path(str(path))}: is {img.format}, not JPEG or PNG")
            if decode:
                img.load()
                to_rgb(img)
            return [int(img.width), int(img.height)], img.mode, orientation(img), path.stat().st_size
    except BadImageError:
        raise
    except Exception as e:
        raise BadImageError(f"{display_path(str(path))}: not a readable image ({type(e).__name__}: {e})") from e


@dataclass
class ImageFolderConfig:
    """Settings of the image-folder source; `path` is a folder or 'builtin:samples'."""

    path: str = BUILTIN_SAMPLES
    resolution: int | None = None
    skip_bad: bool = False
    verify: Literal["header", "decode"] | None = None  # None: "decode" with skip_bad (so a truncated file is
    # skipped, not met mid-prepare), else "header"

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("image_folder: path must be a folder or 'builtin:samples'")
        if self.path.startswith("builtin:") and self.path != BUILTIN_SAMPLES:
            raise ValueError(f"image_folder: unknown builtin set {self.path!r} (known: {BUILTIN_SAMPLES!r})")
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"image_folder: resolution must be >= 1 or None, got {self.resolution}")


class ImageFolderSource:
    """Images from files; label and caption are None, attributes give the relative path and original size/mode."""

    name = "image_folder"

    def __init__(self, config: ImageFolderConfig | None = None) -> None:
        self.config = cfg = config or ImageFolderConfig()
        files = builtin_sample_images() if cfg.path == BUILTIN_SAMPLES else find_images(Path(cfg.path))
        decode = (cfg.verify or ("decode" if cfg.skip_bad else "header")) == "decode"
        self.skipped: list[str] = []
        self._entries: list[tuple[str, Path, list[int], str]] = []
        listing = hashlib.sha256()
        for rel, path in files.items():
            try:
                size, mode, turn, nbytes = _probe(path, decode)
            except BadImageError as e:
                if not cfg.skip_bad:
                    raise
                print(f"[prepare] image_folder: skipping {e}", file=sys.stderr, flush=True)
                self.skipped.append(rel)
                listing.update(b"skip\0" + os.fsencode(rel) + b"\0")
                continue
            if turn >= 5:  # EXIF orientations 5..8 turn the image a quarter: width and height swap
                size = size[::-1]
            self._entries.append((rel, path, size, mode))
            # A new EXIF orientation keeps a file's length and dimensions but turns its pixels (only a turned file
            # adds it, so upright folders prepared before keep their fingerprint). Not the mtime: a copy of the
            # same files would read as another data set.
            turned = f"turn{turn}\0" if turn != 1 else ""
            listing.update(os.fsencode(rel) + f"\0{nbytes}\0{mode}\0{size[0]}x{size[1]}\0{turned}".encode())
        if not self._entries:
            raise ValueError(f"image_folder: no readable JPEG/PNG files under {cfg.path}")
        self.content_digest = listing.hexdigest()[:16]
        self._keys = [image_key(rel) for rel, *_ in self._entries]
        if len(set(self._keys)) != len(self._keys):
            raise ValueError(f"image_folder: two files under {cfg.path} got the same key")

    def image_shapes(self) -> set[tuple[int, int, int]]:
        """The distinct (H, W, 3) shapes sample() returns (upright, after `resolution`), known from the scan."""
        r = self.config.resolution
        return {(r, r, 3)} if r is not None else {(h, w, 3) for _, _, (w, h), _ in self._entries}

    def __len__(self) -> int:
        return len(self._entries)

    def settings(self) -> dict:
        return config_settings(self.config)

    @property
    def relative_paths(self) -> list[str]:
        """Relative path of each sample, in index order (what keys are derived from)."""
        return [rel for rel, *_ in self._entries]

    def path_of(self, index: int) -> Path:
        """The file behind sample `index`."""
        return self._entries[check_index(index, len(self), self.name)][1]

    def sample(self, index: int) -> Sample:
        i = check_index(index, len(self), self.name)
        rel, path, size, mode = self._entries[i]
        image, plain = _load(path, self.config.resolution)
        return Sample(key=self._keys[i], image=image,
                      attributes={"path": display_path(rel), "original_size": size, "original_mode": mode},
                      source_file=str(path) if plain else None)

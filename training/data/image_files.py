"""Image files and arrays read into `[N, C, H, W]` float32: scikit-learn's digits, `.npy` and
`.npz` arrays, MNIST-style IDX files, folders of PNG or JPEG pictures. Arrays are never unpickled.
"""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from training.data.columns import first_true

__all__ = [
    "ARRAY_SUFFIXES",
    "PICTURE_SUFFIXES",
    "load_array_file",
    "load_digits",
    "load_folder",
    "load_labels",
]

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIXES = (".npy", ".npz")
_IMAGE_KEYS = ("images", "x", "X")
_LABEL_KEYS = ("labels", "y", "Y")
_CHANNELS = (1, 3, 4)
# IDX type codes (the third byte of the magic number) and the big-endian dtype each stands for.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def load_digits() -> tuple[np.ndarray, np.ndarray, None, str]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float32)[:, None, :, :]
    return images, np.asarray(digits.target, dtype=np.int64), None, "sklearn:digits"


@contextmanager
def _numpy_file(source: str, what: str) -> Iterator[None]:
    """numpy's read errors as `DataError`s; a pickled array is refused, never loaded."""
    try:
        yield
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "pickled" in str(exc):
            raise DataError(f"{source}: pickled (object) arrays are refused") from exc
        raise DataError(f"{source}: cannot be read as a {what}: {exc}") from exc
    except (OSError, EOFError) as exc:
        raise DataError(f"{source}: cannot be read as a {what}: {exc}") from exc


def _load_npy(path: Path, source: str) -> np.ndarray:
    with _numpy_file(source, ".npy array"):
        array = np.load(path, allow_pickle=False)
    if not isinstance(array, np.ndarray):
        raise DataError(f"{source}: holds an archive, not a single .npy array")
    return array


def _load_npz(path: Path, source: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The archive's images and labels: the arrays named `images`/`x`/`X` and
    `labels`/`y`/`Y`; or split pairs `x_<part>` with `y_<part>` (Keras' `mnist.npz`:
    `x_train`, `y_train`, `x_test`, `y_test`), every part's images together, `train` first; or
    its one array besides labels. Several arrays that are none of these are refused, naming
    them, rather than one taken by its place in the archive."""
    with _numpy_file(source, ".npz archive"), np.load(path, allow_pickle=False) as archive:
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataError(f"{source}: is not a .npz archive")
        names = list(archive.files)
        image_key = next((k for k in _IMAGE_KEYS if k in names), None)
        if image_key is None:
            pairs = _split_pairs(names)
            if pairs:
                return _joined_parts(archive, pairs, source)
            others = [k for k in names if k not in _LABEL_KEYS]
            if len(others) > 1:
                raise DataError(
                    f"{source}: holds several arrays {others}; name the images 'images' (and "
                    "the labels 'labels'), or pair them as x_<part> with y_<part>"
                )
            image_key = others[0] if others else None
        if image_key is None:
            raise DataError(f"{source}: holds no image array; its arrays are {names}")
        label_key = next((k for k in _LABEL_KEYS if k in names), None)
        images = archive[image_key]
        labels = archive[label_key] if label_key is not None else None
    return images, labels


def _split_pairs(names: list[str]) -> list[tuple[str, str, str]]:
    """(part, images key, labels key) of `x_<part>`/`y_<part>` pairs, `train` first, when every
    `x_` array has its `y_` (either letter in either case); else none."""
    pairs = []
    for key in names:
        if key.startswith(("x_", "X_")):
            part = key[2:]
            labels = next((y for y in (f"y_{part}", f"Y_{part}") if y in names), None)
            if labels is None:
                return []
            pairs.append((part, key, labels))
    return sorted(pairs, key=lambda pair: (pair[0] != "train", pair[0]))


def _joined_parts(
    archive, pairs: list[tuple[str, str, str]], source: str
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for _, x_key, y_key in pairs:
        x, y = archive[x_key], archive[y_key]
        if len(y) != len(x):
            raise DataError(f"{source}: {len(y)} labels {y_key} for {len(x)} images {x_key}")
        if images and x.shape[1:] != images[0].shape[1:]:
            raise DataError(
                f"{source}: {x_key} images are {x.shape[1:]}, {pairs[0][1]} ones "
                f"{images[0].shape[1:]}"
            )
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def _is_idx(name: str) -> bool:
    stem = name.lower().removesuffix(".gz")
    return stem.endswith("ubyte") or stem.endswith((".idx", "idx1", "idx3"))


def _read_idx(path: Path, source: str) -> np.ndarray:
    """Parse an IDX file (the MNIST format): magic 0 0 type ndim, big-endian uint32 dims, data."""
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                raw = handle.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(f"{source}: cannot read the IDX file: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        magic = raw[:4].hex() or "none"
        raise DataError(f"{source}: not an IDX file (magic number {magic})")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise DataError(f"{source}: IDX header truncated: {ndim} dimensions announced")
    dims = struct.unpack(f">{ndim}I", raw[4:offset])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = math.prod(dims)
    expected = count * dtype.itemsize
    if len(raw) - offset != expected:
        raise DataError(
            f"{source}: IDX header announces shape {dims} ({expected} bytes) but "
            f"{len(raw) - offset} bytes follow it"
        )
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def load_array_file(path: Path, source: str) -> tuple[np.ndarray, np.ndarray | None]:
    name = path.name.lower()
    labels: np.ndarray | None = None
    if name.endswith(".npy"):
        array = _load_npy(path, source)
    elif name.endswith(".npz"):
        array, raw_labels = _load_npz(path, source)
        labels = _as_labels(raw_labels, source) if raw_labels is not None else None
    elif name.removesuffix(".gz").endswith("idx3-ubyte"):
        array = _read_idx(path, source)
    else:
        raise DataError(
            f"{source}: unsupported image source; expected 'digits', a .npy or .npz array, an "
            "IDX file (*idx3-ubyte[.gz]) or a folder of PNG/JPEG images"
        )
    return _to_nchw(array, source), labels


def load_labels(path: Path, source: str) -> np.ndarray:
    name = path.name.lower()
    if name.endswith(".npy"):
        return _as_labels(_load_npy(path, source), source)
    if name.endswith(".npz"):
        images, labels = _load_npz(path, source)
        return _as_labels(labels if labels is not None else images, source)
    if _is_idx(name):
        return _as_labels(_read_idx(path, source), source)
    raise DataError(f"{source}: unsupported labels file; expected .npy, .npz or IDX (idx1-ubyte)")


def _as_labels(array: np.ndarray, source: str) -> np.ndarray:
    """Labels as int64 `[N]`; integral floats are accepted, anything else is refused."""
    array = np.asarray(array)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise DataError(f"{source}: labels must be one-dimensional, got shape {array.shape}")
    if array.dtype == bool or np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int64)
    if np.issubdtype(array.dtype, np.floating):
        integral = np.isfinite(array) & (array == np.round(array))
        if integral.all():
            return array.astype(np.int64)
        raise DataError(f"{source}: label {first_true(~integral)} is {array[~integral][0]!r}")
    raise DataError(f"{source}: labels have dtype {array.dtype}, not integers")


def _to_nchw(array: np.ndarray, source: str) -> np.ndarray:
    """A numeric array of images as float32 `[N, C, H, W]`.

    A 4-d array is channels-last when only its last axis could be channels, channels-first when
    only its second could; when both could, the reading whose spatial axes are square wins
    (channels-last if neither is).
    """
    if array.dtype == object or not (
        array.dtype == bool
        or np.issubdtype(array.dtype, np.integer)
        or np.issubdtype(array.dtype, np.floating)
    ):
        raise DataError(f"{source}: images have dtype {array.dtype}, not numbers")
    if array.ndim == 3:
        array = array[:, None, :, :]
    elif array.ndim == 4:
        last, second = array.shape[3] in _CHANNELS, array.shape[1] in _CHANNELS
        if last and second:
            last = array.shape[1] == array.shape[2] or array.shape[2] != array.shape[3]
        if last:
            array = np.moveaxis(array, 3, 1)
        elif not second:
            raise DataError(
                f"{source}: images of shape {array.shape} have no channel axis of size 1, 3 or 4"
            )
    else:
        raise DataError(
            f"{source}: images must be [N, H, W], [N, H, W, C] or [N, C, H, W], got {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[2] == 0 or array.shape[3] == 0:
        raise DataError(f"{source}: no images (shape {array.shape})")
    return np.ascontiguousarray(array, dtype=np.float32)


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        (
            f
            for f in folder.iterdir()
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in PICTURE_SUFFIXES
        ),
        key=lambda f: f.name,
    )


def load_folder(
    root: Path, source: str, channels: int | None = None
) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...] | None]:
    """A folder of PNG/JPEG images: flat (no labels) or one subfolder per class; with
    `channels` (a detector's), each conformed to them as the worker conforms a record's."""
    flat = _image_files(root)
    class_dirs = [
        d
        for d in sorted(root.iterdir(), key=lambda d: d.name)
        if d.is_dir() and not d.name.startswith(".") and _image_files(d)
    ]
    if flat and class_dirs:
        raise DataError(
            f"{source}: holds images both directly and in class subfolders "
            f"({', '.join(d.name for d in class_dirs)}); use one layout"
        )
    if not flat and not class_dirs:
        raise DataError(f"{source}: holds no PNG or JPEG images")
    files: list[tuple[Path, int]] = [(f, -1) for f in flat]
    for index, folder in enumerate(class_dirs):
        files += [(f, index) for f in _image_files(folder)]

    first_file = files[0][0]
    first, mode = _read_image(first_file, channels)
    images = np.empty((len(files), *first.shape), dtype=np.float32)
    images[0] = first
    for i, (file, _) in enumerate(files[1:], start=1):
        pixels, file_mode = _read_image(file, channels)
        if file_mode != mode or pixels.shape != first.shape:
            raise DataError(
                f"{file}: mode {file_mode} and size {pixels.shape[2]}x{pixels.shape[1]} differ "
                f"from {first_file.name} ({mode}, {first.shape[2]}x{first.shape[1]}); all "
                f"images in {source} must share size and mode"
            )
        images[i] = pixels
    if not class_dirs:
        return images, None, None
    labels = np.asarray([label for _, label in files], dtype=np.int64)
    return images, labels, tuple(d.name for d in class_dirs)


def _read_image(file: Path, channels: int | None = None) -> tuple[np.ndarray, str]:
    """One image as `[C, H, W]` raw pixel values, with its Pillow mode. With `channels` (a
    detector's), its mode is conformed to them as the worker conforms a record's picture."""
    from PIL import Image

    from pipeline.modalities.images import conform_mode

    try:
        with Image.open(file) as image:
            image.load()
            mode = image.mode
            if channels is not None:
                image = conform_mode(image, channels)
                mode = image.mode
            elif mode == "1":
                image = image.convert("L")
            elif mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            elif mode not in ("L", "I", "I;16", "F", "RGB", "RGBA"):
                raise DataError(
                    f"{file}: unsupported image mode {mode}; use grayscale, RGB or RGBA"
                )
            pixels = np.asarray(image)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{file}: cannot be read as an image: {exc}") from exc
    pixels = pixels[None, :, :] if pixels.ndim == 2 else np.moveaxis(pixels, 2, 0)
    return pixels.astype(np.float32), mode

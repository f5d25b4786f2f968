"""Image sets: `[N, C, H, W]` float32 pixels with optional class labels, loaded and split.

`load_images` reads scikit-learn's digits, `.npy`/`.npz` arrays, MNIST-style IDX files or a folder
of PNG/JPEG files (see `training.data.image_files`); `split_images` shuffles a set into the four
parts (`training.data.splits`). A set carries a `digest()` of its content, never of its path.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from training.data.image_files import (
    ARRAY_SUFFIXES,
    PICTURE_SUFFIXES,
    load_array_file,
    load_digits,
    load_folder,
    load_labels,
)
from training.data.splits import PARTS, check_fractions, floor_counts

__all__ = ["DIGITS", "ImageSet", "is_image_source", "load_images", "split_images"]

DIGITS = "digits"  # `--data digits`: scikit-learn's 8x8 digits, no file


def is_image_source(data: str) -> bool:
    """Whether `data` names images (digits, an array or IDX file, a folder of pictures) rather
    than a series table."""
    path = Path(data)
    suffixes = ARRAY_SUFFIXES + PICTURE_SUFFIXES
    if data == DIGITS or path.suffix.lower() in suffixes or "idx" in path.name:
        return True
    if path.is_dir():
        return not any(path.rglob("*.parquet")) and any(
            p.suffix.lower() in PICTURE_SUFFIXES for p in path.rglob("*") if p.is_file()
        )
    return False


# -- images --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images `[N, C, H, W]` as float32 raw pixel values, with class labels when known.

    `class_names[i]` names label `i` when the labels came from class folders. `source` names the
    origin for messages; it never enters `digest()`. Equality is identity; compare digests.
    """

    images: np.ndarray
    labels: np.ndarray | None
    source: str
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(f"{self.source}: images must be [N, C, H, W], got {self.images.shape}")
        if self.labels is not None and self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"{self.source}: {self.labels.shape} labels for {self.images.shape[0]} images"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def digest(self) -> str:
        """SHA-256 (hex) of the pixels (float32, with the shape) and the labels, if any."""
        pixels = np.ascontiguousarray(self.images, dtype="<f4")
        h = hashlib.sha256(b"aewatch.images/1\0")
        h.update(struct.pack("<4q", *pixels.shape))
        h.update(pixels.tobytes())
        if self.labels is None:
            h.update(b"\0")
        else:
            h.update(b"\1")
            h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        return h.hexdigest()

    def subset(self, index: np.ndarray) -> ImageSet:
        """The images at `index` (integer positions or a boolean mask), in that order."""
        index = np.asarray(index)
        if index.dtype != bool and not np.issubdtype(index.dtype, np.integer):
            if index.size:
                raise DataError(f"{self.source}: subset index must be integers or a boolean mask")
            index = index.astype(np.int64)
        return ImageSet(
            images=self.images[index],
            labels=None if self.labels is None else self.labels[index],
            source=self.source,
            class_names=self.class_names,
        )

    def class_mask(self, normal_class: int | str) -> np.ndarray:
        """Boolean mask of the images whose class is `normal_class`: a label value, or for
        class folders a folder name or its index (also as text, as a flag gives it)."""
        source = self.source
        if self.labels is None:
            raise DataError(
                f"{source}: normal_class={normal_class!r} needs class labels and there are none; "
                "give labels_path or use one subfolder per class"
            )
        if self.class_names is not None:
            names = self.class_names
            if isinstance(normal_class, str) and normal_class in names:
                return self.labels == names.index(normal_class)
            if isinstance(normal_class, str) and normal_class.isdigit():
                normal_class = int(normal_class)
            if isinstance(normal_class, int | np.integer) and 0 <= int(normal_class) < len(names):
                return self.labels == int(normal_class)
            raise DataError(
                f"{source}: unknown class {normal_class!r}; the classes are "
                f"{', '.join(f'{i}={n}' for i, n in enumerate(names))}"
            )
        known = sorted(int(v) for v in np.unique(self.labels))
        try:
            value = int(normal_class)
        except (TypeError, ValueError):
            value = None
        if value is None or value not in known:
            raise DataError(
                f"{source}: unknown class {normal_class!r}; the labels are "
                f"{', '.join(map(str, known))}"
            )
        return self.labels == value


def load_images(
    source: str | Path,
    *,
    normal_class: int | str | None = None,
    labels_path: str | Path | None = None,
    channels: int | None = None,
) -> ImageSet:
    """Load an image set as float32 `[N, C, H, W]` raw pixel values with optional labels.

    `source` is `"digits"` (scikit-learn's 8x8 digits, values 0..16), a `.npy` array
    (`[N, H, W]`, `[N, H, W, C]` or `[N, C, H, W]` with C in 1, 3, 4), a `.npz` archive
    (`images`/`x`/`X` and optional `labels`/`y`/`Y`), an MNIST IDX image file (`*idx3-ubyte`,
    optionally `.gz`), or a folder of PNG/JPEG files, flat or with one subfolder per class (label
    = index of the folder name in sorted order). `labels_path` (`.npy`, `.npz` or IDX) gives
    labels to array and IDX sources. Arrays are never unpickled. `normal_class` keeps only the
    images of that class: a label value, or for class folders the folder name or its index.
    `channels` (a detector's) conforms a folder's pictures to them as the worker conforms a
    record's (a palette or RGBA picture for a 3-channel model read as RGB).
    """
    name = str(source)
    if labels_path is not None and not Path(labels_path).exists():
        raise DataError(f"{labels_path}: no such labels file")
    if name == DIGITS and not Path(name).exists():
        if labels_path is not None:
            raise DataError("sklearn:digits: carries its own labels; labels_path is not used")
        images, labels, class_names, name = load_digits()
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"{name}: no such file or directory")
        if path.is_dir():
            if labels_path is not None:
                raise DataError(
                    f"{name}: an image folder takes its labels from class subfolders; "
                    "labels_path is not used"
                )
            images, labels, class_names = load_folder(path, name, channels)
        else:
            images, labels = load_array_file(path, name)
            class_names = None
            if labels_path is not None:
                labels = load_labels(Path(labels_path), str(labels_path))
            if labels is not None and labels.shape != (images.shape[0],):
                raise DataError(
                    f"{labels_path or name}: {labels.shape[0]} labels for {images.shape[0]} "
                    f"images in {name}"
                )
    if not np.isfinite(images).all():
        bad = int(np.argmax(~np.isfinite(images).reshape(len(images), -1).all(axis=1)))
        raise DataError(f"{name}: image {bad} holds a non-finite pixel value")
    image_set = ImageSet(images=images, labels=labels, source=name, class_names=class_names)
    if normal_class is not None:
        image_set = image_set.subset(image_set.class_mask(normal_class))
    return image_set


def split_images(
    images: ImageSet,
    fractions: Sequence[float] = (0.6, 0.15, 0.15, 0.1),
    *,
    seed: int = 0,
) -> dict[str, ImageSet]:
    """Shuffle with `numpy.random.default_rng(seed)` and cut into the four parts.

    Part sizes are floor(N * fraction), the remainder going to train, as for `split_series`;
    the same seed gives the same parts. A part is empty only when its fraction is 0.
    """
    weights = check_fractions(fractions, images.source)
    order = np.random.default_rng(seed).permutation(len(images))
    parts: dict[str, ImageSet] = {}
    start = 0
    for part, weight, count in zip(PARTS, weights, floor_counts(len(images), weights), strict=True):
        if weight > 0 and count == 0:
            raise DataError(
                f"{images.source}: the {part} part would be empty: {len(images)} images are too "
                f"few for fraction {weight:g}"
            )
        parts[part] = images.subset(order[start : start + count])
        start += count
    return parts

"""Data read for an existing detector: its features and window (series), or images of its shape.

What `aewatch score`, `evaluate`, `recalibrate`, `promote`, `encode`, `reconstruct` and `sample`
read with `--data`: a `DataSource` says how, `load_for` reads it as the detector expects into
`Splits` of one part, `ALL` (see `training.data.prepared`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.detector import Detector
from pipeline.errors import DataError
from training.data.images import is_image_source, load_images
from training.data.prepared import ALL, ImagePart, ImageSplits, SeriesSplits, table_windows
from training.data.series import load_series, with_calendar

__all__ = ["ALL", "DataSource", "load_for"]


@dataclass(frozen=True)
class DataSource:
    """`--data` and the flags that say how to read it."""

    path: str
    time_col: str = "ts"
    key_col: str | None = None
    fill: str = "error"
    label_col: str | None = None
    normal_class: str | None = None
    labels_path: str | None = None


def load_for(detector: Detector, source: DataSource) -> SeriesSplits | ImageSplits:
    """`source` read in the shape `detector` expects."""
    return _LOADERS[detector.input.kind](detector, source)


def _series_for(detector: Detector, source: DataSource) -> SeriesSplits:
    spec = detector.input
    if is_image_source(source.path):
        raise DataError(f"{source.path}: this detector scores series, not images")
    table = load_series(
        source.path,
        time_col=source.time_col,
        key_col=source.key_col,
        features=spec.data_features,
        label_col=source.label_col,
        fill=source.fill,
    )
    table = with_calendar(table, spec.calendar)  # made from the times, as the worker does
    return SeriesSplits(
        spec, detector.scaler, {ALL: table_windows(table, spec.window)}, {ALL: table}, table
    )


def _images_for(detector: Detector, source: DataSource) -> ImageSplits:
    spec = detector.input
    channels = spec.image_shape[0]  # pictures conformed to them as the worker conforms them
    images = load_images(source.path, labels_path=source.labels_path, channels=channels)
    if images.images.shape[1:] != tuple(spec.image_shape):
        raise DataError(
            f"{source.path}: images are {images.images.shape[1:]}, the detector "
            f"expects {tuple(spec.image_shape)}"
        )
    flags = None
    if source.normal_class is not None:
        flags = (~images.class_mask(source.normal_class)).astype(np.int64)
    part = ImagePart(images.images, flags, images.labels)
    return ImageSplits(spec, detector.scaler, {ALL: part}, images)


# The training side of each input modality (`pipeline.modalities`): how its data is read.
_LOADERS = {"series": _series_for, "image": _images_for}

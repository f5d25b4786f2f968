"""Reading data for an existing detector: windows cut with the detector's own features and window
spec (series), or images of its shape. Shared by score, evaluate, recalibrate and promote."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from pipeline.detector import Detector, WindowSet, WindowSpec, cut_windows
from pipeline.errors import ConfigError, DataError
from training.data import SeriesTable, load_images, load_series, split_series
from training.evaluate import SeriesPoints
from training.job import is_image_source, series_groups

__all__ = ["DetectorData", "load_for"]


@dataclass
class DetectorData:
    """Inputs ready for one detector: series windows (with the table they came from) or images
    with optional anomaly flags (`image_labels`) and the class labels the source carries
    (`classes`)."""

    windows: WindowSet | None = None
    table: SeriesTable | None = None
    images: np.ndarray | None = None
    image_labels: np.ndarray | None = None
    spec: WindowSpec | None = None
    classes: np.ndarray | None = None

    @property
    def raw(self) -> np.ndarray:
        return self.windows.windows if self.windows is not None else self.images

    @property
    def labels(self) -> np.ndarray | None:
        if self.windows is not None:
            return self.windows.end_labels
        return self.image_labels

    @property
    def normal(self) -> np.ndarray:
        labelled = self.windows.any_labels if self.windows is not None else self.image_labels
        return np.ones(len(self.raw), bool) if labelled is None else ~labelled.astype(bool)

    def points(self) -> list[SeriesPoints]:
        table = self.table
        return [
            SeriesPoints(key, frame[table.time_col].to_numpy(), frame[table.label_col].to_numpy())
            for key, frame in table.groups()
        ]

    def split(self, holdout: float) -> tuple[DetectorData, DetectorData]:
        """Time-ordered split per key (series) or a plain cut (images): the last `holdout`."""
        if not 0 < holdout < 1:
            raise ConfigError("holdout", f"must be in (0, 1), got {holdout}")
        if self.table is not None:
            parts = split_series(self.table, (1 - holdout, 0.0, 0.0, holdout))
            return (_windows(parts["train"], self.spec), _windows(parts["test"], self.spec))
        cut = int(len(self.images) * (1 - holdout))
        return self._image_part(slice(None, cut)), self._image_part(slice(cut, None))

    def _image_part(self, part: slice) -> DetectorData:
        pick = lambda a: None if a is None else a[part]  # noqa: E731
        return DetectorData(
            images=self.images[part],
            image_labels=pick(self.image_labels),
            classes=pick(self.classes),
        )


def _windows(table: SeriesTable, spec) -> DetectorData:
    windows = cut_windows(series_groups(table), spec, source=table.source)
    return DetectorData(windows=windows, table=table, spec=spec)


def load_for(detector: Detector, args: argparse.Namespace) -> DetectorData:
    """Load `args.data` in the shape `detector` expects."""
    label_col = getattr(args, "label_col", None)
    if detector.input.kind == "series":
        if is_image_source(args.data):
            raise DataError(f"{args.data}: this detector scores series, not images")
        table = load_series(
            args.data,
            time_col=args.time_col,
            key_col=args.key_col,
            features=detector.input.features,
            label_col=label_col,
            fill=args.fill,
        )
        return _windows(table, detector.input.window)
    images = load_images(args.data, labels_path=getattr(args, "labels_path", None))
    flags = None
    normal_class = getattr(args, "normal_class", None)
    if normal_class is not None:
        if images.labels is None:
            raise DataError(f"{args.data}: --normal-class needs labelled images")
        names = getattr(images, "class_names", None)
        wanted = (
            list(names).index(normal_class)
            if names and normal_class in names
            else int(normal_class)
        )
        flags = (images.labels != wanted).astype(np.int64)
    if images.images.shape[1:] != tuple(detector.input.image_shape):
        raise DataError(
            f"{args.data}: images are {images.images.shape[1:]}, the detector "
            f"expects {tuple(detector.input.image_shape)}"
        )
    return DetectorData(images=images.images, image_labels=flags, classes=images.labels)

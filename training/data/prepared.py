"""Data cut into parts and held in memory: series windows, or images, ready for a detector.

Two `Splits` (see `training.data.splits`): `SeriesSplits` holds each part's windows with the table
they were cut from, `ImageSplits` each part's images with their anomaly labels and classes. The
training job prepares them from its settings (`prepare_series`, `prepare_images`: scaler fitted
on the train part); `aewatch score`, `evaluate`, `recalibrate`, `promote`, `encode` and
`reconstruct` load them for an existing detector (`training.data.for_detector`), whole (the part
`ALL`) or cut into calibration and held-out test data (`holdout`).

Size: over 400 lines because the two kinds held in memory share `_InMemory` and are read
together.

Labels are per window (or image) here: for a series window, the label of its last reading (the
decision a stream has at that moment) and whether any of its readings is labelled; for an image,
whether it is of another class than the normal one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from pipeline.detector import Detector, InputSpec, Scaler, WindowSet, WindowSpec, cut_windows
from pipeline.detector.baselines import KeyStats, window_scaling
from pipeline.detector.windows import SlidingWindows
from pipeline.errors import ConfigError, DataError
from pipeline.events import ModelIdentity
from training.data.baselines import key_baselines
from training.data.images import ImageSet, load_images, split_images
from training.data.series import (
    SeriesTable,
    auto_calendar_table,
    load_series,
    series_groups,
    split_series,
)
from training.data.splits import PARTS, SplitScores, short_series_settings
from training.data.window_tensor import WindowTensor, extremes, scaled_windows
from training.evaluate import SeriesPoints, evaluate_images, evaluate_series
from training.score_stats import normal_term_statistics

__all__ = [
    "ALL",
    "ImagePart",
    "ImageSplits",
    "SeriesSplits",
    "check_holdout",
    "prepare_images",
    "prepare_series",
    "scaler_kind",
    "table_windows",
]

log = logging.getLogger(__name__)
ALL = "all"  # the one part of data loaded whole for a detector


class _InMemory:
    """What series and image splits share: parts of raw samples with per-sample labels."""

    input: InputSpec
    scaler: Scaler
    parts: dict

    def raw(self, split: str) -> np.ndarray:
        raise NotImplementedError

    def labels(self, split: str) -> np.ndarray | None:
        raise NotImplementedError

    def normal(self, split: str) -> np.ndarray:
        raise NotImplementedError

    @property
    def splits(self) -> dict:
        return self.parts

    def has(self, split: str) -> bool:
        return split in self.parts and len(self.parts[split]) > 0

    def window_counts(self) -> dict[str, int]:
        return {name: len(part) for name, part in self.parts.items()}

    def first_sample(self, split: str) -> np.ndarray | None:
        return self.raw(split)[0] if self.has(split) else None

    def scaling(self, detector: Detector | None, split: str) -> tuple | None:
        """Per-sample (center, scale) of keys with their own baselines (series only)."""
        return None

    def split_scores(self, detector: Detector, split: str) -> SplitScores:
        """Scores of a whole split with its labels and normal mask."""
        scaling = self.scaling(detector, split)
        scores = detector.score(self.raw(split), attribution=False, scaling=scaling).scores
        return SplitScores(scores, self.labels(split), self.normal(split))

    term_statistics = normal_term_statistics  # the Splits protocol's, in memory

    def fit_inputs(self, config, *, batch_size, shuffle_windows, seed, context, device):
        """The training and validation inputs of `fit`: the scaled parts as tensors."""
        x_train, x_val = self._scaled("train", device), self._scaled("validation", device)
        if config.loss == "bce":
            low, high = extremes(x_train)
            if low < 0.0 or high > 1.0:
                raise ConfigError(
                    "loss",
                    f"bce needs inputs in [0, 1] but the scaled training data spans "
                    f"[{low:.3g}, {high:.3g}]; use --scaler minmax",
                )
        return x_train, x_val

    def _scaled(self, split: str, device: torch.device) -> torch.Tensor | WindowTensor | None:
        if not self.has(split):
            return None
        scaling = self.scaling(None, split)
        raw = self.raw(split)
        if isinstance(raw, SlidingWindows):  # the series scaled once, the windows cut per batch
            return scaled_windows(raw, self.scaler, scaling, self.parts[split].keys, device)
        if scaling is None:
            scaled = self.scaler.transform(self.raw(split), axis=self.input.feature_axis)
        else:  # each key by its own statistics: the arithmetic of Detector.score
            center, scale = (a[:, None, :] for a in scaling)
            scaled = ((self.raw(split).astype(np.float32) - center) / scale).astype(np.float32)
        return torch.from_numpy(scaled).to(device)

    def evaluate(
        self,
        detector: Detector,
        split: str,
        rule: str = "end",
        scores: np.ndarray | None = None,
        threshold: float | None = None,
    ) -> dict | None:
        """Metrics of a labelled split (None when it has no labels); `scores` if known, decided
        against `threshold` (default: the detector's)."""
        if not self.has(split) or self.labels(split) is None:
            return None
        if scores is None:
            scaling = self.scaling(detector, split)
            scores = detector.score(self.raw(split), attribution=False, scaling=scaling).scores
        if threshold is None:
            threshold = detector.threshold.require()
        return self._metrics(split, rule, scores, threshold)

    def _metrics(self, split: str, rule: str, scores: np.ndarray, threshold: float) -> dict:
        raise NotImplementedError

    def figures(self, detector: Detector, split: str, scores: np.ndarray) -> dict:
        """Figures of this kind of data for the training run (none but for images)."""
        return {}


@dataclass
class SeriesSplits(_InMemory):
    """Each part's windows and the table they were cut from; `table` is the whole series."""

    input: InputSpec
    scaler: Scaler
    parts: dict[str, WindowSet]
    tables: dict[str, SeriesTable]
    table: SeriesTable
    baselines: KeyStats | None = None  # per-key statistics of the train part (training only)

    @property
    def digest(self) -> str:
        return self.table.digest()

    def scaling(self, detector: Detector | None, split: str) -> tuple | None:
        """Per window: its key's own (center, scale), from the detector or, while training,
        from the train part."""
        stats, scaler = (
            (self.baselines, self.scaler)
            if detector is None
            else (
                detector.baselines,
                detector.scaler,
            )
        )
        return window_scaling(stats, scaler.center, scaler.scale, self.parts[split].keys)

    @property
    def time_range(self) -> tuple[str, str]:
        return self.table.time_range()

    def raw(self, split: str) -> np.ndarray:
        return self.parts[split].windows

    def labels(self, split: str) -> np.ndarray | None:
        return self.parts[split].end_labels

    def normal(self, split: str) -> np.ndarray:
        labelled = self.parts[split].any_labels
        return np.ones(len(self.parts[split]), bool) if labelled is None else ~labelled

    def _metrics(self, split: str, rule: str, scores: np.ndarray, threshold: float) -> dict:
        """Point-wise and event metrics, as a stream decides window by window."""
        part, table = self.parts[split], self.tables[split]
        points = [
            SeriesPoints(key, frame[table.time_col].to_numpy(), frame[table.label_col].to_numpy())
            for key, frame in table.groups()
        ]
        length = self.input.window.length
        return evaluate_series(
            points, part.keys, part.end_times, length, scores, threshold, rule=rule
        )

    def holdout(self, fraction: float) -> SeriesSplits:
        """Calibration data and, the last `fraction` of each key's readings, a test part."""
        check_holdout(fraction)
        cut = split_series(self.table, (1 - fraction, 0.0, 0.0, fraction))
        tables = {"calibration": cut["train"], "test": cut["test"]}
        spec = self.input.window
        parts = {name: table_windows(table, spec) for name, table in tables.items()}
        return SeriesSplits(self.input, self.scaler, parts, tables, self.table, self.baselines)

    def index_frame(self, split: str) -> pd.DataFrame:
        """Which window each row of a per-window table is: key, window start and end."""
        part = self.parts[split]
        return pd.DataFrame(
            {
                "key": part.keys.astype(str),
                "window_start": part.start_times,
                "window_end": part.end_times,
            }
        )

    def score_table(
        self, detector: Detector, split: str, top_k: int, model: ModelIdentity, **options
    ) -> pd.DataFrame:
        """One row per window; `options` (per-key baselines, a stream replay) as
        `pipeline.batch.score_window_set` takes them."""
        from pipeline.batch import score_window_set

        return score_window_set(detector, self.parts[split], top_k=top_k, model=model, **options)


@dataclass
class ImagePart:
    """Images, their anomaly labels (1: not of the normal class; None when unknown) and their
    class labels (if the source has classes)."""

    images: np.ndarray
    labels: np.ndarray | None = None
    classes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index) -> ImagePart:
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return ImagePart(self.images[index], pick(self.labels), pick(self.classes))


@dataclass
class ImageSplits(_InMemory):
    """Each part's images; `source` is the set the parts were cut from (its digest names it)."""

    input: InputSpec
    scaler: Scaler
    parts: dict[str, ImagePart]
    source: ImageSet
    time_range: None = field(default=None, init=False)

    @property
    def digest(self) -> str:
        return self.source.digest()

    def raw(self, split: str) -> np.ndarray:
        return self.parts[split].images

    def labels(self, split: str) -> np.ndarray | None:
        labels = self.parts[split].labels
        return None if labels is None else labels.astype(bool)

    def normal(self, split: str) -> np.ndarray:
        labels = self.labels(split)
        return np.ones(len(self.parts[split]), bool) if labels is None else ~labels

    def _metrics(self, split: str, rule: str, scores: np.ndarray, threshold: float) -> dict:
        """Ranking and decision metrics of the images."""
        return evaluate_images(self.parts[split].labels, scores, threshold)

    def holdout(self, fraction: float) -> ImageSplits:
        """The first images for calibration, the last `fraction` of them as a test part."""
        check_holdout(fraction)
        whole = self.parts[ALL]
        cut = int(len(whole) * (1 - fraction))
        parts = {"calibration": whole[:cut], "test": whole[cut:]}
        return ImageSplits(self.input, self.scaler, parts, self.source)

    def index_frame(self, split: str) -> pd.DataFrame:
        """Which image each row of a per-image table is: its index, and its class if known."""
        part = self.parts[split]
        frame = pd.DataFrame({"index": np.arange(len(part))})
        if part.classes is not None:
            frame["label"] = part.classes
        return frame

    def score_table(
        self, detector: Detector, split: str, top_k: int, model: ModelIdentity, **options
    ) -> pd.DataFrame:
        from pipeline.batch import score_images

        return score_images(detector, self.raw(split))

    def figures(self, detector: Detector, split: str, scores: np.ndarray) -> dict:
        """The four worst and four best reconstructed images of the split, with error maps."""
        from training import plots

        raw = self.raw(split)
        pick = np.argsort(-scores)[:4].tolist() + np.argsort(scores)[:4].tolist()
        scaled = detector.prepare(raw[pick])
        with torch.inference_mode():
            x = torch.from_numpy(scaled).to(detector.device)
            recon = detector.model.reconstruct(x).cpu().numpy()
        maps = detector.score(raw[pick]).pixel_map
        return {"image_errors": plots.image_errors(scaled, recon, maps)}


def check_holdout(fraction: float) -> None:
    if not 0 < fraction < 1:
        raise ConfigError("holdout", f"must be in (0, 1), got {fraction}")


def table_windows(table: SeriesTable, spec: WindowSpec) -> WindowSet:
    return cut_windows(series_groups(table), spec, source=table.source)


# -- the training job's preparation ----------------------------------------------------------------
def scaler_kind(settings, *, image: bool) -> str:
    """`auto`: minmax for images and a bce loss (inputs in [0, 1]), standard otherwise."""
    if settings.scaler != "auto":
        return settings.scaler
    return "minmax" if image or settings.model.loss == "bce" else "standard"


def prepare_series(settings) -> SeriesSplits:
    """The series of `settings.data`, split per key in time order and cut into windows; the
    scaler fitted on the train part's readings. Training windows holding a labelled anomaly are
    left out: only normal windows teach the model what normal looks like."""
    if not settings.time_col:
        raise ConfigError("time_col", "series data needs --time-col")
    table = load_series(settings.data, **settings.series_columns())
    if settings.adapt_split and settings.train_until is None:
        settings = short_series_settings(settings, table)
    spec = WindowSpec(settings.window, settings.stride)
    tables = split_series(table, settings.fractions, train_until=settings.train_until)
    calendar: tuple[str, ...] = ()
    if getattr(settings, "calendar", "off") == "auto":
        calendar, table = auto_calendar_table(table, tables["train"])
        if calendar:
            tables = split_series(table, settings.fractions, train_until=settings.train_until)
    parts: dict[str, WindowSet] = {}
    for name in PARTS:
        if len(tables[name]) == 0:
            continue
        try:
            parts[name] = cut_windows(series_groups(tables[name]), spec, source=f"{name} split")
        except DataError:
            if name == "train":
                raise
            log.warning("the %s split is shorter than one window; it is left out", name)
    train = parts["train"]
    if train.any_labels is not None:
        keep = ~train.any_labels
        if not keep.any():
            raise DataError(f"{settings.data}: every training window holds a labelled anomaly")
        parts["train"] = train.subset(np.flatnonzero(keep))
    kind = scaler_kind(settings, image=False)
    normal = tables["train"].normal_rows()  # a labelled glitch sets no feature's scale
    scaler = Scaler.fit(kind, normal.values())
    scaler, baselines = key_baselines(settings, kind, normal, scaler)
    spec_in = InputSpec("series", features=tuple(table.features), window=spec, calendar=calendar)
    return SeriesSplits(spec_in, scaler, parts, tables, table, baselines)


def prepare_images(settings) -> ImageSplits:
    """The images of `settings.data` shuffled into the four parts. With a normal class, the
    parts hold its images only, flagged normal, and the test part also every other image,
    flagged anomalous. The scaler is fitted on the train part's pixels, per channel."""
    images = load_images(settings.data, labels_path=settings.labels_path)
    normal, others = images, None
    if settings.normal_class is not None:
        is_normal = images.class_mask(settings.normal_class)
        normal = images.subset(np.flatnonzero(is_normal))
        others = images.subset(np.flatnonzero(~is_normal))
    cut = split_images(normal, settings.fractions, seed=settings.fit.seed)
    flagged = others is not None
    parts = {
        name: ImagePart(part.images, np.zeros(len(part), np.int64) if flagged else None)
        for name, part in cut.items()
    }
    if flagged and len(others):
        test = parts["test"]
        parts["test"] = ImagePart(
            np.concatenate([test.images, others.images]),
            np.concatenate([test.labels, np.ones(len(others), dtype=np.int64)]),
        )
    train = parts["train"].images
    if len(train) == 0:
        raise DataError(f"{settings.data}: no training images after the split")
    channels = train.shape[1]
    samples = np.moveaxis(train, 1, -1).reshape(-1, channels)
    scaler = Scaler.fit(scaler_kind(settings, image=True), samples)
    spec_in = InputSpec("image", image_shape=tuple(int(d) for d in train.shape[1:]))
    return ImageSplits(spec_in, scaler, parts, normal)

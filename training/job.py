"""The training job: data -> splits -> windows -> scaler -> model -> fit -> detector artifact.

`train(settings)` is what `aewatch train` runs. Everything it needs arrives in one frozen
`TrainSettings`; it reports progress through callbacks and returns the trained detector with the
prepared splits, so calibration and registration can follow without reading the data again.

With `out_of_core` a Parquet dataset is read in record batches instead (`training.out_of_core`);
in a distributed job every rank trains and rank 0 alone calibrates, evaluates and writes the
artifact (the other ranks' `train` returns None).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from pipeline.detector import (
    Detector,
    InputSpec,
    ModelConfig,
    Scaler,
    WindowSet,
    WindowSpec,
    build_model,
    cut_windows,
    save_detector,
)
from pipeline.detector.threshold import Threshold
from pipeline.errors import CalibrationError, ConfigError, DataError
from training.calibrate import FprEstimate, estimate_fpr, make_calibrator
from training.data import (
    ImageSet,
    SeriesTable,
    load_images,
    load_series,
    split_images,
    split_series,
)
from training.distributed import RankContext
from training.evaluate import SeriesPoints, evaluate_images, evaluate_series
from training.fit import Callback, FitConfig, FitResult, fit, validation_loss
from training.objectives import make_objective
from training.out_of_core import (
    ShuffledWindows,
    SplitScores,
    StreamBatches,
    StreamedData,
    prepare_streamed,
    validation_batches,
)
from training.streamed import STREAM_FILL_POLICIES

__all__ = [
    "CalibrationSettings",
    "PreparedData",
    "TrainResult",
    "TrainSettings",
    "calibrate",
    "evaluate_split",
    "is_image_source",
    "prepare",
    "series_groups",
    "train",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "calibration", "test")
_IMAGE_SUFFIXES = (".npy", ".npz", ".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class CalibrationSettings:
    method: str = "quantile"
    target_fpr: float = 0.01
    mad_k: float = 3.0
    pot_initial_quantile: float = 0.95
    margin: float = 1.0


@dataclass(frozen=True)
class TrainSettings:
    data: str
    out: str = "detector"
    input_kind: str = "auto"
    # series
    time_col: str | None = None
    key_col: str | None = None
    features: tuple[str, ...] | None = None
    label_col: str | None = None
    fill: str = "error"
    window: int = 32
    stride: int = 1
    train_until: str | None = None
    # images
    normal_class: str | None = None
    labels_path: str | None = None
    # both
    fractions: tuple[float, float, float, float] = (0.6, 0.15, 0.15, 0.1)
    scaler: str = "auto"
    model: ModelConfig = field(default_factory=lambda: ModelConfig())
    fit: FitConfig = field(default_factory=FitConfig)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    point_rule: str = "end"
    device: str = "auto"
    # data larger than memory
    out_of_core: bool = False
    batch_rows: int = 65_536
    shuffle_windows: int = 65_536

    def __post_init__(self) -> None:
        for name in ("batch_rows", "shuffle_windows"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.out_of_core:
            self._check_out_of_core()

    def series_columns(self) -> dict:
        """How the series' columns are read, the same in memory and out of core."""
        return dict(
            time_col=self.time_col,
            key_col=self.key_col,
            features=self.features,
            label_col=self.label_col,
            fill=self.fill,
        )

    def _check_out_of_core(self) -> None:
        """What the out-of-core reader cannot do is refused before any data is read."""
        if self.input_kind == "image" or is_image_source(self.data):
            raise ConfigError("out_of_core", "reads series from Parquet, not images")
        path = Path(self.data)
        if not (path.is_dir() or path.suffix.lower() in (".parquet", ".pq")):
            raise ConfigError("out_of_core", f"{self.data}: needs a Parquet file or directory")
        if self.fill not in STREAM_FILL_POLICIES:
            raise ConfigError(
                "fill",
                f"out-of-core data takes {' or '.join(STREAM_FILL_POLICIES)}, not {self.fill}",
            )
        if self.scaler == "robust":
            raise ConfigError("scaler", "robust needs every training row; out of core use standard")
        if self.model.kind == "pca":
            raise ConfigError("kind", "pca is fitted in closed form on data in memory")
        if self.model.loss == "bce" and _scaler_kind(self, image=False) != "minmax":
            raise ConfigError("loss", "bce needs inputs in [0, 1]: use --scaler minmax")


@dataclass
class PreparedData:
    """Scaler-ready splits. Series: WindowSets; images: ImageSets (test may hold other classes)."""

    input: InputSpec
    scaler: Scaler
    splits: dict[str, WindowSet | ImageSet]
    digest: str
    time_range: tuple[str, str] | None = None
    tables: dict[str, SeriesTable] = field(default_factory=dict)

    def raw(self, split: str) -> np.ndarray:
        part = self.splits[split]
        return part.windows if isinstance(part, WindowSet) else part.images

    def window_counts(self) -> dict[str, int]:
        return {name: len(part) for name, part in self.splits.items()}

    def first_window(self, split: str) -> np.ndarray | None:
        return self.raw(split)[0] if self.has(split) else None

    def split_scores(self, detector: Detector, split: str) -> SplitScores:
        """Scores of a whole split with its labels and normal mask."""
        scores = detector.score(self.raw(split), attribution=False).scores
        return SplitScores(scores, self.labels(split), self.normal(split))

    def has(self, split: str) -> bool:
        return split in self.splits and len(self.splits[split]) > 0

    def labels(self, split: str) -> np.ndarray | None:
        """Per-window anomaly labels of a split (series: the last reading's label, the decision
        a stream makes; images: not the normal class), or None when the data carries none."""
        part = self.splits[split]
        if isinstance(part, WindowSet):
            return part.end_labels
        return None if part.labels is None else part.labels.astype(bool)

    def normal(self, split: str) -> np.ndarray:
        """Mask of the windows of a split that hold no labelled anomaly at all."""
        part = self.splits[split]
        if isinstance(part, WindowSet):
            labelled = part.any_labels
        else:
            labelled = None if part.labels is None else part.labels.astype(bool)
        return np.ones(len(part), dtype=bool) if labelled is None else ~labelled


@dataclass
class TrainResult:
    detector: Detector
    fit: FitResult
    data: PreparedData | StreamedData
    artifact_dir: Path
    run_id: str | None = None
    fpr_estimate: FprEstimate | None = None
    evaluation: dict | None = None
    version: str | None = None

    def summary(self) -> dict:
        return {
            "run_id": self.run_id,
            "artifact": str(self.artifact_dir),
            "model_kind": self.detector.config.kind,
            "backbone": self.detector.config.backbone,
            "epochs": self.fit.epochs_run,
            "train_loss": self.fit.train_losses[-1] if self.fit.train_losses else None,
            "val_loss": self.fit.val_losses[-1] if self.fit.val_losses else None,
            "windows_per_second": _finite_or_none(self.fit.windows_per_second),
            "threshold": self.detector.threshold.value,
            "calibration": self.detector.threshold.method,
            "fpr_estimate": self.fpr_estimate.to_dict() if self.fpr_estimate else None,
            "evaluation": self.evaluation,
            "registered_version": self.version,
        }


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def is_image_source(data: str) -> bool:
    path = Path(data)
    if data == "digits" or path.suffix.lower() in _IMAGE_SUFFIXES or "idx" in path.name:
        return True
    if path.is_dir():
        return not any(path.rglob("*.parquet")) and any(
            p.suffix.lower() in _IMAGE_SUFFIXES for p in path.rglob("*") if p.is_file()
        )
    return False


def _scaler_kind(settings: TrainSettings, image: bool) -> str:
    if settings.scaler != "auto":
        return settings.scaler
    return "minmax" if image or settings.model.loss == "bce" else "standard"


def series_groups(table: SeriesTable):
    """(key, times, values [T, F], labels or None) per key: the input of `cut_windows`."""
    for key, frame in table.groups():
        labels = frame[table.label_col].to_numpy() if table.label_col else None
        values = frame[list(table.features)].to_numpy(dtype=np.float32)
        yield key, frame[table.time_col].to_numpy(), values, labels


def prepare(settings: TrainSettings) -> PreparedData | StreamedData:
    if settings.out_of_core:
        if not settings.time_col:
            raise ConfigError("time_col", "series data needs --time-col")
        return prepare_streamed(settings, _scaler_kind(settings, image=False))
    image = (
        is_image_source(settings.data)
        if settings.input_kind == "auto"
        else settings.input_kind == "image"
    )
    return _prepare_images(settings) if image else _prepare_series(settings)


def _prepare_series(settings: TrainSettings) -> PreparedData:
    if not settings.time_col:
        raise ConfigError("time_col", "series data needs --time-col")
    table = load_series(settings.data, **settings.series_columns())
    spec = WindowSpec(settings.window, settings.stride)
    parts = split_series(table, settings.fractions, train_until=settings.train_until)
    splits: dict[str, WindowSet] = {}
    for name in SPLITS:
        if len(parts[name]) == 0:
            continue
        try:
            splits[name] = cut_windows(series_groups(parts[name]), spec, source=f"{name} split")
        except DataError:
            if name == "train":
                raise
            log.warning("the %s split is shorter than one window; it is left out", name)
    train = splits["train"]
    if train.any_labels is not None:
        # Only normal windows teach the model what normal looks like.
        keep = ~train.any_labels
        if not keep.any():
            raise DataError(f"{settings.data}: every training window holds a labelled anomaly")
        splits["train"] = train.subset(np.flatnonzero(keep))
    train_rows = parts["train"].values()
    scaler = Scaler.fit(_scaler_kind(settings, image=False), train_rows)
    spec_in = InputSpec("series", features=tuple(table.features), window=spec)
    return PreparedData(spec_in, scaler, splits, table.digest(), table.time_range(), parts)


def _prepare_images(settings: TrainSettings) -> PreparedData:
    images = load_images(settings.data, labels_path=settings.labels_path)
    normal = images
    others = None
    if settings.normal_class is not None:
        if images.labels is None:
            raise DataError(f"{settings.data}: --normal-class needs labelled images")
        wanted = _class_index(images, settings.normal_class)
        is_normal = images.labels == wanted
        if not is_normal.any():
            raise DataError(f"{settings.data}: no image of class {settings.normal_class!r}")
        normal, others = (
            images.subset(np.flatnonzero(is_normal)),
            images.subset(np.flatnonzero(~is_normal)),
        )
    parts = split_images(normal, settings.fractions, seed=settings.fit.seed)
    splits: dict[str, ImageSet] = {}
    for name in SPLITS:
        part = parts[name]
        # Labels from here on mean "anomalous": 0 for the normal class, 1 for any other.
        flags = np.zeros(len(part), dtype=np.int64) if others is not None else None
        splits[name] = replace(part, labels=flags)
    if others is not None and len(others):
        test = splits["test"]
        splits["test"] = ImageSet(
            np.concatenate([test.images, others.images]),
            np.concatenate([test.labels, np.ones(len(others), dtype=np.int64)]),
            test.source,
        )
    train = splits["train"].images
    if len(train) == 0:
        raise DataError(f"{settings.data}: no training images after the split")
    channels = train.shape[1]
    samples = np.moveaxis(train, 1, -1).reshape(-1, channels)
    scaler = Scaler.fit(_scaler_kind(settings, image=True), samples)
    spec_in = InputSpec("image", image_shape=tuple(int(d) for d in train.shape[1:]))
    return PreparedData(spec_in, scaler, splits, normal.digest())


def _class_index(images: ImageSet, normal_class: str) -> int:
    names = getattr(images, "class_names", None)
    if names and str(normal_class) in names:
        return list(names).index(str(normal_class))
    try:
        return int(normal_class)
    except ValueError:
        known = ", ".join(names) if names else "integer labels"
        raise DataError(f"unknown class {normal_class!r}; known: {known}") from None


def _scaled_tensor(data: PreparedData, split: str, device: torch.device) -> torch.Tensor | None:
    if split not in data.splits or len(data.splits[split]) == 0:
        return None
    scaled = data.scaler.transform(data.raw(split), axis=data.input.feature_axis)
    return torch.from_numpy(scaled).to(device)


def train(
    settings: TrainSettings,
    callbacks: Sequence[Callback] = (),
    data: PreparedData | StreamedData | None = None,
    context: RankContext | None = None,
) -> TrainResult | None:
    """Fit a detector and write its artifact to `settings.out`.

    In a distributed `context` every rank fits; rank 0 alone calibrates on the full calibration
    split, evaluates and writes the artifact, and the other ranks return None.
    """
    context = context or RankContext()
    data = data or prepare(settings)
    device = context.device(settings.device)
    config = settings.model.with_input_shape(data.input.sample_shape)
    train_source, val_source = _fit_inputs(settings, data, config, context, device)
    torch.manual_seed(settings.fit.seed)
    model = build_model(config).to(device)
    if config.kind == "pca":
        if context.distributed:
            raise ConfigError("kind", "pca is fitted in closed form in one process")
        model.fit(train_source)
        result = FitResult(best_epoch=0)
        result.train_losses.append(validation_loss(model, config, train_source))
        if val_source is not None:
            result.val_losses.append(validation_loss(model, config, val_source))
    else:
        result = fit(
            model,
            config,
            make_objective(config),
            train_source,
            val_source,
            settings.fit,
            callbacks,
            context=context,
            device=device,
        )
    if not context.is_main:
        return None
    info = {
        "data": {
            "source": str(settings.data),
            "digest": data.digest,
            "time_range": list(data.time_range) if data.time_range else None,
            "windows": data.window_counts(),
        },
        "fit": {
            **asdict(settings.fit),
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early,
            "train_losses": result.train_losses,
            "val_losses": result.val_losses,
        },
    }
    if context.distributed:
        info["fit"]["world_size"] = context.world_size
    detector = Detector(data.input, data.scaler, config, model, info=info)
    detector.threshold = calibrate(detector, data, settings.calibration)
    # the test split is scored once, for the FPR estimate and the evaluation alike
    test = data.split_scores(detector, "test") if data.has("test") else None
    fpr = _estimate_fpr(detector, test)
    evaluation = (
        evaluate_split(detector, data, "test", settings.point_rule, test.scores)
        if isinstance(data, PreparedData) and test is not None
        else None
    )
    if isinstance(data, StreamedData) and data.stream.label_col:
        log.info("out of core, the test split is not evaluated point by point: aewatch evaluate")
    info["calibration"] = {"fpr_estimate": fpr.to_dict() if fpr else None}
    info["evaluation"] = evaluation
    out = Path(settings.out)
    save_detector(detector, out)
    return TrainResult(detector, result, data, out, fpr_estimate=fpr, evaluation=evaluation)


def _fit_inputs(
    settings: TrainSettings,
    data: PreparedData | StreamedData,
    config: ModelConfig,
    context: RankContext,
    device: torch.device,
):
    """The training and validation inputs of `fit`: tensors in memory, or streams."""
    if isinstance(data, StreamedData):
        shuffled = ShuffledWindows(
            data,
            "train",
            batch_size=max(1, settings.fit.batch_size // context.world_size),
            buffer_windows=settings.shuffle_windows,
            seed=settings.fit.seed,
            context=context,
        )
        val = validation_batches(data, context, device) if data.has("validation") else None
        return StreamBatches(shuffled, device), val
    x_train = _scaled_tensor(data, "train", device)
    x_val = _scaled_tensor(data, "validation", device)
    if config.loss == "bce":
        low, high = float(x_train.min()), float(x_train.max())
        if low < 0.0 or high > 1.0:
            raise ConfigError(
                "loss",
                f"bce needs inputs in [0, 1] but the scaled training data spans "
                f"[{low:.3g}, {high:.3g}]; use --scaler minmax",
            )
    return x_train, x_val


def calibrate(
    detector: Detector, data: PreparedData | StreamedData, settings: CalibrationSettings
) -> Threshold:
    """A threshold from the calibration split: normal windows only, or every window with its
    label for the f1 method."""
    if not data.has("calibration"):
        raise CalibrationError(
            "the calibration split is empty: give it a share in --fractions or more data"
        )
    calibrator = make_calibrator(
        settings.method,
        target_fpr=settings.target_fpr,
        mad_k=settings.mad_k,
        pot_initial_quantile=settings.pot_initial_quantile,
        margin=settings.margin,
    )
    scored = data.split_scores(detector, "calibration")
    if settings.method == "f1":
        labels = scored.labels
        calibrator.update(
            scored.scores, labels if labels is not None else np.zeros(len(scored.scores), bool)
        )
    else:
        calibrator.update(scored.scores[scored.normal])
    return calibrator.compute()


def _estimate_fpr(detector: Detector, test: SplitScores | None) -> FprEstimate | None:
    """False-positive rate on the test split's normal windows, from that split's scores."""
    if test is None:
        log.warning("no test split: the false-positive rate is not estimated")
        return None
    if not test.normal.any():
        return None
    return estimate_fpr(test.scores[test.normal], detector.threshold.require())


def evaluate_split(
    detector: Detector,
    data: PreparedData,
    split: str,
    rule: str = "end",
    scores: np.ndarray | None = None,
) -> dict | None:
    """Metrics of a labelled split (None when it has no labels); `scores` if already known."""
    if not data.has(split) or data.labels(split) is None:
        return None
    part = data.splits[split]
    if scores is None:
        scores = detector.score(data.raw(split), attribution=False).scores
    threshold = detector.threshold.require()
    if isinstance(part, ImageSet):
        return evaluate_images(part.labels, scores, threshold)
    table = data.tables[split]
    points = [
        SeriesPoints(key, frame[table.time_col].to_numpy(), frame[table.label_col].to_numpy())
        for key, frame in table.groups()
    ]
    return evaluate_series(
        points,
        part.keys,
        part.end_times,
        detector.input.window.length,
        scores,
        threshold,
        rule=rule,
    )

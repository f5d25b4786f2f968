"""The training job: data -> splits -> windows -> scaler -> model -> fit -> detector artifact.

`train(settings)` is what `aewatch train` runs. Everything it needs arrives in one frozen
`TrainSettings`; it reports progress through callbacks and returns the trained detector with the
prepared splits, so calibration and registration can follow without reading the data again.

The data is prepared once into `Splits` (`training.data`): series or images in memory, or, with
`out_of_core`, a Parquet dataset read in record batches; training, calibration and evaluation ask
the same questions of each. In a distributed job every rank trains and rank 0 alone calibrates,
evaluates and writes the artifact (the other ranks' `train` returns None).

Size: over 400 lines because every setting of a training is checked here, before any data is
read or an MLflow run opened, next to the job that uses it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pipeline.detector import Detector, ModelConfig, build_model, resolve_device, save_detector
from pipeline.errors import CalibrationError, ConfigError, DataError
from training.baseline import Baseline, fit_baseline
from training.budget import NOT_CONVERGED
from training.calibrate import (
    MIN_WINDOWS,
    CalibrationSettings,
    FprEstimate,
    calibrate,
    estimate_fpr,
)
from training.data.columns import FILL_POLICIES
from training.data.images import DIGITS, is_image_source
from training.data.out_of_core import prepare_streamed
from training.data.prepared import prepare_images, prepare_series, scaler_kind
from training.data.splits import (
    PARTS,
    Splits,
    SplitScores,
    calibration_hints,
    check_fractions,
    parse_time_limit,
)
from training.data.streamed import STREAM_FILL_POLICIES
from training.data.window_tensor import held
from training.distributed import RankContext
from training.fit import Callback, FitConfig, FitResult, fit, validation_loss
from training.fpr_check import FprCheck, check_fpr, window_of
from training.objectives import make_objective
from training.outputs import writable
from training.score_stats import check_score, fit_stats, score_mode

__all__ = [
    "CalibrationSettings",
    "TrainResult",
    "TrainSettings",
    "check_scale",
    "warn_code_size",
    "prepare",
    "train",
]

log = logging.getLogger(__name__)
CALENDAR_MODES = ("auto", "off")


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
    key_baselines: bool = False
    train_until: str | None = None
    calendar: str = "off"  # "auto": time of day / day of week inputs the training span supports
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
    # the score: auto (terms for series, raw for images), raw or terms; terms' aggregation
    score: str = "auto"
    score_aggregation: str = "max"
    # default --window and --fractions: a series too short for them gets a plan that fits
    adapt_split: bool = False
    device: str = "auto"
    # data larger than memory
    out_of_core: bool = False
    batch_rows: int = 65_536
    shuffle_windows: int = 65_536
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("window", "stride", "batch_rows", "shuffle_windows"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.fill not in FILL_POLICIES:
            raise ConfigError("fill", f"{self.fill!r} is not one of {', '.join(FILL_POLICIES)}")
        if self.calendar not in CALENDAR_MODES:
            raise ConfigError("calendar", f"{self.calendar!r} is not one of auto, off")
        target = self.calibration.target_fpr
        if not 0 < target < 1:
            raise ConfigError("target_fpr", f"must be in (0, 1), got {target}")
        resolve_device(self.device)
        if self.train_until is not None:
            try:
                parse_time_limit(self.train_until, "train_until")
            except DataError as exc:
                raise ConfigError("train_until", str(exc).removeprefix("train_until: ")) from None
        try:
            check_fractions(self.fractions, "fractions")
        except DataError as exc:
            raise ConfigError("fractions", str(exc).removeprefix("fractions: ")) from None
        # found only once the model was trained, otherwise
        if self.fractions[2] == 0 and self.train_until is None:
            raise ConfigError("fractions", "the threshold is calibrated on the third part: not 0")
        if self.calibration.method == "f1" and not (self.label_col or self.labels_path):
            raise ConfigError(
                "calibration", "f1 needs labelled anomalies: give --label-col (images: --labels)"
            )
        if self.out_of_core:
            self._check_out_of_core()
        check_scale(self, distributed=False)
        check_score(
            self.score,
            self.score_aggregation,
            image=self.is_image,
            config=self.model,
            window=self.window,
        )

    @property
    def is_image(self) -> bool:
        """Whether the data are images (`input_kind`, or what `data` looks like)."""
        if self.input_kind == "auto":
            return is_image_source(self.data)
        return self.input_kind == "image"

    def check_out(self) -> None:
        """`out` can take the artifact: not a file, not a finished detector folder unless
        `overwrite`, and writable, and `data` is there and not an empty file; checked before
        any data is read or run opened."""
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ConfigError("out", f"{out} is a file; the artifact is a folder")
        if (out / "manifest.json").exists() and not self.overwrite:
            raise ConfigError(
                "out", f"{out} holds a detector already; give --overwrite to replace it"
            )
        source = Path(self.data)
        data = source.resolve()
        if out.resolve() == data or out.resolve() in data.parents:
            raise ConfigError(
                "out", f"{out} holds the input (--data {self.data}); write the detector elsewhere"
            )
        writable(out, out)
        # said as the readers say it, before an MLflow run is opened
        if not source.exists() and self.data != DIGITS:
            raise DataError(f"{self.data}: no such file or directory")
        if source.is_file() and source.stat().st_size == 0:
            raise DataError(f"{self.data}: the file is empty")

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
        if self.key_baselines:
            raise ConfigError("key_baselines", "per-key baselines are trained on data in memory")
        if self.calendar != "off":
            raise ConfigError("calendar", "calendar inputs need the series in memory")
        if self.model.loss == "bce" and scaler_kind(self, image=False) != "minmax":
            raise ConfigError("loss", "bce needs inputs in [0, 1]: use --scaler minmax")


def warn_code_size(config: ModelConfig) -> None:
    """An "undercomplete" model whose code is not smaller than its input can learn the identity
    and reconstruct anomalies as well as normal data: warned about, not refused."""
    if config.kind == "undercomplete" and config.code_size >= config.n_inputs:
        log.warning(
            "code_size %d is not smaller than the %d inputs of a window: an undercomplete "
            "autoencoder this wide can copy its input and flag nothing; use a smaller "
            "--code-size or --kind denoising/sparse/contractive",
            config.code_size,
            config.n_inputs,
        )


def check_scale(settings: TrainSettings, *, distributed: bool) -> None:
    """PCA is fitted in closed form: on data in memory, in one process."""
    if settings.model.kind == "pca" and (settings.out_of_core or distributed):
        where = "on data in memory" if settings.out_of_core else "in one process"
        raise ConfigError("kind", f"pca is fitted in closed form {where}")


@dataclass
class TrainResult:
    detector: Detector
    fit: FitResult
    data: Splits
    artifact_dir: Path
    run_id: str | None = None
    fpr_estimate: FprEstimate | None = None
    fpr_check: FprCheck | None = None
    evaluation: dict | None = None
    baseline: Baseline | None = None  # PCA on the same windows
    version: str | None = None

    def summary(self) -> dict:
        return {
            "run_id": self.run_id,
            "artifact": str(self.artifact_dir),
            "model_kind": self.detector.config.kind,
            "backbone": self.detector.config.backbone,
            "epochs": self.fit.epochs_run,
            **{k: v for k, v in self.fit.summary().items() if k != "epochs"},
            "train_loss": self.fit.train_losses[-1] if self.fit.train_losses else None,
            "val_loss": self.fit.val_losses[-1] if self.fit.val_losses else None,
            "kept_val_loss": self.fit.kept_val_loss,
            "windows_per_second": _finite_or_none(self.fit.windows_per_second),
            "score": self.detector.score_mode,
            "threshold": self.detector.threshold.value,
            "calibration": _calibration_said(self.detector.threshold),
            "fpr_estimate": self.fpr_estimate.to_dict() if self.fpr_estimate else None,
            "fpr_check": self.fpr_check.to_dict() if self.fpr_check else None,
            "evaluation": self.evaluation,
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "registered_version": self.version,
        }


def _calibration_said(threshold) -> str | None:
    """The method, and the exponential tail where too few windows gave no quantile."""
    if threshold.params.get("rule") == "tail":
        return f"{threshold.method}, exponential tail: too few windows for the quantile"
    return threshold.method


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def prepare(settings: TrainSettings) -> Splits:
    """The data `settings` name, split, windowed and with the scaler of its train part: out of
    core, or in memory as series or images (`input_kind`, or what `data` looks like)."""
    if settings.out_of_core:
        if not settings.time_col:
            raise ConfigError("time_col", "series data needs --time-col")
        return prepare_streamed(settings, scaler_kind(settings, image=False))
    return prepare_images(settings) if settings.is_image else prepare_series(settings)


def train(
    settings: TrainSettings,
    callbacks: Sequence[Callback] = (),
    data: Splits | None = None,
    context: RankContext | None = None,
) -> TrainResult | None:
    """Fit a detector and write its artifact to `settings.out`.

    In a distributed `context` every rank fits; rank 0 alone calibrates on the full calibration
    split, evaluates and writes the artifact, and the other ranks return None.
    """
    context = context or RankContext()
    check_scale(settings, distributed=context.distributed)
    data = data or prepare(settings)
    device = context.device(settings.device)
    config = settings.model.with_input_shape(data.input.sample_shape)
    warn_code_size(config)
    n_train = data.window_counts()["train"]
    train_source, val_source = data.fit_inputs(
        config,
        batch_size=settings.fit.resolved_batch_size(n_train),
        shuffle_windows=settings.shuffle_windows,
        seed=settings.fit.seed,
        context=context,
        device=device,
    )
    torch.manual_seed(settings.fit.seed)
    model = build_model(config).to(device)
    if config.kind == "pca":
        model.fit(train_source)
        result = FitResult(best_epoch=0, converged=True)  # closed form
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
            n_train=n_train,
        )
        if not result.converged:
            log.warning(NOT_CONVERGED, result.steps, result.best_step)
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
            **result.summary(),
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "train_losses": result.train_losses,
            "val_losses": result.val_losses,
        },
    }
    if context.distributed:
        info["fit"]["world_size"] = context.world_size
    baselines = getattr(data, "baselines", None)
    detector = Detector(data.input, data.scaler, config, model, info=info, baselines=baselines)
    image = data.input.kind == "image"
    window = None if image else data.input.window.length
    mode = score_mode(settings.score, image=image, config=config, window=window)
    if mode == "terms":
        detector.score_stats = fit_stats(detector, data, settings.score_aggregation)
    info["score"] = {"mode": mode, "aggregation": settings.score_aggregation}
    detector.threshold = _calibrate(detector, data, settings)
    # the test split is scored once, for the FPR estimate and the evaluation alike
    test = data.split_scores(detector, "test") if data.has("test") else None
    fpr = _estimate_fpr(detector, test)
    evaluation = (
        data.evaluate(detector, "test", settings.point_rule, test.scores)
        if test is not None
        else None
    )
    check = _check_fpr(detector, fpr)
    info["calibration"] = {
        "fpr_estimate": fpr.to_dict() if fpr else None,
        "fpr_check": check.to_dict() if check else None,
    }
    info["evaluation"] = evaluation
    baseline = None
    if held(train_source):
        baseline = fit_baseline(
            detector,
            data,
            train_source,
            val_source,
            settings.point_rule,
            evaluation,
            calibrate=lambda pca: _calibrate(pca, data, settings),
            score_stats=lambda pca: fit_stats(pca, data, settings.score_aggregation),
        )
        info["baseline"] = baseline.to_dict() if baseline else None
    out = Path(settings.out)
    save_detector(detector, out)
    return TrainResult(
        detector,
        result,
        data,
        out,
        fpr_estimate=fpr,
        fpr_check=check,
        evaluation=evaluation,
        baseline=baseline,
    )


def _check_fpr(detector: Detector, fpr: FprEstimate | None) -> FprCheck | None:
    """Whether the held-out rate is far above the calibration's target (see
    `training.fpr_check`); logged as a warning when it is."""
    target = detector.threshold.params.get("target_fpr")
    if fpr is None or target is None:
        return None
    check = check_fpr(fpr.false_positives, fpr.n, float(target), *window_of(detector))
    if check.far_above:
        log.warning(check.message())
    return check


def _calibrate(detector: Detector, data: Splits, settings: TrainSettings):
    """`calibrate`, whose refusal for too few windows names the flags that would work."""
    try:
        return calibrate(detector, data, settings.calibration)
    except CalibrationError as exc:
        table = getattr(data, "table", None)
        if table is None or not exc.more_data:
            raise
        key_rows = [len(positions) for _, positions in table._group_positions()]
        window = data.input.window
        fractions = settings.fractions
        if settings.adapt_split:  # what the plan gave, recovered from the parts' sizes
            fractions = tuple(len(data.tables[p]) / max(len(table), 1) for p in PARTS)
        hint = calibration_hints(key_rows, window.length, window.stride, fractions, MIN_WINDOWS)
        raise CalibrationError(f"{exc}; {hint}") from exc


def _estimate_fpr(detector: Detector, test: SplitScores | None) -> FprEstimate | None:
    """False-positive rate on the test split's normal windows, from that split's scores."""
    if test is None:
        log.warning("no test split: the false-positive rate is not estimated")
        return None
    if not test.normal.any():
        return None
    return estimate_fpr(test.scores[test.normal], detector.threshold.require())

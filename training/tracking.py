"""MLflow tracking for training runs: parameters, per-epoch losses, the detector artifact.

The tracking URI is chosen at the CLI (flag, then `MLFLOW_TRACKING_URI`, then a local sqlite file)
and handed in; nothing here reads the environment.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import mlflow

from pipeline import __version__
from training.fit import FitResult

__all__ = [
    "MlflowEpochLogger",
    "default_tracking_uri",
    "flatten_params",
    "local_store",
    "log_fit_summary",
    "log_quality",
    "tracking_run",
]

log = logging.getLogger(__name__)


def default_tracking_uri(directory: Path | None = None) -> str:
    """A local sqlite store in `directory` (the working directory by default)."""
    return f"sqlite:///{(directory or Path.cwd()).resolve() / 'mlflow.db'}"


def local_store(root: Path, experiment: str) -> str:
    """A sqlite store in `root` with `experiment` keeping its artifacts there too (not in an
    `mlruns` folder of the working directory); its tracking URI."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment(experiment, artifact_location=(root / "artifacts").as_uri())
    return uri


def flatten_params(settings) -> dict[str, str]:
    """Settings as flat MLflow params: nested dataclasses become `model.code_size`, ..."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix.rstrip(".")] = str(value)

    walk("", asdict(settings))
    return flat


class MlflowEpochLogger:
    """Logs train and validation loss at every epoch of the active run."""

    def on_epoch_end(self, epoch: int, train_loss: float, val_loss: float | None) -> None:
        metrics = {"train_loss": train_loss}
        if val_loss is not None:
            metrics["val_loss"] = val_loss
        mlflow.log_metrics(metrics, step=epoch)


@contextmanager
def tracking_run(
    tracking_uri: str, experiment: str, run_name: str | None, params: dict[str, str]
) -> Iterator[mlflow.ActiveRun]:
    mlflow.set_tracking_uri(tracking_uri)
    # Versions are registered where the run is recorded. MLflow exports the registry URI to the
    # environment, where child processes would inherit it: put back what was there.
    exported = os.environ.get("MLFLOW_REGISTRY_URI")
    mlflow.set_registry_uri(tracking_uri)
    try:
        mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name=run_name) as run:
            mlflow.set_tag("aewatch.version", __version__)
            mlflow.log_params(params)
            yield run
    finally:
        if exported is None:
            os.environ.pop("MLFLOW_REGISTRY_URI", None)
        else:
            os.environ["MLFLOW_REGISTRY_URI"] = exported


def log_fit_summary(result: FitResult) -> None:
    summary = {
        "epochs_run": float(result.epochs_run),
        "best_epoch": float(result.best_epoch),
        "fit_seconds": result.seconds,
    }
    if result.windows_seen:
        summary["train_windows_per_second"] = result.windows_per_second
    if result.train_losses:
        summary["final_train_loss"] = result.train_losses[-1]
    if result.val_losses:
        summary["final_val_loss"] = result.val_losses[-1]
    mlflow.log_metrics(summary)


def log_quality(result) -> None:
    """Threshold, held-out false-positive rate and test metrics of a trained detector."""
    threshold = result.detector.threshold
    metrics = {"threshold": float(threshold.value), "calibration_n": float(threshold.n)}
    if result.fpr_estimate:
        fpr = result.fpr_estimate
        metrics.update(fpr_estimate=fpr.rate, fpr_ci_low=fpr.ci_low, fpr_ci_high=fpr.ci_high)
    for key, value in (result.evaluation or {}).items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics[f"test_{key}"] = float(value)
        elif isinstance(value, dict):
            for sub, inner in value.items():
                if isinstance(inner, int | float):
                    metrics[f"test_{key}_{sub}"] = float(inner)
    mlflow.set_tag("aewatch.calibration", threshold.method)
    mlflow.log_metrics(metrics)

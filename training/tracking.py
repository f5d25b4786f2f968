"""MLflow for the training side: the only module of `training` that imports mlflow.

Runs (parameters, per-epoch losses, metrics, figures, artifacts), the registration of a detector
as a pyfunc model version ("models from code", see `pipeline.registry.pyfunc`), and what
promotion changes in the registry (aliases, tags). The tracking URI is chosen at the CLI (flag,
then `MLFLOW_TRACKING_URI`, then a local sqlite file) and handed in; nothing here reads the
environment. (MLflow itself exports the registry URI to the environment when it is set;
`tracking_run` puts back what was there, so that child processes do not inherit it.)

A tracking server is probed before a run opens or the registry is read
(`pipeline.registry.reach`): a server that does not answer is a one-line `RegistryUnreachable`
within the retry budget, never a missing alias or version.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import mlflow
import torch

from pipeline import __version__
from pipeline.errors import RegistryError, RegistryUnreachable
from pipeline.registry.client import TAG_PREFIX, download_version, package_files
from pipeline.registry.reach import probe, unreachable_error
from training.fit import FitResult

__all__ = [
    "MlflowEpochLogger",
    "Registry",
    "flatten_params",
    "local_store",
    "log_artifacts",
    "log_figure",
    "log_fit_summary",
    "log_metrics",
    "log_model_version",
    "log_quality",
    "tracking_run",
]

log = logging.getLogger(__name__)

PACKAGE_TAG = f"{TAG_PREFIX}package_files"


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
    probe(tracking_uri, create=True)
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


def log_metrics(metrics: dict[str, float]) -> None:
    mlflow.log_metrics(metrics)


def log_figure(figure, path: str) -> None:
    mlflow.log_figure(figure, path)


def log_artifacts(directory: Path, artifact_path: str) -> None:
    mlflow.log_artifacts(str(directory), artifact_path=artifact_path)


def trained_params(result) -> dict[str, str]:
    """What was trained, where the run adapted the settings (a short series gets a smaller
    window and other fractions; `--scaler auto` picks a kind; a kind ignores the knobs of
    another): `trained.*` beside the requested settings' params."""
    detector = result.detector
    params = {"trained.scaler": detector.scaler.kind, "trained.score": detector.score_mode}
    if detector.input.window is not None:
        params["trained.window"] = str(detector.input.window.length)
        params["trained.stride"] = str(detector.input.window.stride)
    else:
        params["trained.image_shape"] = str(tuple(detector.input.image_shape))
    config = detector.config
    fields = {"kind", "backbone", "input_shape", "code_size", "loss"}
    if config.kind != "pca":
        fields |= {"hidden"}
    for name in sorted(fields):
        params[f"trained.model.{name}"] = str(getattr(config, name))
    for part, count in (result.data.window_counts() or {}).items():
        params[f"trained.windows.{part}"] = str(count)
    return params


def log_trained(result) -> None:
    mlflow.log_params(trained_params(result))


def log_fit_summary(result: FitResult) -> None:
    """The run's budget (plan.* parameters) and what it took: epochs, steps, the best step,
    whether it stopped early and converged (1/0), losses and speed."""
    if result.plan is not None:
        mlflow.log_params({f"plan.{k}": str(v) for k, v in result.plan.to_dict().items()})
    summary = {
        "epochs_run": float(result.epochs_run),
        "best_epoch": float(result.best_epoch),
        "fit_seconds": result.seconds,
        "steps": float(result.steps),
        "best_step": float(result.best_step),
        "stopped_early": float(result.stopped_early),
        "converged": float(result.converged),
        "cycles": float(result.cycles),
    }
    if result.windows_seen:
        summary["train_windows_per_second"] = result.windows_per_second
    if result.train_losses:
        summary["final_train_loss"] = result.train_losses[-1]
    if result.val_losses:
        summary["final_val_loss"] = result.val_losses[-1]
        summary["best_val_loss"] = min(result.val_losses)
    mlflow.log_metrics(summary)


def log_quality(result) -> None:
    """Threshold, held-out false-positive rate and test metrics of a trained detector."""
    threshold = result.detector.threshold
    metrics = {"threshold": float(threshold.value), "calibration_n": float(threshold.n)}
    if result.fpr_estimate:
        fpr = result.fpr_estimate
        metrics.update(fpr_estimate=fpr.rate, fpr_ci_low=fpr.ci_low, fpr_ci_high=fpr.ci_high)
    check = getattr(result, "fpr_check", None)
    if check is not None:
        metrics.update(fpr_effective_low=check.low, fpr_far_above=float(check.far_above))
        mlflow.set_tag("aewatch.fpr_check", "far_above" if check.far_above else "ok")
    for key, value in (result.evaluation or {}).items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics[f"test_{key}"] = float(value)
        elif isinstance(value, dict):
            for sub, inner in value.items():
                if isinstance(inner, int | float):
                    metrics[f"test_{key}_{sub}"] = float(inner)
    baseline = getattr(result, "baseline", None)
    if baseline is not None:  # the PCA baseline beside the model: pca_val_loss, pca_test_auroc...
        metrics.update(baseline.metrics())
        if baseline.model_val_loss is not None:
            metrics["model_val_loss"] = baseline.model_val_loss
        mlflow.set_tag("aewatch.baseline", baseline.verdict())
    mlflow.set_tag("aewatch.calibration", threshold.method)
    mlflow.log_metrics(metrics)


def log_model_version(
    name: str,
    model_code: Path,
    artifact_dir: Path,
    *,
    input_example,
    tags: dict[str, str],
    alias: str | None,
    model_config: dict | None = None,
    free_columns: tuple[str, ...] = (),
    optional_columns: tuple[str, ...] = (),
) -> str:
    """Log a detector folder as a pyfunc model ("models from code": `model_code` is the file
    MLflow runs, the folder its `detector` artifact) in the active run, register it as a new
    version of `name` with `tags` (also set on the run) and point `alias` at it. The signature
    is that of `input_example`, except that `free_columns` take any value (an image as flat or
    nested pixel lists; a time as text or epoch ms), `optional_columns` may be left out, and a
    float column is a double (MLflow refuses to narrow float64, as `pd.read_csv` gives, to the
    example's float32; the pyfunc reads either)."""
    signature = None
    if input_example is not None:
        from mlflow.models import ModelSignature, infer_signature
        from mlflow.types import DataType
        from mlflow.types.schema import AnyType, ColSpec, Schema

        def column(c: ColSpec) -> ColSpec:
            required = c.name not in optional_columns
            if c.name in free_columns:
                return ColSpec(AnyType(), c.name, required=required)
            kind = DataType.double if c.type == DataType.float else c.type
            return ColSpec(kind, c.name, required=required)

        inferred = infer_signature(input_example).inputs.inputs
        signature = ModelSignature(inputs=Schema([column(c) for c in inferred]))
    info = mlflow.pyfunc.log_model(
        name="detector",
        python_model=str(model_code),
        artifacts={"detector": str(Path(artifact_dir).resolve())},
        input_example=input_example,
        signature=signature,
        model_config=model_config,
        pip_requirements=[
            f"mlflow=={mlflow.__version__}",
            f"torch=={torch.__version__.split('+')[0]}",
            "numpy",
            "pandas",
            "pyyaml",
            f"aewatch=={__version__}",
        ],
    )
    version = str(mlflow.register_model(info.model_uri, name).version)
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_model_version_tag(name, version, PACKAGE_TAG, _package_listing(name, version))
    mlflow.set_tags(tags)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    log.info("registered %s version %s%s", name, version, f" as @{alias}" if alias else "")
    return version


def _package_listing(name: str, version: str) -> str:
    """The files of the version as a loader downloads them, with their SHA-256 (JSON)."""
    with tempfile.TemporaryDirectory(prefix="aewatch-register-") as scratch:
        # the process's registry: where `log_model_version` registered it
        local = download_version(
            mlflow.MlflowClient(), name, version, scratch, mlflow.get_tracking_uri()
        )
        listing = package_files(local)
    return json.dumps(listing, sort_keys=True, separators=(",", ":"))


class Registry:
    """What promotion reads and changes in the model registry: aliases and tags."""

    def __init__(self, tracking_uri: str | None) -> None:
        probe(tracking_uri)
        self.uri = tracking_uri
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def _call(self, what: str, request, *args):
        """`request(*args)`; a network error is `RegistryUnreachable`, a refusal `RegistryError`."""
        try:
            return request(*args)
        except mlflow.MlflowException as exc:
            error = unreachable_error(self.uri, exc) or RegistryError(f"{what}: {exc.message}")
            raise error from exc
        except Exception as exc:
            unreachable = unreachable_error(self.uri, exc)
            if unreachable is None:
                raise
            raise unreachable from exc

    def version(self, name: str, alias: str):
        """The model version `alias` points to, or None when it points nowhere (a model or
        alias that does not exist); an unreachable server is an error, not None."""
        try:
            return self._call(
                f"{name}@{alias}", self.client.get_model_version_by_alias, name, alias
            )
        except RegistryError as exc:
            if isinstance(exc, RegistryUnreachable):
                raise
            return None

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self._call(f"{name}@{alias}", self.client.set_registered_model_alias, name, alias, version)

    def model_tags(self, name: str) -> dict[str, str]:
        return self._call(name, self.client.get_registered_model, name).tags or {}

    def set_model_tag(self, name: str, key: str, value: str) -> None:
        self._call(name, self.client.set_registered_model_tag, name, key, value)

    def set_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        self._call(
            f"{name} v{version}", self.client.set_model_version_tag, name, version, key, value
        )

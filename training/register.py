"""Writing to MLflow: the run's figures and the registered model version. The only MLflow writer.

A version holds the detector as a pyfunc built from `pipeline/mlflow_model.py` ("models from
code") with the artifact folder attached; nothing is pickled. Version tags carry what operators
and the worker need without downloading anything: threshold, method, target FPR, window,
features, model kind and the SHA-256 of the weights (which the worker verifies on load).
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from pipeline import __version__
from pipeline.detector import Detector, read_manifest
from pipeline.registry import pyfunc as _model_code
from pipeline.registry.client import TAG_PREFIX
from training import plots
from training.job import PreparedData, TrainResult
from training.out_of_core import StreamedData

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "git_commit",
    "log_run_figures",
    "register_version",
    "version_tags",
]

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"
MODEL_CODE = Path(_model_code.__file__)


def git_commit(directory: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=directory or MODEL_CODE.parent,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def version_tags(detector: Detector, artifact_dir: Path) -> dict[str, str]:
    manifest = read_manifest(artifact_dir)
    threshold = detector.threshold
    tags = {
        "threshold": repr(threshold.value),
        "calibration": str(threshold.method),
        "target_fpr": str(threshold.params.get("target_fpr", "")),
        "model_kind": detector.config.kind,
        "backbone": detector.config.backbone,
        "input": detector.input.kind,
        "weights_sha256": manifest["weights"]["sha256"],
        "format_version": str(manifest["format_version"]),
        "data_digest": str(detector.info.get("data", {}).get("digest", "")),
    }
    if detector.input.kind == "series":
        tags["window"] = f"{detector.input.window.length}/{detector.input.window.stride}"
        tags["features"] = ",".join(detector.input.features)
    else:
        tags["image_shape"] = "x".join(str(d) for d in detector.input.image_shape)
    evaluation = detector.info.get("evaluation") or {}
    if evaluation.get("auroc") is not None:
        tags["test_auroc"] = f"{evaluation['auroc']:.6f}"
    fpr = (detector.info.get("calibration") or {}).get("fpr_estimate")
    if fpr:
        tags["fpr_estimate"] = json.dumps(fpr)
    return {TAG_PREFIX + k: v for k, v in tags.items()}


def _input_example(
    detector: Detector, data: PreparedData | StreamedData | None
) -> pd.DataFrame | None:
    window = data.first_window("calibration") if data is not None else None
    if window is None:
        return None
    if detector.input.kind == "image":
        return pd.DataFrame({"image": [window.ravel().tolist()]})
    frame = pd.DataFrame(window, columns=list(detector.input.features))
    frame.insert(0, "ts", pd.date_range("2026-01-01", periods=len(frame), freq="s").astype(str))
    frame.insert(0, "key", "example")
    return frame


def log_run_figures(result: TrainResult) -> None:
    """Loss curves, score histogram with the threshold, ROC / PR curves, image reconstructions."""
    detector, data = result.detector, result.data
    mlflow.log_figure(
        plots.loss_curves(result.fit.train_losses, result.fit.val_losses), "figures/loss_curves.png"
    )
    split = "test" if data.has("test") else "calibration"
    scored = data.split_scores(detector, split)
    scores, labels, normal_mask = scored.scores, scored.labels, scored.normal
    anomalous = scores[labels.astype(bool)] if labels is not None else None
    mlflow.log_figure(
        plots.score_histogram(scores[normal_mask], detector.threshold.require(), anomalous),
        "figures/score_histogram.png",
    )
    if labels is not None and labels.any() and not labels.all():
        mlflow.log_figure(plots.roc_pr_curves(labels, scores), "figures/roc_pr.png")
    if detector.input.kind == "image":
        raw = data.raw(split)
        pick = np.argsort(-scores)[:4].tolist() + np.argsort(scores)[:4].tolist()
        scaled = detector.prepare(raw[pick])
        with torch.inference_mode():
            model = detector.model
            recon = model.reconstruct(torch.from_numpy(scaled).to(detector.device)).cpu().numpy()
        maps = detector.score(raw[pick]).pixel_map
        mlflow.log_figure(plots.image_errors(scaled, recon, maps), "figures/image_errors.png")


def register_version(
    detector: Detector,
    artifact_dir: Path,
    name: str,
    *,
    data: PreparedData | StreamedData | None = None,
    alias: str | None = CHALLENGER,
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Log the detector as a pyfunc in the active run and register it; returns the version."""
    from mlflow import MlflowClient

    info = mlflow.pyfunc.log_model(
        name="detector",
        python_model=str(MODEL_CODE),
        artifacts={"detector": str(Path(artifact_dir).resolve())},
        input_example=_input_example(detector, data),
        pip_requirements=[
            f"mlflow=={mlflow.__version__}",
            f"torch=={torch.__version__.split('+')[0]}",
            "numpy",
            "pandas",
            "pyyaml",
            f"aewatch=={__version__}",
        ],
    )
    version = mlflow.register_model(info.model_uri, name)
    client = MlflowClient()
    tags = version_tags(detector, Path(artifact_dir))
    tags.update(extra_tags or {})
    commit = git_commit()
    if commit:
        tags[TAG_PREFIX + "git_commit"] = commit
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    mlflow.set_tags(tags)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    log.info("registered %s version %s%s", name, version.version, f" as @{alias}" if alias else "")
    return str(version.version)

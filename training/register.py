"""What a training run records of its detector: figures, and the registered model version.

A version holds the detector as a pyfunc built from `pipeline/registry/pyfunc.py` ("models from
code") with the artifact folder attached; nothing is pickled (MLflow is reached through
`training.tracking`). Version tags carry what operators
and the worker need without downloading anything: threshold, method, target FPR, window,
features, model kind, the SHA-256 of the weights and the digest of the whole artifact (which
every loader verifies: the worker, the CLI and the pyfunc, which gets it as its model config).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
from pathlib import Path

import pandas as pd

from pipeline.detector import Detector, artifact_digest, read_manifest
from pipeline.modalities import modality_of
from pipeline.registry.client import TAG_PREFIX
from training import plots
from training.data.splits import Splits
from training.job import TrainResult
from training.tracking import log_figure, log_model_version

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
# The pyfunc's code file ("models from code"); found without running it (MLflow does that).
MODEL_CODE = Path(importlib.util.find_spec("pipeline.registry.pyfunc").origin)


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
        "artifact_sha256": artifact_digest(artifact_dir),
        "format_version": str(manifest["format_version"]),
        "data_digest": str(detector.info.get("data", {}).get("digest", "")),
    }
    tags.update(modality_of(detector.input).version_tags())
    evaluation = detector.info.get("evaluation") or {}
    if evaluation.get("auroc") is not None:
        tags["test_auroc"] = f"{evaluation['auroc']:.6f}"
    pca = ((detector.info.get("baseline") or {}).get("evaluation") or {}).get("auroc")
    if pca is not None:
        tags["pca_test_auroc"] = f"{pca:.6f}"
    fpr = (detector.info.get("calibration") or {}).get("fpr_estimate")
    if fpr:
        tags["fpr_estimate"] = json.dumps(fpr)
    check = (detector.info.get("calibration") or {}).get("fpr_check")
    if check:
        tags["fpr_check"] = json.dumps(check)
    return {TAG_PREFIX + k: v for k, v in tags.items()}


def _input_example(detector: Detector, data: Splits | None) -> pd.DataFrame | None:
    window = data.first_sample("calibration") if data is not None else None
    if window is None:
        return None
    return modality_of(detector.input).example_rows(window)


def log_run_figures(result: TrainResult) -> None:
    """Loss curves, score histogram with the threshold, ROC / PR curves, and what the data adds
    (image reconstructions)."""
    detector, data = result.detector, result.data
    log_figure(
        plots.loss_curves(result.fit.train_losses, result.fit.val_losses), "figures/loss_curves.png"
    )
    split = "test" if data.has("test") else "calibration"
    scored = data.split_scores(detector, split)
    scores, labels, normal_mask = scored.scores, scored.labels, scored.normal
    anomalous = scores[labels.astype(bool)] if labels is not None else None
    log_figure(
        plots.score_histogram(scores[normal_mask], detector.threshold.require(), anomalous),
        "figures/score_histogram.png",
    )
    if labels is not None and labels.any() and not labels.all():
        log_figure(plots.roc_pr_curves(labels, scores), "figures/roc_pr.png")
    for name, figure in data.figures(detector, split, scores).items():
        log_figure(figure, f"figures/{name}.png")


def register_version(
    detector: Detector,
    artifact_dir: Path,
    name: str,
    *,
    data: Splits | None = None,
    alias: str | None = CHALLENGER,
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Log the detector as a pyfunc in the active run and register it; returns the version."""
    tags = version_tags(detector, Path(artifact_dir))
    tags.update(extra_tags or {})
    commit = git_commit()
    if commit:
        tags[TAG_PREFIX + "git_commit"] = commit
    return log_model_version(
        name,
        MODEL_CODE,
        Path(artifact_dir),
        input_example=_input_example(detector, data),
        tags=tags,
        alias=alias,
        model_config={"artifact_sha256": tags[TAG_PREFIX + "artifact_sha256"]},
        free_columns=("image",) if detector.input.kind == "image" else ("key", "ts"),
        optional_columns=() if detector.input.kind == "image" else ("key", "ts"),
    )

"""A new threshold for a registered detector, same weights: what `aewatch recalibrate` does.

The detector's data for a detector (`training.data.for_detector`) is cut into calibration data
and a held-out last share; the threshold is calibrated exactly as the training job does
(`training.calibrate.calibrate`), its false-positive rate measured on the held-out normal windows,
and the result registered as a new version (alias challenger) whose weights file is
byte-identical to the old one.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.detector import save_detector
from pipeline.errors import ConfigError
from pipeline.registry.client import TAG_PREFIX, parse_model_uri
from training.calibrate import CalibrationSettings, calibrate, estimate_fpr
from training.data.for_detector import DataSource, load_for
from training.register import register_version
from training.sources import ModelSource
from training.tracking import log_metrics, tracking_run

__all__ = ["RecalibrateSettings", "recalibrate"]


@dataclass(frozen=True)
class RecalibrateSettings:
    model: ModelSource
    data: DataSource
    calibration: CalibrationSettings
    holdout: float = 0.3  # last share of the data kept to measure the FPR
    experiment: str = "aewatch"


def recalibrate(settings: RecalibrateSettings) -> dict:
    """Calibrate, measure, register; returns the summary of the new version."""
    if parse_model_uri(settings.model.uri) is None:
        raise ConfigError("model", "recalibrate registers a version: give models:/NAME@ALIAS")
    detector, ref = settings.model.load()
    data = load_for(detector, settings.data).holdout(settings.holdout)
    detector.threshold = calibrate(detector, data, settings.calibration)
    held = data.split_scores(detector, "test")
    fpr = estimate_fpr(held.scores[held.normal], detector.threshold.value)
    detector.info = {
        **detector.info,
        "calibration": {
            "fpr_estimate": fpr.to_dict(),
            "recalibrated_from": ref.label,
            "data": str(settings.data.path),
        },
    }
    out = Path(tempfile.mkdtemp(prefix="aewatch-recal-")) / "detector"
    save_detector(detector.to("cpu"), out)
    # The weights file must stay byte-identical: the same weights, a new threshold.
    shutil.copyfile(ref.directory / "weights.pt", out / "weights.pt")
    method = settings.calibration.method
    params = {
        "recalibrated_from": ref.label,
        "method": method,
        "target_fpr": str(settings.calibration.target_fpr),
        "data": str(settings.data.path),
    }
    uri = settings.model.tracking_uri
    with tracking_run(uri, settings.experiment, f"recalibrate {ref.label}", params) as run:
        log_metrics(
            {
                "threshold": detector.threshold.value,
                "fpr_estimate": fpr.rate,
                "fpr_ci_low": fpr.ci_low,
                "fpr_ci_high": fpr.ci_high,
            }
        )
        version = register_version(
            detector, out, ref.name, extra_tags={TAG_PREFIX + "recalibrated_from": ref.version}
        )
    return {
        "run_id": run.info.run_id,
        "name": ref.name,
        "version": version,
        "from_version": ref.version,
        "threshold": detector.threshold.value,
        "method": method,
        "fpr_estimate": fpr.to_dict(),
    }

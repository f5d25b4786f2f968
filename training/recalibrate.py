"""A new threshold for a registered detector, same weights: what `aewatch recalibrate` does.

The detector's data for a detector (`training.data.for_detector`) is cut into calibration data
and a held-out last share; the threshold is calibrated exactly as the training job does
(`training.calibrate.calibrate`), its false-positive rate measured on the held-out normal windows,
and the result registered as a new version (alias challenger) whose weights file is
byte-identical to the old one.

With `feedback`, the alarms operators judged move the serving threshold (the rule is written down
in `training.feedback`: up, to remove refuted alarms below every confirmed one; kept without a
removable refuted alarm), and never below the threshold just calibrated for the target
false-positive rate unless `allow_below_calibration` is set, in which case the summary says so.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.detector import save_detector
from pipeline.errors import ConfigError
from pipeline.registry.client import TAG_PREFIX, parse_model_uri
from training.calibrate import CalibrationSettings, calibrate, estimate_fpr
from training.data.for_detector import DataSource, load_for
from training.data.prepared import check_holdout
from training.feedback import FeedbackSource, judged_alarms, threshold_from_feedback
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
    feedback: FeedbackSource | None = None
    allow_below_calibration: bool = False

    def __post_init__(self) -> None:  # before the model or the data is read
        check_holdout(self.holdout)


def _apply_feedback(settings: RecalibrateSettings, detector, name: str, served: float) -> dict:
    """Move the serving threshold by the judged alarms, not below the one just calibrated for
    the target FPR unless allowed; what was done, for the summary."""
    source = dataclasses.replace(settings.feedback, model_name=name)
    judged = judged_alarms(source)
    moved = threshold_from_feedback(judged)
    calibrated = detector.threshold.value
    out = {**moved.to_dict(), "judged": len(judged), "calibrated_threshold": calibrated}
    out["serving_threshold"] = served
    if moved.value is None:
        target, why = served, f"the serving threshold kept: {moved.reason}"
    else:
        target, why = moved.value, f"from {len(judged)} judged alarm(s): {moved.reason}"
    if target < calibrated and not settings.allow_below_calibration:
        value = calibrated
        out["note"] = (
            f"{target:.5g} ({why}) is below the threshold calibrated for the target FPR; "
            f"kept at that bound, {calibrated:.5g} (--allow-below-calibration to go lower)"
        )
    else:
        value = target
        out["note"] = f"threshold {value:.5g}, {why}" + (
            "; BELOW the calibrated FPR bound, as allowed" if value < calibrated else ""
        )
    params = {**detector.threshold.params, "feedback": {"judged": len(judged), "from": served}}
    detector.threshold = dataclasses.replace(
        detector.threshold,
        value=value,
        method=f"{detector.threshold.method}+feedback",
        params=params,
    )
    return out


def recalibrate(settings: RecalibrateSettings) -> dict:
    """Calibrate, measure, register; returns the summary of the new version."""
    if parse_model_uri(settings.model.uri) is None:
        raise ConfigError("model", "recalibrate registers a version: give models:/NAME@ALIAS")
    with tempfile.TemporaryDirectory(prefix="aewatch-recal-") as scratch:
        return _recalibrate(settings, Path(scratch))


def _recalibrate(settings: RecalibrateSettings, scratch: Path) -> dict:
    """`recalibrate`, with the served version's files and the new one's in `scratch`."""
    detector, ref = settings.model.load(download_dir=scratch / "served")
    data = load_for(detector, settings.data).holdout(settings.holdout)
    served = detector.threshold.value
    detector.threshold = calibrate(detector, data, settings.calibration)
    feedback = None
    if settings.feedback is not None:
        feedback = _apply_feedback(settings, detector, ref.name, served)
    held = data.split_scores(detector, "test")
    fpr = estimate_fpr(held.scores[held.normal], detector.threshold.value)
    detector.info = {
        **detector.info,
        "calibration": {
            "fpr_estimate": fpr.to_dict(),
            "recalibrated_from": ref.label,
            "data": str(settings.data.path),
            **({"feedback": feedback} if feedback else {}),
        },
    }
    out = scratch / "detector"
    save_detector(detector.to("cpu"), out)
    # The weights file must stay byte-identical: the same weights, a new threshold.
    shutil.copyfile(ref.directory / "weights.pt", out / "weights.pt")
    method = detector.threshold.method  # with --feedback: the calibration method +feedback
    params = {
        "recalibrated_from": ref.label,
        "method": method,
        "target_fpr": str(settings.calibration.target_fpr),
        "data": str(settings.data.path),
        **({"feedback": settings.feedback.feedback} if settings.feedback else {}),
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
        **({"feedback": feedback} if feedback else {}),
    }

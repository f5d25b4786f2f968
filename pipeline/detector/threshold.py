"""The decision threshold stored with a detector, with an explicit "not calibrated" state.

A calibrated threshold keeps a sorted sample of the calibration scores so that every new score gets
a conformal p-value, p = (1 + #{calibration >= s}) / (n + 1): the chance that a normal window scores
at least this high. Higher score = more anomalous, throughout aewatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import ModelError

__all__ = ["Threshold", "anomalous"]


def anomalous(scores, threshold: float) -> np.ndarray:
    """The decision everywhere a score meets a threshold (`score`, the worker, `evaluate`,
    `promote`): strictly above it, and a score that is not finite (an input the model could not
    hold) is never taken for normal."""
    return ~(np.asarray(scores) <= threshold)


@dataclass(frozen=True)
class Threshold:
    value: float | None = None
    method: str | None = None
    params: dict = field(default_factory=dict)
    n: int = 0
    data_digest: str | None = None
    calibration_scores: tuple[float, ...] = ()

    @property
    def calibrated(self) -> bool:
        return self.value is not None

    @classmethod
    def uncalibrated(cls) -> Threshold:
        return cls()

    def require(self) -> float:
        if self.value is None:
            raise ModelError("the detector is not calibrated: it has no threshold yet")
        return self.value

    def p_values(self, scores: np.ndarray) -> np.ndarray:
        """Conformal p-values of `scores` against the stored calibration scores."""
        if not self.calibration_scores:
            raise ModelError("the detector holds no calibration scores to give p-values")
        cal = np.asarray(self.calibration_scores, dtype=np.float64)
        at_least = len(cal) - np.searchsorted(cal, np.asarray(scores, dtype=np.float64), "left")
        return (1.0 + at_least) / (len(cal) + 1.0)

    def to_dict(self) -> dict:
        return {
            "calibrated": self.calibrated,
            "value": self.value,
            "method": self.method,
            "params": dict(self.params),
            "n": self.n,
            "data_digest": self.data_digest,
            "calibration_scores": list(self.calibration_scores),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Threshold:
        value = data.get("value")
        if bool(data.get("calibrated")) != (value is not None):
            raise ModelError("threshold: 'calibrated' disagrees with 'value'")
        if value is not None and not math.isfinite(float(value)):
            raise ModelError(f"threshold: the value must be a finite number, not {value!r}")
        scores = tuple(float(s) for s in data.get("calibration_scores", ()))
        if not all(map(math.isfinite, scores)):
            raise ModelError("threshold: calibration scores must be finite")
        if any(b < a for a, b in zip(scores, scores[1:], strict=False)):
            raise ModelError("threshold: calibration scores must be sorted")
        return cls(
            value=None if value is None else float(value),
            method=data.get("method"),
            params=dict(data.get("params") or {}),
            n=int(data.get("n", 0)),
            data_digest=data.get("data_digest"),
            calibration_scores=scores,
        )

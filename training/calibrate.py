"""Threshold calibration on held-out normal data: how anomalous is too anomalous.

Each calibrator is an accumulator: `update(scores[, labels])` as often as needed, then `compute()`
returns a calibrated `Threshold` that keeps a sorted sample of the calibration scores for conformal
p-values. Too little data for a method is an error, never a silent fallback (the quantile's
tail fallback is logged, and recorded with the threshold). Given a split's scores
with its labels (`update_split`), a calibrator takes what its method needs: the scores of normal
windows only, or (`f1`) every window with its label. `calibrate` is the training job's and
`aewatch recalibrate`'s one way to a threshold.

- `quantile`: the conformal (1 - target_fpr) quantile: the ceil((n + 1)(1 - a))-th smallest score,
  which bounds the false-positive rate of a new normal window by a (needs n >= 1/a - 1). With
  fewer (but at least `MIN_WINDOWS`) windows, the (1 - a) quantile of an exponential tail fitted
  to the upper half of the log scores, never below the largest score, with a logged warning that
  gives the tail model's estimated false-positive rate (`params["rule"] == "tail"`).
- `pot`: peaks over threshold. A generalised Pareto distribution is fitted (scipy) to the excesses
  above an initial quantile; the threshold is where its tail probability equals target_fpr, which
  reaches risk levels far below 1/n.
- `mad`: median + k * 1.4826 * MAD, a robust rule for roughly symmetric score distributions.
- `f1`: the threshold that maximises F1 on labelled calibration data; refused without anomalies.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

import numpy as np

from pipeline.detector import Threshold
from pipeline.errors import CalibrationError, ConfigError

__all__ = [
    "CALIBRATION_METHODS",
    "CalibrationSettings",
    "FprEstimate",
    "MAX_STORED_SCORES",
    "MIN_WINDOWS",
    "calibrate",
    "estimate_fpr",
    "make_calibrator",
]

CALIBRATION_METHODS = ("quantile", "pot", "mad", "f1")
MAX_STORED_SCORES = 20_000
MIN_WINDOWS = 8  # fewest calibration windows the quantile's tail fallback takes
_TINY = 1e-12
log = logging.getLogger(__name__)

_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class CalibrationSettings:
    method: str = "quantile"
    target_fpr: float = 0.01
    mad_k: float = 3.0
    pot_initial_quantile: float = 0.95
    margin: float = 1.0

    def __post_init__(self) -> None:  # every value checked before data is read or a model fit
        make_calibrator(
            self.method,
            target_fpr=self.target_fpr,
            mad_k=self.mad_k,
            pot_initial_quantile=self.pot_initial_quantile,
            margin=self.margin,
        )


def _digest(scores: np.ndarray) -> str:
    return hashlib.sha256(np.sort(scores).astype(np.float64).tobytes()).hexdigest()


def _stored(scores: np.ndarray) -> tuple[float, ...]:
    """The calibration scores kept in the manifest: all of them up to MAX_STORED_SCORES, else
    evenly spaced order statistics (p-values then approximate the exact ones to 1/MAX)."""
    ordered = np.sort(scores)
    if len(ordered) > MAX_STORED_SCORES:
        ordered = np.quantile(ordered, np.linspace(0, 1, MAX_STORED_SCORES))
    return tuple(float(s) for s in ordered)


class _Calibrator:
    method = ""

    def __init__(self) -> None:
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def update(self, scores: np.ndarray, labels: np.ndarray | None = None) -> None:
        scores = np.asarray(scores, dtype=np.float64).ravel()
        if not np.isfinite(scores).all():
            raise CalibrationError("calibration scores hold NaN or infinite values")
        self._scores.append(scores)
        if labels is not None:
            self._labels.append(np.asarray(labels, dtype=bool).ravel())

    def update_split(self, scored) -> None:
        """A split's `SplitScores`: the scores of its normal windows (those holding no labelled
        anomaly) are what a false-positive target is calibrated on."""
        self.update(scored.scores[scored.normal])

    @property
    def scores(self) -> np.ndarray:
        return np.concatenate(self._scores) if self._scores else np.zeros(0)

    margin = 1.0

    def compute(self) -> Threshold:
        scores = self.scores
        normal = scores[~self.labels] if self._labels else scores
        if len(normal) > 1 and normal.min() == normal.max():
            raise CalibrationError(
                f"all {len(normal)} normal calibration windows score the same "
                f"({normal[0]:.6g}): the data does not vary (a constant series or a stuck "
                "sensor?), so no threshold can be told from it; give data with normal variation"
            )
        value, params = self._threshold(scores)
        if self.margin != 1.0:
            # a safety factor on top of the method's threshold, recorded with it
            value, params = value * self.margin, {**params, "margin": self.margin}
        if not float(value) <= _FLOAT32_MAX:  # (NaN too) no window score reaches it
            target = params.get("target_fpr")
            what = f"a target FPR of {target:.3g}" if target is not None else "this rule"
            raise CalibrationError(
                f"the {self.method} threshold came out as {float(value):.4g}, beyond any window "
                f"score (float32): {len(scores)} calibration windows cannot support {what}; give "
                "more normal data or a larger target",
                more_data=True,
            )
        return Threshold(
            value=float(value),
            method=self.method,
            params=params,
            n=int(len(normal)),
            data_digest=_digest(scores),
            calibration_scores=_stored(normal),
        )

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate(self._labels) if self._labels else np.zeros(0, dtype=bool)

    def _threshold(self, scores: np.ndarray) -> tuple[float, dict]:
        raise NotImplementedError


class QuantileCalibrator(_Calibrator):
    """The conformal quantile; on a short history (fewer windows than it needs, at least
    `MIN_WINDOWS`) an exponential tail fitted to the upper half of the log scores (a Pareto
    tail of the scores), never below their maximum, with a logged warning."""

    method = "quantile"

    def __init__(self, target_fpr: float) -> None:
        super().__init__()
        self.target_fpr = target_fpr

    def _threshold(self, scores: np.ndarray) -> tuple[float, dict]:
        n, alpha = len(scores), self.target_fpr
        rank = math.ceil((n + 1) * (1 - alpha))
        need = math.ceil(min(1 / alpha, 1e18)) - 1  # (1 / 1e-320 is infinite)
        if rank <= n:
            return float(np.sort(scores)[rank - 1]), {"target_fpr": alpha}
        if n < MIN_WINDOWS:
            raise CalibrationError(
                f"the calibration split has {n} windows; at least {MIN_WINDOWS} are needed even "
                f"for the tail fallback (a quantile at target FPR {alpha:g} needs {need})",
                more_data=True,
            )
        median, scale = _exponential_tail(scores)
        try:
            tail = math.exp(median + scale * math.log(0.5 / alpha))
        except OverflowError:  # (a target far below what the windows can say)
            tail = math.inf
        value = max(tail, float(scores.max()))
        estimate = _tail_fpr(median, scale, scores, value * self.margin)
        log.warning(
            "calibration: %d windows, fewer than the %d a quantile at target FPR %g needs; the "
            "threshold %.4g comes from an exponential tail of the log scores (x margin %g): "
            "estimated false-positive rate %.2g (tail model, assuming these windows cover "
            "normal operation; at most %.2g for the calibration maximum alone). More normal "
            "data, or `aewatch recalibrate` later, gives the quantile.",
            n,
            need,
            alpha,
            value * self.margin,
            self.margin,
            estimate,
            1.0 / (n + 1),
        )
        return value, {
            "target_fpr": alpha,
            "rule": "tail",
            "needed_for_quantile": need,
            "tail_log_median": median,
            "tail_log_scale": scale,
            "estimated_fpr": estimate,
            "fpr_bound_at_max": 1.0 / (n + 1),
        }


def _exponential_tail(scores: np.ndarray) -> tuple[float, float]:
    """(median of log s, mean excess of log s over it): an exponential tail of log scores."""
    logs = np.log(np.maximum(scores, _TINY))
    median = float(np.median(logs))
    above = logs[logs > median] - median
    return median, max(float(above.mean()) if len(above) else 0.0, 1e-6)


def _tail_fpr(median: float, scale: float, scores: np.ndarray, threshold: float) -> float:
    """P(score > threshold) under that tail (the empirical rate below the median)."""
    z = math.log(max(threshold, _TINY)) - median
    return 0.5 * math.exp(-z / scale) if z > 0 else float(np.mean(scores > threshold))


class PotCalibrator(_Calibrator):
    method = "pot"
    MIN_EXCESSES = 10

    def __init__(self, target_fpr: float, initial_quantile: float = 0.95) -> None:
        super().__init__()
        if not 0.5 <= initial_quantile < 1:
            raise ConfigError(
                "pot_initial_quantile", f"must be in [0.5, 1), got {initial_quantile}"
            )
        self.target_fpr, self.initial_quantile = target_fpr, initial_quantile

    def _threshold(self, scores: np.ndarray) -> tuple[float, dict]:
        n = len(scores)
        t0 = float(np.quantile(scores, self.initial_quantile))
        excesses = scores[scores > t0] - t0
        if len(excesses) < self.MIN_EXCESSES:
            need = math.ceil(self.MIN_EXCESSES / (1 - self.initial_quantile))
            raise CalibrationError(
                f"pot needs at least {self.MIN_EXCESSES} scores above its initial quantile "
                f"(about {need} calibration windows), got {len(excesses)} of {n}",
                more_data=True,
            )
        from scipy import stats

        shape, _, scale = stats.genpareto.fit(excesses, floc=0.0)
        ratio = self.target_fpr * n / len(excesses)
        if abs(shape) < 1e-6:
            value = t0 - scale * math.log(ratio)
        else:
            value = t0 + scale / shape * (ratio ** (-shape) - 1.0)
        params = {
            "target_fpr": self.target_fpr,
            "initial_quantile": self.initial_quantile,
            "initial_threshold": t0,
            "gpd_shape": float(shape),
            "gpd_scale": float(scale),
            "excesses": int(len(excesses)),
        }
        return max(float(value), t0), params


class MadCalibrator(_Calibrator):
    method = "mad"
    MIN_SCORES = 10

    def __init__(self, k: float = 3.0) -> None:
        super().__init__()
        if k <= 0:
            raise ConfigError("mad_k", f"must be > 0, got {k}")
        self.k = k

    def _threshold(self, scores: np.ndarray) -> tuple[float, dict]:
        if len(scores) < self.MIN_SCORES:
            raise CalibrationError(
                f"mad needs at least {self.MIN_SCORES} calibration windows, got {len(scores)}",
                more_data=True,
            )
        median = float(np.median(scores))
        mad = float(np.median(np.abs(scores - median))) * 1.4826
        return median + self.k * mad, {"k": self.k, "median": median, "mad": mad}


class F1Calibrator(_Calibrator):
    method = "f1"

    def update_split(self, scored) -> None:
        """Every window, with its label (all normal when the split has none)."""
        labels = scored.labels
        self.update(scored.scores, labels if labels is not None else np.zeros(len(scored.scores)))

    def _threshold(self, scores: np.ndarray) -> tuple[float, dict]:
        from sklearn.metrics import precision_recall_curve

        labels = self.labels
        if len(labels) != len(scores):
            raise CalibrationError("f1 calibration needs a label for every calibration window")
        if not labels.any():
            raise CalibrationError(
                "f1 calibration needs labelled anomalies in the calibration data and found none; "
                "use quantile, pot or mad on normal data instead"
            )
        if labels.all():
            raise CalibrationError(
                "f1 calibration needs normal windows too; all are anomalous", more_data=True
            )
        precision, recall, thresholds = precision_recall_curve(labels, scores)
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        best = int(np.argmax(f1[:-1]))
        # precision_recall_curve flags score >= t; aewatch flags score > threshold.
        below = scores[scores < thresholds[best]]
        value = float(below.max()) if len(below) else float(thresholds[best]) - 1e-12
        return value, {
            "f1": float(f1[best]),
            "precision": float(precision[best]),
            "recall": float(recall[best]),
        }


def make_calibrator(
    method: str,
    *,
    target_fpr: float = 0.01,
    mad_k: float = 3.0,
    pot_initial_quantile: float = 0.95,
    margin: float = 1.0,
) -> _Calibrator:
    """A calibrator for `method`; `margin` multiplies the threshold it computes (1: none)."""
    if not 0 < target_fpr < 1:
        raise ConfigError("target_fpr", f"must be in (0, 1), got {target_fpr}")
    if margin <= 0:
        raise ConfigError("threshold_margin", f"must be > 0, got {margin}")
    calibrator = _make(method, target_fpr, mad_k, pot_initial_quantile)
    calibrator.margin = margin
    return calibrator


def _make(method: str, target_fpr: float, mad_k: float, pot_initial_quantile: float):
    if method == "quantile":
        return QuantileCalibrator(target_fpr)
    if method == "pot":
        return PotCalibrator(target_fpr, pot_initial_quantile)
    if method == "mad":
        return MadCalibrator(mad_k)
    if method == "f1":
        return F1Calibrator()
    raise ConfigError("calibration", f"unknown method {method!r}; use one of {CALIBRATION_METHODS}")


def calibrate(detector, data, settings: CalibrationSettings) -> Threshold:
    """A threshold from the calibration split of `data` (any `Splits`)."""
    if not data.has("calibration"):
        raise CalibrationError(
            "the calibration split is empty: give it a share in --fractions or more data",
            more_data=True,
        )
    calibrator = make_calibrator(
        settings.method,
        target_fpr=settings.target_fpr,
        mad_k=settings.mad_k,
        pot_initial_quantile=settings.pot_initial_quantile,
        margin=settings.margin,
    )
    calibrator.update_split(data.split_scores(detector, "calibration"))
    return calibrator.compute()


@dataclass(frozen=True)
class FprEstimate:
    """False-positive rate measured on normal windows the threshold never saw."""

    false_positives: int
    n: int
    rate: float
    ci_low: float
    ci_high: float
    confidence: float = 0.95

    def to_dict(self) -> dict:
        return {
            "false_positives": self.false_positives,
            "n": self.n,
            "rate": self.rate,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "confidence": self.confidence,
        }


def estimate_fpr(scores: np.ndarray, threshold: float, confidence: float = 0.95) -> FprEstimate:
    """Observed FPR with an exact (Clopper-Pearson) binomial confidence interval."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        raise CalibrationError("no normal windows to estimate the false-positive rate on")
    from scipy import stats

    k = int((scores > threshold).sum())
    ci = stats.binomtest(k, len(scores)).proportion_ci(confidence_level=confidence, method="exact")
    return FprEstimate(k, len(scores), k / len(scores), float(ci.low), float(ci.high), confidence)

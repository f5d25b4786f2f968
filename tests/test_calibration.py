"""Calibration: known distributions, small samples, conformal p-values, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from pipeline.errors import CalibrationError, ConfigError
from training.calibrate import estimate_fpr, make_calibrator


def _calibrate(method: str, scores: np.ndarray, labels=None, **kwargs):
    calibrator = make_calibrator(method, **kwargs)
    calibrator.update(scores, labels)
    return calibrator.compute()


@pytest.mark.parametrize("distribution", ["exponential", "lognormal", "gamma"])
@pytest.mark.parametrize("method", ["quantile", "pot"])
def test_threshold_hits_target_fpr_within_its_confidence_interval(distribution, method):
    rng = np.random.default_rng(1)
    draw = {
        "exponential": lambda n: rng.exponential(size=n),
        "lognormal": lambda n: rng.lognormal(sigma=0.7, size=n),
        "gamma": lambda n: rng.gamma(2.0, size=n),
    }[distribution]
    threshold = _calibrate(method, draw(5000), target_fpr=0.01)
    estimate = estimate_fpr(draw(20000), threshold.value)
    assert estimate.ci_low <= 0.01 * 1.3 and estimate.ci_high >= 0.01 * 0.7, estimate
    assert threshold.n == 5000 and threshold.method == method


def test_pot_estimates_the_tail_better_than_the_quantile_when_n_is_small():
    rng = np.random.default_rng(0)
    target = 0.01
    true = -np.log(target)  # the exact (1 - target) quantile of Exp(1)
    errors = {"quantile": [], "pot": []}
    for _ in range(200):
        sample = rng.exponential(size=200)
        for method in errors:
            value = _calibrate(method, sample, target_fpr=target, pot_initial_quantile=0.9).value
            errors[method].append((value - true) ** 2)
    assert np.mean(errors["pot"]) < 0.7 * np.mean(errors["quantile"]), {
        k: float(np.sqrt(np.mean(v))) for k, v in errors.items()
    }


def test_pot_reaches_risk_levels_below_one_over_n():
    sample = np.random.default_rng(3).exponential(size=300)
    assert _calibrate("quantile", sample, target_fpr=0.001).params["rule"] == "tail"
    rng = np.random.default_rng(4)
    true_fprs = [
        np.exp(
            -_calibrate(
                "pot", rng.exponential(size=300), target_fpr=0.001, pot_initial_quantile=0.9
            ).value
        )
        for _ in range(100)
    ]
    geometric_mean = float(np.exp(np.mean(np.log(true_fprs))))
    assert 0.0005 < geometric_mean < 0.002, geometric_mean


def test_p_values_are_uniform_on_normal_data():
    rng = np.random.default_rng(5)
    threshold = _calibrate("quantile", rng.gamma(2.0, size=4000), target_fpr=0.01)
    p = threshold.p_values(rng.gamma(2.0, size=4000))
    assert stats.kstest(p, "uniform").pvalue > 0.01
    assert p.min() >= 1 / (threshold.n + 1) and p.max() <= 1.0


def test_mad_threshold():
    scores = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 100.0])
    threshold = _calibrate("mad", scores, mad_k=2.0)
    assert threshold.value == pytest.approx(5.5 + 2.0 * 2.5 * 1.4826)


def test_f1_refuses_calibration_data_without_anomalies():
    scores = np.random.default_rng(0).normal(size=200)
    with pytest.raises(CalibrationError, match="found none"):
        _calibrate("f1", scores, np.zeros(200, dtype=bool))


def test_f1_separates_labelled_calibration_data():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0, 1, 500), rng.normal(8, 1, 50)])
    labels = np.concatenate([np.zeros(500, bool), np.ones(50, bool)])
    threshold = _calibrate("f1", scores, labels)
    flagged = scores > threshold.value
    assert (flagged == labels).mean() > 0.99
    assert threshold.n == 500, "only normal scores feed the p-values"


@pytest.mark.parametrize("method,n", [("quantile", 7), ("pot", 100), ("mad", 5)])
def test_too_few_calibration_windows_is_an_error(method, n):
    with pytest.raises(CalibrationError, match="needs at least|are needed"):
        _calibrate(method, np.random.default_rng(0).exponential(size=n), target_fpr=0.01)


def test_bad_settings_name_themselves():
    with pytest.raises(ConfigError, match="target_fpr"):
        make_calibrator("quantile", target_fpr=1.5)
    with pytest.raises(ConfigError, match="calibration"):
        make_calibrator("magic")


@pytest.mark.parametrize("method", ["quantile", "pot"])
@pytest.mark.parametrize("target_fpr", [1e-300, 1e-30])
def test_a_target_the_windows_cannot_support_is_refused_not_a_threshold_no_score_reaches(
    method, target_fpr
):
    # 150 windows of lognormal scores: the tail extrapolated to 1e-300 gave a threshold of 1e85
    scores = np.random.default_rng(0).lognormal(sigma=1.5, size=150)
    try:
        threshold = _calibrate(method, scores, target_fpr=target_fpr)
    except CalibrationError as exc:
        assert "cannot support" in str(exc) or "needs" in str(exc)
    else:  # what a method does give is a threshold a float32 score can pass
        assert np.isfinite(threshold.value) and threshold.value <= np.finfo(np.float32).max


def test_a_target_below_the_smallest_normal_float_is_refused_in_one_line():
    scores = np.random.default_rng(0).lognormal(sigma=1.5, size=150)
    with pytest.raises(CalibrationError, match=r"target FPR of 1e-320") as refused:
        _calibrate("quantile", scores, target_fpr=1e-320)  # (1 / 1e-320 overflowed to a crash)
    assert len(str(refused.value)) < 300


@pytest.mark.parametrize("method", ["quantile", "pot", "mad", "f1"])
def test_calibration_windows_that_all_score_the_same_are_refused(method):
    """A flat-lined recording scored every window alike: the quantile and MAD rules took that
    one score as the threshold, which a stuck sensor's data would then never reach again."""
    scores = np.full(2000, 40.405)
    labels = None
    if method == "f1":
        scores = np.concatenate([scores, [90.0, 95.0]])
        labels = np.r_[np.zeros(2000, bool), True, True]
    with pytest.raises(CalibrationError, match="score the same") as refused:
        _calibrate(method, scores, labels, target_fpr=0.01)
    assert "2000 normal calibration windows" in str(refused.value)

"""Calibration on short histories: a tail fallback with a warning, refusals that name flags
and values that work, and a split that lets a short series train with default flags."""

from __future__ import annotations

import logging
import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import CalibrationError
from pipeline.tools.synthetic import normal_series
from training.calibrate import MIN_WINDOWS, make_calibrator


def _quantile(scores, target_fpr=0.01):
    calibrator = make_calibrator("quantile", target_fpr=target_fpr)
    calibrator.update(scores)
    return calibrator.compute()


def test_fewer_windows_than_the_quantile_needs_give_a_tail_threshold_and_a_warning(caplog):
    rng = np.random.default_rng(2)
    realised = []
    with caplog.at_level(logging.WARNING, logger="training.calibrate"):
        for _ in range(50):
            sample = rng.lognormal(sigma=0.5, size=40)
            threshold = _quantile(sample)
            assert threshold.params["rule"] == "tail"
            assert threshold.value >= sample.max()
            realised.append(np.mean(rng.lognormal(sigma=0.5, size=20_000) > threshold.value))
    assert "estimated false-positive rate" in caplog.text
    assert "fewer than the 99" in caplog.text
    # the tail reaches beyond the maximum: the largest of 40 alone would let ~2.4 % through
    assert np.mean(realised) < 0.015, np.mean(realised)
    assert 0 < threshold.params["estimated_fpr"] < 0.05


def test_below_the_least_the_tail_takes_the_quantile_refuses():
    _quantile(np.arange(1.0, MIN_WINDOWS + 1))
    with pytest.raises(CalibrationError, match=f"at least {MIN_WINDOWS} are needed"):
        _quantile(np.arange(1.0, MIN_WINDOWS))


def _series_csv(path: Path, rows: int, seed: int = 4) -> Path:
    values = normal_series(1243, 5, seed=seed)[:rows]  # the first 15 % of a 1,243-row series
    frame = pd.DataFrame(values, columns=[f"s{i}" for i in range(values.shape[1])])
    frame.insert(0, "ts", pd.date_range("2026-01-01", periods=rows, freq="s"))
    frame.to_csv(path, index=False)
    return path


def _train(args: list[str]):
    from training.cli.train import build_train_parser, settings_from_args
    from training.job import train

    parsed = build_train_parser().parse_args(args)
    return train(settings_from_args(parsed))


def _common(data: Path, out: Path) -> list[str]:
    return ["--data", str(data), "--time-col", "ts", "--out", str(out), "--epochs", "3"]


def test_186_rows_train_and_calibrate_without_a_flag(tmp_path, caplog):
    data = _series_csv(tmp_path / "short.csv", 186)
    with caplog.at_level(logging.WARNING):
        result = _train([*_common(data, tmp_path / "det"), "--device", "cpu"])
    assert result.detector.input.window.length == 16
    assert result.detector.threshold.params["rule"] == "tail"
    assert result.data.window_counts()["calibration"] >= MIN_WINDOWS
    assert "short for the default split" in caplog.text
    assert result.summary()["calibration"] == (
        "quantile, exponential tail: too few windows for the quantile"
    )


@pytest.mark.parametrize("rows", [186, 60])
def test_a_refusal_names_flags_and_values_that_work(tmp_path, rows):
    data = _series_csv(tmp_path / "short.csv", rows)
    given = ["--window", "32", "--fractions", "0.6,0.15,0.15,0.1", "--device", "cpu"]
    with pytest.raises(CalibrationError) as refused:
        _train([*_common(data, tmp_path / "det"), *given])
    message = str(refused.value)
    hints = re.search(r"for these data (.*) would work", message)
    assert hints, message
    for hint in hints.group(1).split(" or "):
        flags = shlex.split(hint)
        if "--window" not in flags:
            flags += ["--window", "32"]
        if "--fractions" not in flags:
            flags += ["--fractions", "0.6,0.15,0.15,0.1"]
        result = _train([*_common(data, tmp_path / "fixed"), *flags, "--device", "cpu"])
        assert result.detector.threshold.calibrated, hint


def test_too_few_rows_for_any_flag_say_how_many_are_needed(tmp_path):
    data = _series_csv(tmp_path / "tiny.csv", 30)
    with pytest.raises(Exception, match="rows per key are too few: about 60 are needed"):
        _train([*_common(data, tmp_path / "det"), "--window", "8", "--device", "cpu"])


def test_the_run_records_what_was_trained_beside_what_was_asked(tmp_path, mlflow_embedded):
    from mlflow import MlflowClient

    from training.cli.train import build_train_parser, settings_from_args
    from training.runner import RunOptions, run_training

    data = _series_csv(tmp_path / "short.csv", 186)
    args = [*_common(data, tmp_path / "det"), "--device", "cpu", "--kind", "pca"]
    settings = settings_from_args(build_train_parser().parse_args(args))
    summary = run_training(settings, RunOptions(mlflow_embedded, progress=False))
    params = MlflowClient(mlflow_embedded).get_run(summary["run_id"]).data.params
    assert params["window"] == "32" and params["trained.window"] == "16"  # adapted to 186 rows
    assert params["scaler"] == "auto" and params["trained.scaler"] == "standard"
    assert params["trained.model.kind"] == "pca" and "trained.model.hidden" not in params
    assert params["trained.model.input_shape"] == "(16, 5)"  # 5 features
    assert int(params["trained.windows.calibration"]) >= MIN_WINDOWS

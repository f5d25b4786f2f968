"""Values a float32 model cannot hold (NaN, infinity, beyond float32) are reported, never scored
as normal: batch scoring and training refuse them naming the column and row (the worker
dead-letters the same reading as `non_finite`, see `test_fuzz.py`'s `huge` records), the pyfunc's
rows are refused likewise, and a score that is not finite is decided anomalous."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.batch import score_readings
from pipeline.detector import Scaler
from pipeline.errors import DataError
from tests.helpers import labelled_series_csv, train_series_detector
from training.data.for_detector import DataSource
from training.data.series import load_series
from training.scoring import ScoreSettings, score_file
from training.sources import ModelSource


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    data = labelled_series_csv(root / "series.csv")
    return train_series_detector(data, root / "det"), data


def _with_value(data, tmp_path, value: float, row: int = 100):
    frame = pd.read_csv(data)
    frame.loc[row, "s2"] = value
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("value", [1e300, -1e39, float("inf")])
def test_batch_scoring_refuses_an_out_of_range_reading_naming_column_and_row(
    trained, tmp_path, value
):
    result, data = trained
    path = _with_value(data, tmp_path, value)
    source = DataSource(str(path), time_col="ts", key_col="machine", label_col="label")
    settings = ScoreSettings(ModelSource(str(result.artifact_dir)), source, str(tmp_path / "o.csv"))
    with pytest.raises(DataError, match=r"column 's2'.*data row 101"):
        score_file(settings)
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.parametrize("value", [1e300, float("nan")])
def test_training_on_an_out_of_range_value_names_the_column_and_row(trained, tmp_path, value):
    _, data = trained
    path = _with_value(data, tmp_path, value, row=41)
    with pytest.raises(DataError, match=r"column 's2'.*data row 42"):
        load_series(path, time_col="ts", key_col="machine", label_col="label")


def test_the_scaler_names_where_a_non_finite_value_is():
    samples = np.zeros((10, 3))
    samples[7, 2] = np.inf
    with pytest.raises(DataError, match=r"feature 2.*sample 7"):
        Scaler.fit("standard", samples)


def test_pyfunc_rows_with_an_out_of_range_value_are_refused(trained):
    result, data = trained
    rows = pd.read_csv(data).head(40).rename(columns={"machine": "key"})
    rows.loc[20, "s1"] = 1e300
    with pytest.raises(DataError, match=r"row 20.*'s1'"):
        score_readings(result.detector, rows)


def test_a_score_that_is_not_finite_is_never_normal(trained):
    detector = trained[0].detector
    scores = np.array([0.0, np.nan, np.inf, detector.threshold.value * 2])
    assert detector.is_anomaly(scores).tolist() == [False, True, True, True]
    p = detector.threshold.p_values(scores)
    assert p[1] == p.min() and p[2] == p.min()

"""Data a careless export produces: every case is a clear error or a logged decision, never a
silently different series."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from pipeline.detector.windows import WindowSpec, cut_windows
from pipeline.errors import DataError
from training.data.series import load_series, series_groups


def _frame(rows: int = 40, keys=("a", "b")) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    parts = []
    for key in keys:
        parts.append(
            pd.DataFrame(
                {
                    "ts": pd.date_range("2026-01-01", periods=rows, freq="s").astype(str),
                    "machine": key,
                    "s0": rng.normal(size=rows),
                    "s1": rng.normal(size=rows),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def _load(frame: pd.DataFrame, tmp_path, **kwargs):
    path = tmp_path / "data.csv"
    frame.to_csv(path, index=False)
    return load_series(path, time_col="ts", key_col="machine", **kwargs)


def test_a_numeric_column_with_a_text_cell_is_an_error_not_a_dropped_sensor(tmp_path):
    frame = _frame()
    frame["s1"] = frame["s1"].astype(object)
    frame.loc[17, "s1"] = "n/a "
    with pytest.raises(DataError, match=r"column 's1' holds numbers, but data row 18 holds"):
        _load(frame, tmp_path)


def test_text_and_label_like_columns_are_left_out_with_a_warning(tmp_path, caplog):
    frame = _frame()
    frame["status"] = "running"
    frame["label"] = 0
    with caplog.at_level(logging.WARNING, logger="training.data.columns"):
        table = _load(frame, tmp_path)
    assert table.features == ("s0", "s1")
    assert "'label' look like labels" in caplog.text
    assert "not numeric and are not features: 'status'" in caplog.text
    named = _load(frame, tmp_path, label_col="label")
    assert named.features == ("s0", "s1") and named.label_col == "label"


def test_epoch_seconds_are_refused_not_read_as_1970(tmp_path):
    frame = _frame()
    seconds = (pd.to_datetime(frame["ts"]) - pd.Timestamp(0)) // pd.Timedelta(seconds=1)
    frame["ts"] = seconds.astype(np.int64)
    with pytest.raises(DataError, match=r"epoch seconds\? multiply them by 1000"):
        _load(frame, tmp_path)
    frame["ts"] = frame["ts"] * 1000  # epoch milliseconds, as the worker reads `ts`
    assert str(_load(frame, tmp_path).frame["ts"].iloc[0]).startswith("2026-01-01")


def test_repeated_timestamps_are_dropped_as_the_worker_drops_them(tmp_path, caplog):
    frame = _frame()
    repeats = frame.iloc[[5, 6, 50]].copy()
    repeats[["s0", "s1"]] = 99.0  # a later reading of the same timestamp: the worker refuses it
    doubled = pd.concat([frame, repeats], ignore_index=True)
    with caplog.at_level(logging.WARNING, logger="training.data.series"):
        table = _load(doubled, tmp_path)
    assert "3 row(s) repeat their key's timestamp" in caplog.text
    clean = _load(frame, tmp_path)
    assert table.frame.equals(clean.frame)
    spec = WindowSpec(8, 2)
    assert np.array_equal(
        cut_windows(series_groups(table), spec).windows,
        cut_windows(series_groups(clean), spec).windows,
    )


def test_a_key_shorter_than_a_window_is_named_in_a_warning(tmp_path, caplog):
    frame = pd.concat([_frame(keys=("a", "b")), _frame(rows=5, keys=("tiny",))], ignore_index=True)
    table = _load(frame, tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.detector.windows"):
        windows = cut_windows(series_groups(table), WindowSpec(8, 2))
    assert set(windows.keys) == {"a", "b"}
    assert "1 key(s) have fewer readings than one window of 8" in caplog.text
    assert "'tiny' (5)" in caplog.text

"""`aewatch score` and `aewatch evaluate` on a detector folder."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.cli import main
from tests.helpers import labelled_series_csv, train_series_detector


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = labelled_series_csv(root / "series.csv")
    # The mean error: the file's level shift moves every sensor a little, which the mean error
    # flags throughout; the terms score's largest feature flags about three quarters of it.
    return data, train_series_detector(data, root / "det", score="raw")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_score_writes_one_row_per_window(trained, tmp_path: Path, capsys, suffix):
    data, result = trained
    out = tmp_path / f"scores{suffix}"
    assert (
        main(
            [
                "score",
                "--model",
                str(result.artifact_dir),
                "--data",
                str(data),
                "--key-col",
                "machine",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    frame = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert list(frame.columns) == [
        "key",
        "window_start",
        "window_end",
        "score",
        "threshold",
        "p_value",
        "is_anomaly",
        "top_features",
        "event_id",
    ]
    assert len(frame) == summary["rows"] == 2 * ((3000 - 8) // 2 + 1)
    assert summary["anomalies"] == int(frame["is_anomaly"].sum()) > 0
    source = pd.read_csv(data, parse_dates=["ts"])
    labelled = source[(source["machine"] == "m1") & (source["label"] == 1)]["ts"]
    ends = pd.to_datetime(frame["window_end"])
    in_event = (frame["key"] == "m1") & ends.between(labelled.min(), labelled.max())
    assert frame.loc[in_event, "is_anomaly"].mean() > 0.9, "the shift must be flagged"
    assert frame.loc[~in_event, "is_anomaly"].mean() < 0.05, "few false alarms elsewhere"
    inside = frame[in_event & frame["is_anomaly"]]
    named = inside["top_features"].str.split(",").apply(lambda top: "s2" in top)
    assert named.mean() > 0.9, "the shifted sensor should be among the top features"


def test_evaluate_reports_the_documented_metrics(trained, capsys):
    data, result = trained
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(result.artifact_dir),
                "--data",
                str(data),
                "--key-col",
                "machine",
                "--label-col",
                "label",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in (
        "auroc",
        "auprc",
        "precision",
        "recall",
        "f1",
        "event_recall",
        "mean_detection_delay_s",
        "false_alarms_per_day",
    ):
        assert key in report
    assert report["point"]["far"] < 0.05 and report["event_recall"] == 1.0
    assert report["auroc"] > 0.95


def test_evaluate_without_labels_is_a_clear_error(trained, capsys):
    data, result = trained
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(result.artifact_dir),
                "--data",
                str(data),
                "--key-col",
                "machine",
            ]
        )
        == 2
    )
    assert "label" in capsys.readouterr().err

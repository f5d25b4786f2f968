"""Evaluation rules on hand-made series where every number can be checked by hand."""

from __future__ import annotations

import numpy as np

from training.evaluate import SeriesPoints, evaluate_images, evaluate_series, point_flags


def test_point_rules():
    starts, ends = np.array([0, 2, 4]), np.array([2, 4, 6])
    flagged = np.array([False, True, False])
    end = point_flags(8, starts, ends, flagged, "end")
    assert end.tolist() == [False, False, False, False, True, True, False, False]
    any_ = point_flags(8, starts, ends, flagged, "any")
    assert any_.tolist() == [False, False, True, True, True, False, False, False]


def test_series_metrics_events_and_delay():
    times = np.arange(20).astype("datetime64[s]").astype("datetime64[ns]")
    labels = np.zeros(20, dtype=int)
    labels[10:14] = 1  # one event of 4 readings
    window = 3
    ends = np.arange(window - 1, 20)  # stride 1
    scores = np.zeros(len(ends))
    scores[ends == 12] = 5.0  # detected two readings into the event
    scores[ends == 13] = 5.0
    scores[ends == 5] = 5.0  # one false alarm
    result = evaluate_series(
        [SeriesPoints("k", times, labels)],
        np.full(len(ends), "k"),
        times[ends],
        window,
        scores,
        threshold=1.0,
    )
    point = result["point"]
    assert (point["tp"], point["fp"], point["fn"], point["tn"]) == (2, 1, 2, 15)
    assert point["far"] == 1 / 16 and point["mar"] == 2 / 4
    assert point["f1"] == 2 / (2 + (1 + 2) / 2)
    assert result["events"] == 1 and result["event_recall"] == 1.0
    assert result["mean_detection_delay_s"] == 2.0
    assert result["false_alarms"] == 1
    assert result["false_alarms_per_day"] == 1 / (16 / 86400)
    assert result["anomalous_windows"] == 4
    assert result["auroc"] is not None and result["precision"] == 2 / 3


def test_an_event_on_a_key_too_short_for_a_window_counts_as_missed():
    """The point metrics counted a short key's anomalous readings as missed; the event metrics
    left its anomaly out (recall 1.0 over 1 event where 2 were labelled)."""
    times = np.arange(20).astype("datetime64[s]").astype("datetime64[ns]")
    labels = np.zeros(20, dtype=int)
    labels[10:14] = 1
    window, ends = 3, np.arange(2, 20)
    scores = np.where(np.isin(ends, [12, 13]), 5.0, 0.0)
    short = SeriesPoints("short", times[:2], np.array([1, 1]))  # 2 readings, window 3
    result = evaluate_series(
        [SeriesPoints("k", times, labels), short],
        np.full(len(ends), "k"),
        times[ends],
        window,
        scores,
        threshold=1.0,
    )
    assert result["point"]["fn"] == 2 + 2
    assert result["events"] == 2 and result["event_recall"] == 0.5


def test_a_score_that_is_not_finite_is_flagged_as_score_and_the_worker_flag_it():
    times = np.arange(10).astype("datetime64[s]").astype("datetime64[ns]")
    labels = np.zeros(10, dtype=int)
    labels[6] = 1
    ends = np.arange(1, 10)  # windows of 2, stride 1
    scores = np.zeros(len(ends))
    scores[ends == 6] = np.nan  # the model could not hold the reading: anomalous everywhere
    result = evaluate_series(
        [SeriesPoints("k", times, labels)], np.full(len(ends), "k"), times[ends], 2, scores, 1.0
    )
    assert result["point"]["tp"] == 1 and result["point"]["fn"] == 0
    images = evaluate_images(np.array([1, 0]), np.array([np.inf, 0.0]), 1.0)
    assert images["recall"] == 1.0 and images["auroc"] == 1.0

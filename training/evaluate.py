"""Evaluation of a detector on labelled data: ranking quality, decisions, events, false alarms.

Window level: AUROC and AUPRC of the scores, precision / recall / F1 of the thresholded decision,
with a window labelled anomalous when its last reading is (series) or when it is not the normal
class (images).

Point level (series), the view an operator has of a stream. Rule `end` (default): at each reading
the decision is that of the latest window ending at or before it — exactly what a streaming worker
knows at that moment; readings before the first window are normal. Rule `any`: a reading is
flagged when any window covering it is flagged (hindsight; shorter apparent delays). From the
point decisions: FAR = FP / (FP + TN), MAR = FN / (FN + TP), SKAB's F1 = TP / (TP + (FP + FN) / 2).

Events: an event is a contiguous run of labelled readings of one key. It is detected when any of
its readings is flagged; the delay is the time from its first reading to the first flagged one.
False alarms per day: flagged episodes that start on a normal reading, per day of normal data.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from pipeline.detector.threshold import anomalous
from pipeline.errors import DataError

__all__ = [
    "POINT_RULES",
    "PointCounts",
    "SeriesPoints",
    "decision_metrics",
    "evaluate_images",
    "evaluate_series",
    "point_flags",
    "ranking_metrics",
]

POINT_RULES = ("end", "any")


@dataclass(frozen=True)
class SeriesPoints:
    """One key's readings: times (datetime64[ns]) and 0/1 labels, in time order."""

    key: str
    times: np.ndarray
    labels: np.ndarray


@dataclass
class PointCounts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, flagged: np.ndarray, labels: np.ndarray) -> None:
        self.tp += int((flagged & labels).sum())
        self.fp += int((flagged & ~labels).sum())
        self.fn += int((~flagged & labels).sum())
        self.tn += int((~flagged & ~labels).sum())

    def merge(self, other: PointCounts) -> None:
        self.tp, self.fp = self.tp + other.tp, self.fp + other.fp
        self.fn, self.tn = self.fn + other.fn, self.tn + other.tn

    def metrics(self) -> dict:
        far = self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0
        mar = self.fn / (self.fn + self.tp) if self.fn + self.tp else 0.0
        denominator = self.tp + (self.fp + self.fn) / 2
        return {
            "f1": self.tp / denominator if denominator else 0.0,
            "far": far,
            "mar": mar,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
        }


@dataclass
class _Events:
    total: int = 0
    detected: int = 0
    delays_s: list[float] = field(default_factory=list)
    false_alarms: int = 0
    normal_seconds: float = 0.0


def ranking_metrics(labels: np.ndarray, scores: np.ndarray) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score

    if labels.all() or not labels.any():
        return {"auroc": None, "auprc": None}
    scores = np.asarray(scores, dtype=np.float64)
    bad = ~np.isfinite(scores)
    if bad.any():  # ranked above every finite score, as `anomalous` decides them
        top = scores[~bad].max() if (~bad).any() else 0.0
        scores = np.where(bad, top + max(1.0, abs(top)), scores)
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "auprc": float(average_precision_score(labels, scores)),
    }


def decision_metrics(labels: np.ndarray, flagged: np.ndarray) -> dict:
    tp = int((flagged & labels).sum())
    fp = int((flagged & ~labels).sum())
    fn = int((~flagged & labels).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def point_flags(
    n_points: int, starts: np.ndarray, ends: np.ndarray, flagged: np.ndarray, rule: str = "end"
) -> np.ndarray:
    """Per-reading decisions of one key from its windows' [start, end] positions and flags."""
    if rule == "end":
        state = np.full(n_points, -1, dtype=np.int64)
        state[ends] = np.arange(len(ends))
        state = np.maximum.accumulate(state)
        out = np.zeros(n_points, dtype=bool)
        seen = state >= 0
        out[seen] = flagged[state[seen]]
        return out
    if rule == "any":
        marks = np.zeros(n_points + 1, dtype=np.int64)
        np.add.at(marks, starts[flagged], 1)
        np.add.at(marks, ends[flagged] + 1, -1)
        return np.cumsum(marks[:-1]) > 0
    raise DataError(f"unknown point rule {rule!r}; use one of {POINT_RULES}")


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end] index pairs of the runs of True in `mask`."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2], edges[1::2] - 1, strict=True))


def evaluate_series(
    points: Iterable[SeriesPoints],
    window_keys: np.ndarray,
    window_ends: np.ndarray,
    window_length: int,
    scores: np.ndarray,
    threshold: float,
    *,
    rule: str = "end",
) -> dict:
    """Evaluate window scores against per-reading labels. `window_ends` are the window end times;
    windows are matched to readings of their key by time."""
    scores = np.asarray(scores, dtype=np.float64)
    flagged_windows = anomalous(scores, threshold)
    counts, events = PointCounts(), _Events()
    window_labels = np.zeros(len(scores), dtype=bool)
    for series in points:
        index = np.flatnonzero(window_keys == series.key)
        labels = np.asarray(series.labels).astype(bool)
        if len(index) == 0:  # a key too short for a window: its anomalies are missed
            counts.add(np.zeros(len(labels), dtype=bool), labels)
            _count_events(series.times, labels, np.zeros(len(labels), dtype=bool), events)
            continue
        ends = np.searchsorted(series.times, window_ends[index])
        if (ends >= len(series.times)).any() or (series.times[ends] != window_ends[index]).any():
            raise DataError(f"key {series.key!r}: window ends do not match its readings")
        starts = ends - (window_length - 1)
        window_labels[index] = labels[ends]
        flags = point_flags(len(labels), starts, ends, flagged_windows[index], rule)
        counts.add(flags, labels)
        _count_events(series.times, labels, flags, events)
    result = {
        "windows": int(len(scores)),
        "anomalous_windows": int(window_labels.sum()),
        **ranking_metrics(window_labels, scores),
        **decision_metrics(window_labels, flagged_windows),
        "point_rule": rule,
        "point": counts.metrics(),
        "events": events.total,
        "event_recall": events.detected / events.total if events.total else None,
        "mean_detection_delay_s": float(np.mean(events.delays_s)) if events.delays_s else None,
        "false_alarms": events.false_alarms,
        "false_alarms_per_day": (
            events.false_alarms / (events.normal_seconds / 86400.0)
            if events.normal_seconds > 0
            else None
        ),
    }
    return result


def _count_events(times: np.ndarray, labels: np.ndarray, flags: np.ndarray, acc: _Events) -> None:
    seconds = times.astype("datetime64[ns]").astype(np.int64) / 1e9
    for start, end in _runs(labels):
        acc.total += 1
        hits = np.flatnonzero(flags[start : end + 1])
        if len(hits):
            acc.detected += 1
            acc.delays_s.append(float(seconds[start + hits[0]] - seconds[start]))
    for start, _ in _runs(flags):
        if not labels[start]:
            acc.false_alarms += 1
    if len(seconds) > 1:
        step = float(np.median(np.diff(seconds)))
        acc.normal_seconds += step * int((~labels).sum())


def evaluate_images(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    flagged = anomalous(scores, threshold)
    counts = PointCounts()
    counts.add(flagged, labels)
    return {
        "images": int(len(scores)),
        "anomalous_images": int(labels.sum()),
        **ranking_metrics(labels, scores),
        **decision_metrics(labels, flagged),
        "far": counts.metrics()["far"],
        "mar": counts.metrics()["mar"],
    }

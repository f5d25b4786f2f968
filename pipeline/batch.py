"""Batch scoring on the same code path as the streaming worker.

`score_window_set` turns windows cut by the shared window rule into one row per window; the worker
scores the windows it builds with `Detector.score` exactly the same way, so a file scored here and
the same readings streamed through Kafka give identical scores. With a `StreamReplay` the windows
also go through the worker's per-key streaming stages in each key's time order (`replay`): the
adaptive stage's surprise, likelihood and detections, and the decision the worker would make.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.detector import Detector, Scores, WindowSet, WindowSpec, cut_windows
from pipeline.detector.adaptive_stage import StreamReplay, replay
from pipeline.detector.calendar import calendar_columns
from pipeline.detector.key_baselines import BaselineConfig, KeyBaselines
from pipeline.detector.threshold import anomalous
from pipeline.errors import DataError
from pipeline.events import ModelIdentity, event_ids
from pipeline.modalities.times import cut_to_ms, seconds_like, too_short

__all__ = ["score_images", "score_keyed", "score_readings", "score_window_set"]


def score_window_set(
    detector: Detector,
    windows: WindowSet,
    *,
    top_k: int = 3,
    model: ModelIdentity | None = None,
    baselines: BaselineConfig | None = None,
    stream: StreamReplay | None = None,
) -> pd.DataFrame:
    """key, window_start, window_end, score, threshold, p_value, is_anomaly, top_features, and
    with `model` the event_id the worker gives the same window. Keys with their own baselines
    are scored as the worker scores them (`score_keyed`); warm-up windows get no row. With
    `stream` the windows go through the worker's adaptive stage too: surprise, likelihood,
    detection, and is_anomaly as the worker decides it."""
    scored_rows, scored = score_keyed(detector, windows, baselines or BaselineConfig())
    if scored_rows is not None:
        windows = windows.subset(scored_rows)
    threshold = detector.threshold
    frame = pd.DataFrame(
        {
            "key": windows.keys.astype(str),
            "window_start": windows.start_times,
            "window_end": windows.end_times,
            "score": scored.scores,
        }
    )
    _add_decision(frame, detector)
    if stream is not None and stream.stage is not None:
        adaptive = replay(stream.stage, windows, scored.scores)
        frame["surprise"] = adaptive.surprise
        frame["likelihood"] = adaptive.likelihood
        frame["detection"] = adaptive.detection
        if stream.alarm_on == "adaptive":
            frame["is_anomaly"] = adaptive.anomalous(stream.threshold)
    top = detector.top_features(scored.per_feature, top_k) if len(frame) else []
    frame["top_features"] = [",".join(names) for names in top]
    if scored.terms is not None:  # the terms score: which term weighed most for each of them
        frame["top_terms"] = [",".join(terms) for terms in detector.top_terms(scored, top_k)]
    if model is not None:
        end_ms = pd.to_datetime(frame["window_end"]).to_numpy().astype("datetime64[ms]")
        frame["event_id"] = event_ids(model, frame["key"], end_ms.astype(np.int64).tolist())
    if windows.end_labels is not None:
        frame["label"] = windows.end_labels.astype(int)
    frame.attrs["threshold"] = threshold.value
    return frame


def score_keyed(
    detector: Detector, windows: WindowSet, config: BaselineConfig
) -> tuple[np.ndarray | None, Scores]:
    """Windows scored with per-key baselines as the worker scores them: each key's windows in
    time order through its `KeyBaselines` (warm-up windows left out; with level following, one
    block of each key per pass, folded with the decisions of the pass). Returns the indices of
    the windows scored (None: all, without per-key baselines) and their scores."""
    keys = windows.keys.astype(str)
    plain = (detector.baselines is None or not detector.baselines.keys) and not config.warmup
    if plain or detector.input.kind != "series":
        return None, detector.score(windows.windows)
    part = KeyBaselines(config, detector)
    order = np.argsort(keys, kind="stable")  # each key's windows stay in time order
    edges = np.flatnonzero(np.r_[True, keys[order][1:] != keys[order][:-1], True])
    active = [(keys[order[a]], order[a:b]) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    threshold = detector.threshold.value
    chosen, parts = [], []
    while active:
        plan, later = [], []
        for key, rows in active:
            warm, take = part.take(key, windows.subset(rows).windows)  # read window by window
            now = rows[warm : warm + take]
            if len(now):
                plan.append((key, now))
            if warm + take < len(rows):
                later.append((key, rows[warm + take :]))
        if plan:
            index = np.concatenate([rows for _, rows in plan])
            centers = np.concatenate(
                [np.broadcast_to(part.scaling(k)[0], (len(r), len(part.c))) for k, r in plan]
            )
            scales = np.concatenate(
                [np.broadcast_to(part.scaling(k)[1], (len(r), len(part.c))) for k, r in plan]
            )
            chunk = windows.subset(index).windows  # copied out batch by batch as scored
            scored = detector.score(chunk, scaling=(centers, scales))
            flags = (
                anomalous(scored.scores, threshold) if threshold is not None else scored.scores < 0
            )
            at = 0
            for key, rows in plan:
                part.follow(key, windows.subset(rows).windows, ~flags[at : at + len(rows)])
                at += len(rows)
            chosen.append(index)
            parts.append(scored)
        active = later
    if not parts:
        empty = np.zeros(0)
        return np.zeros(0, np.int64), Scores(empty, np.zeros((0, len(part.c))), None)
    index = np.concatenate(chosen)
    back = np.argsort(index, kind="stable")
    per_feature = np.concatenate([p.per_feature for p in parts])[back]
    per_step = np.concatenate([p.per_step for p in parts])[back]
    return index[back], Scores(
        np.concatenate([p.scores for p in parts])[back], per_feature, per_step
    )


def score_images(detector: Detector, images: np.ndarray) -> pd.DataFrame:
    scored = detector.score(images)
    frame = pd.DataFrame({"index": np.arange(len(images)), "score": scored.scores})
    _add_decision(frame, detector)
    return frame


def _add_decision(frame: pd.DataFrame, detector: Detector) -> None:
    threshold = detector.threshold
    if threshold.calibrated:
        frame["threshold"] = threshold.value
        frame["p_value"] = threshold.p_values(frame["score"].to_numpy())
        frame["is_anomaly"] = detector.is_anomaly(frame["score"].to_numpy())
    else:
        frame["threshold"] = np.nan
        frame["p_value"] = np.nan
        frame["is_anomaly"] = False


def _times(column: pd.Series) -> pd.Series:
    """A time column as naive UTC: epoch ms (a fraction cut, as the worker cuts it) or ISO-8601."""
    kind = pd.api.types
    if kind.is_numeric_dtype(column) and not kind.is_bool_dtype(column):
        numbers = column.to_numpy(np.float64)
        seconds = seconds_like(numbers)
        if seconds.any():
            row = int(np.argmax(seconds))
            raise DataError(
                f"time column, input row {row + 1}: {column.iloc[row]!r} read as epoch "
                "milliseconds falls in 1970-1973: epoch seconds? send milliseconds"
            )
        stamps = pd.to_datetime(np.trunc(numbers), unit="ms")
        return pd.Series(stamps, index=column.index)
    stamps = pd.to_datetime(column, utc=True, format="ISO8601", errors="coerce")
    stamps = stamps.dt.tz_localize(None).to_numpy("datetime64[ns]", copy=True)
    stamps[too_short(column)] = np.datetime64("NaT")
    if np.isnat(stamps).any():
        row = int(np.argmax(np.isnat(stamps)))
        raise DataError(
            f"time column, input row {row + 1}: {column.iloc[row]!r} is not a time "
            "(ISO-8601 text or epoch milliseconds)"
        )
    return pd.Series(cut_to_ms(stamps), index=column.index)


def score_readings(
    detector: Detector, frame: pd.DataFrame, *, key_col: str = "key", time_col: str = "ts"
) -> pd.DataFrame:
    """One output row per input reading: the score of the window that ends at that reading
    (null where none ends there, and for a reading that repeats its key's time, left out as
    `score` and the worker leave it), in the input's row order. Used by the MLflow pyfunc."""
    spec_in = detector.input
    features = list(spec_in.data_features)
    missing = [f for f in features if f not in frame.columns]
    if missing:
        raise DataError(f"input rows lack the feature columns {missing}")
    if spec_in.calendar and time_col not in frame.columns:
        raise DataError(f"input rows lack the time column {time_col!r} (calendar inputs)")
    spec: WindowSpec = detector.input.window
    if key_col in frame.columns and frame[key_col].isna().any():
        row = int(np.flatnonzero(frame[key_col].isna().to_numpy())[0])
        raise DataError(
            f"input row {row + 1}: no key (leave the {key_col!r} column out for one unnamed key)"
        )
    flags = [f for f in features if pd.api.types.is_bool_dtype(frame[f])]
    if flags:
        raise DataError(
            f"input rows: feature {flags[0]!r} holds true/false, not numbers (the worker "
            "dead-letters such a reading as schema_mismatch)"
        )
    keys = frame[key_col].astype(str) if key_col in frame.columns else pd.Series("", frame.index)
    order = np.arange(len(frame))
    if time_col in frame.columns:
        times = _times(frame[time_col])
    else:
        times = pd.Series(order, index=frame.index)
    work = pd.DataFrame({"key": keys.to_numpy(), "time": times.to_numpy(), "row": order})
    work = work.sort_values(["key", "time"], kind="stable")
    if time_col in frame.columns:  # a repeated time is left out, as `score` and the worker do
        work = work[~work.duplicated(["key", "time"], keep="first")]
    wide = frame[features].to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):
        usable = np.isfinite(wide) & (np.abs(wide) <= np.finfo(np.float32).max)
    if not usable.all():
        row, column = np.argwhere(~usable)[0]
        raise DataError(
            f"input row {row + 1}: feature {features[column]!r} is {wide[row, column]!r}, NaN, "
            "infinite or beyond float32; refusing to score it (the worker dead-letters such a "
            "reading as non_finite)"
        )
    if spec_in.calendar:
        stamps = times.to_numpy().astype("datetime64[ms]").astype(np.int64)
        wide = np.hstack([wide, calendar_columns(stamps, spec_in.calendar)])
    values = wide.astype(np.float32)
    # object columns so that readings without a window serialise as null, not NaN
    out = pd.DataFrame(
        {
            "score": pd.Series([None] * len(frame), dtype=object),
            "threshold": detector.threshold.value,
            "p_value": pd.Series([None] * len(frame), dtype=object),
            "is_anomaly": np.zeros(len(frame), dtype=bool),
        }
    )
    groups = []
    for key, rows in work.groupby("key", sort=False):
        positions = rows["row"].to_numpy()
        groups.append((key, positions, values[positions], None))
    try:
        windows = cut_windows(groups, spec, source="input rows")
    except DataError:
        return out
    scaling = detector.key_scaling(windows.keys)
    scores = detector.score(windows.windows, attribution=False, scaling=scaling).scores
    end_rows = windows.end_times.astype(np.int64)  # the row positions stood in for times
    out.loc[end_rows, "score"] = pd.Series(scores.tolist(), index=end_rows, dtype=object)
    if detector.threshold.calibrated:
        p_values = detector.threshold.p_values(scores).tolist()
        out.loc[end_rows, "p_value"] = pd.Series(p_values, index=end_rows, dtype=object)
        out.loc[end_rows, "is_anomaly"] = detector.is_anomaly(scores)
    return out

"""Scoring and evaluating data with a trained detector: what `aewatch score` and `evaluate` do.

Windows are cut with the detector's own features and window and scored on the worker's code path
(`pipeline.batch`), so a file scored here and the same readings streamed through Kafka give the
same scores and event ids. With `stream` (`--stream`) the windows are replayed through the
worker's per-key streaming stages in each key's time order, with the worker's adaptive settings:
the surprise, likelihood and detections the worker would report, and its decisions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.detector.adaptive_stage import (
    AdaptiveStage,
    StreamReplay,
    range_features,
    replay,
    score_reference,
)
from pipeline.detector.key_baselines import BaselineConfig, check_following
from pipeline.errors import ConfigError
from pipeline.worker.settings import AdaptiveStageSettings
from training.data.for_detector import ALL, DataSource, load_for
from training.outputs import table_out, usable_out, write_table
from training.sources import ModelSource

__all__ = ["EvaluateSettings", "ScoreSettings", "evaluate_file", "score_file"]


@dataclass(frozen=True)
class ScoreSettings:
    model: ModelSource
    data: DataSource
    out: str
    top_k: int = 3
    baselines: BaselineConfig | None = None  # per-key baselines, as the worker's
    stream: AdaptiveStageSettings | None = None  # replay through the streaming stages


@dataclass(frozen=True)
class EvaluateSettings:
    model: ModelSource
    data: DataSource
    point_rule: str = "end"
    stream: AdaptiveStageSettings | None = None


def score_file(settings: ScoreSettings) -> dict:
    """One row per window (or image) written to `out`: key, window start and end, score,
    threshold, p-value, is_anomaly and the top features. Returns a summary."""
    out = table_out(settings.out)
    usable_out(out, settings.data.path, model=settings.model.uri)
    detector, ref = settings.model.load()
    if settings.baselines is not None:
        check_following(settings.baselines, detector)
    data = load_for(detector, settings.data)
    stream = _replay(detector, ref.label, settings.stream)
    following = settings.baselines is not None and settings.baselines.half_life > 0
    if following and stream is not None and stream.alarm_on == "adaptive":
        raise ConfigError(
            "level_half_life",
            "a file replay follows levels on the model's decision only; "
            "with --alarm-on adaptive score the stream in the worker",
        )
    frame = data.score_table(
        detector, ALL, settings.top_k, ref.identity(), baselines=settings.baselines, stream=stream
    )
    write_table(frame, out)
    return {
        "model": ref.label,
        "rows": int(len(frame)),
        "anomalies": int(frame["is_anomaly"].sum()),
        "threshold": detector.threshold.value,
        "out": str(Path(out)),
    }


def evaluate_file(settings: EvaluateSettings) -> dict:
    """AUROC, AUPRC, precision, recall and F1 at the threshold, and for series the point-wise
    FAR and MAR, event recall, detection delay and false alarms per day."""
    detector, ref = settings.model.load()
    data = load_for(detector, settings.data)
    stream = _replay(detector, ref.label, settings.stream)
    scores, threshold, decided_by = None, detector.threshold.require(), "raw"
    if stream is not None and stream.alarm_on == "adaptive" and data.has(ALL):
        scaling = data.scaling(detector, ALL)
        raw = detector.score(data.raw(ALL), attribution=False, scaling=scaling).scores
        adaptive = replay(stream.stage, data.parts[ALL], raw)
        scores = adaptive.deciding_surprise(stream.threshold)  # finite, for the metrics
        # the worker's decision is surprise >= threshold; the metrics decide score > threshold
        threshold, decided_by = float(np.nextafter(stream.threshold, -np.inf)), "adaptive"
    result = data.evaluate(detector, ALL, settings.point_rule, scores, threshold)
    if result is None:
        raise ConfigError("label_col", "evaluation needs labels: --label-col or --normal-class")
    summary = {"model": ref.label, "threshold": threshold, **result}
    if stream is not None:
        summary["decided_by"] = decided_by
    return summary


def _replay(detector, label: str, settings: AdaptiveStageSettings | None) -> StreamReplay | None:
    """The worker's streaming stages, fresh, for a replay of a file (None: no replay)."""
    if settings is None:
        return None
    if detector.input.kind != "series":
        raise ConfigError("stream", "a replay through the streaming stages needs series data")
    if settings.adaptive_columns != "score":
        raise ConfigError(
            "adaptive_columns",
            "a file replay judges the window score only (--adaptive-columns score)",
        )
    stage = None
    if settings.enabled:
        refs = [score_reference(detector.threshold)]
        stage = AdaptiveStage(
            settings.stage(), settings.rule(), refs, label, range_features(detector)
        )
    return StreamReplay(stage, settings.alarm_on, settings.adaptive_threshold)

"""Scoring and evaluating data with a trained detector: what `aewatch score` and `evaluate` do.

Windows are cut with the detector's own features and window and scored on the worker's code path
(`pipeline.batch`), so a file scored here and the same readings streamed through Kafka give the
same scores and event ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.detector.key_baselines import BaselineConfig
from pipeline.errors import ConfigError
from training.data.for_detector import ALL, DataSource, load_for
from training.outputs import table_out, write_table
from training.sources import ModelSource

__all__ = ["EvaluateSettings", "ScoreSettings", "evaluate_file", "score_file"]


@dataclass(frozen=True)
class ScoreSettings:
    model: ModelSource
    data: DataSource
    out: str
    top_k: int = 3
    baselines: BaselineConfig | None = None  # per-key baselines, as the worker's


@dataclass(frozen=True)
class EvaluateSettings:
    model: ModelSource
    data: DataSource
    point_rule: str = "end"


def score_file(settings: ScoreSettings) -> dict:
    """One row per window (or image) written to `out`: key, window start and end, score,
    threshold, p-value, is_anomaly and the top features. Returns a summary."""
    out = table_out(settings.out)
    detector, ref = settings.model.load()
    data = load_for(detector, settings.data)
    frame = data.score_table(detector, ALL, settings.top_k, ref.identity(), settings.baselines)
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
    result = data.evaluate(detector, ALL, settings.point_rule)
    if result is None:
        raise ConfigError("label_col", "evaluation needs labels: --label-col or --normal-class")
    return {"model": ref.label, "threshold": detector.threshold.require(), **result}

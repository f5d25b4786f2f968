"""The event writer: every record the worker produces besides state is built and sent here.

- dead letters: the record as it came, to the DLQ topic, with headers saying why (see
  `pipeline.events.dead_letter_headers`);
- window events (`aewatch.anomaly.v1`, CloudEvents 1.0 in structured JSON mode): one per
  anomalous window (every window with `emit_all`), keyed by the entity key; the modality adds what
  it knows about the window (its span and top features, or an image's error map);
- alarm events (`aewatch.alarm.opened` / `aewatch.alarm.resolved`): one per alarm transition;
- drift events (`aewatch.drift.v1`, to the alarm topic): a key's (or, key `*`, the pooled) score
  distribution moved away from the calibration distribution (see `pipeline.worker.drift`).

Event ids are deterministic (see `pipeline.events`), so a replay after a restart sends the same
ids again. Counts go to the worker's stats and metrics here, once per batch.
"""

from __future__ import annotations

import logging

import numpy as np
import orjson

from pipeline.detector import Threshold
from pipeline.detector.adaptive import AdaptiveScores
from pipeline.events import (
    ALARM_TYPES,
    DRIFT_TYPE,
    EVENT_TYPE,
    ModelIdentity,
    dead_letter_headers,
    drift_event_id,
    event_id,
    iso_ms,
)
from pipeline.kafka_io.protocols import Record, Sink
from pipeline.modalities.base import Modality
from pipeline.modalities.readings import Rejection
from pipeline.worker.alarms import AlarmTransition
from pipeline.worker.drift import BINS, OVERALL, DriftCrossing
from pipeline.worker.metrics import WorkerMetrics, WorkerStats
from pipeline.worker.scorer import ScoredBatch
from pipeline.worker.settings import EventSettings, TopicSettings

__all__ = ["EventWriter", "alarm_event"]

log = logging.getLogger(__name__)


def _cloud_event(kind: str, event_id_: str, model: ModelIdentity, key: str, ms: int, data: dict):
    return {
        "specversion": "1.0",
        "id": event_id_,
        "source": model.source,
        "type": kind,
        "subject": key,
        "time": iso_ms(ms),
        "datacontenttype": "application/json",
        "data": data,
    }


def _model(model: ModelIdentity) -> dict:
    return {"name": model.name, "version": model.version, "alias": model.alias}


def _severity(score: float, threshold: float) -> float:
    return score / threshold if threshold > 0 else score


def _adaptive_fields(adaptive: AdaptiveScores | None, i: int) -> dict:
    if adaptive is None or not np.isfinite(adaptive.surprise[i]):
        return {}  # stage off, or a replayed window the stage took before
    return {
        "surprise": float(adaptive.surprise[i]),
        "likelihood": float(adaptive.likelihood[i]),
        "detection": bool(adaptive.detection[i]),
    }


def alarm_event(model: ModelIdentity, transition: AlarmTransition, threshold: float) -> dict:
    """A CloudEvent for an alarm that opened or resolved."""
    t = transition
    data = {
        "key": t.key,
        "episode_id": t.episode_id,
        "state": t.kind,
        "start": iso_ms(t.start_ms),
        "end": None if t.end_ms is None else iso_ms(t.end_ms),
        "peak_score": t.peak_score,
        "peak_time": iso_ms(t.peak_ms),
        "threshold": threshold,
        "severity": _severity(t.peak_score, threshold),
        "windows": t.windows,
        "anomalous_windows": t.anomalous_windows,
        "top_features": [{"name": name, "error": float(error)} for name, error in t.top_features],
        "model": _model(model),
        "source": {"topic": t.partition[0], "partition": int(t.partition[1])},
    }
    return _cloud_event(ALARM_TYPES[t.kind], t.event_id, model, t.key, t.time_ms, data)


class EventWriter:
    def __init__(
        self,
        sink: Sink,
        topics: TopicSettings,
        events: EventSettings,
        modality: Modality,
        metrics: WorkerMetrics,
        stats: WorkerStats,
    ) -> None:
        self.sink, self.topics, self.events, self.modality = sink, topics, events, modality
        self.metrics, self.stats = metrics, stats

    def dead_letter(self, record: Record, rejection: Rejection) -> None:
        headers = list(record.headers or []) + dead_letter_headers(
            rejection.reason, rejection.detail, record.topic, record.partition, record.offset
        )
        self.sink.send(self.topics.dlq_topic, key=record.key, value=record.value, headers=headers)
        self.stats.dead_letters[rejection.reason] += 1
        self.metrics.dead_letters.labels(rejection.reason).inc()

    def windows(
        self,
        batch: ScoredBatch,
        flags: np.ndarray,
        threshold: Threshold,
        model: ModelIdentity,
        adaptive: AdaptiveScores | None = None,
    ) -> None:
        """An event for each anomalous window of the batch (each window with `emit_all`), with
        the adaptive stage's surprise, likelihood and detection when it ran on the window."""
        chosen = np.arange(len(batch)) if self.events.emit_all else np.flatnonzero(flags)
        if not len(chosen):
            return
        scores = batch.scored.scores
        keys = batch.keys()
        group, first_offsets, last_offsets = batch.sources()
        p_values = threshold.p_values(scores[chosen])
        for j, i in enumerate(chosen):
            key = str(keys[i])
            topic, part = batch.pending.partitions[group[i]]
            score = float(scores[i])
            end_ms = int(batch.end_ts[i])
            data = {
                "key": key,
                "score": score,
                "threshold": threshold.value,
                "p_value": float(p_values[j]),
                "severity": _severity(score, threshold.value),
                "is_anomaly": bool(flags[i]),
                **_adaptive_fields(adaptive, i),
                "model": _model(model),
                **self.modality.event_detail(batch.scored, i, int(batch.start_ts[i]), end_ms),
                "source": {
                    "topic": topic,
                    "partition": int(part),
                    "offset_start": int(first_offsets[i]),
                    "offset_end": int(last_offsets[i]),
                },
            }
            event = _cloud_event(EVENT_TYPE, event_id(model, key, end_ms), model, key, end_ms, data)
            self.sink.send(self.topics.output_topic, key=key.encode(), value=orjson.dumps(event))
        self.stats.events_out += len(chosen)
        self.metrics.events.labels("anomaly").inc(len(chosen))

    def alarm(self, transition: AlarmTransition, threshold: float, model: ModelIdentity) -> None:
        event = alarm_event(model, transition, threshold)
        self.sink.send(
            self.topics.alarm_topic_name,
            key=transition.key.encode(),
            value=orjson.dumps(event),
        )
        self.stats.alarms[transition.kind] += 1
        self.metrics.events.labels(f"alarm_{transition.kind}").inc()
        log.info(
            "alarm %s: %s (episode %s, peak %.4g)",
            transition.kind,
            transition.key,
            transition.episode_id,
            transition.peak_score,
            extra={"fields": {"alarm": transition.kind, "key": transition.key}},
        )

    def drift(self, crossing: DriftCrossing, limit: float, model: ModelIdentity) -> None:
        c = crossing
        data = {
            "key": c.key,
            "scope": "overall" if c.key == OVERALL else "key",
            "statistic": "psi",
            "value": c.psi,
            "limit": limit,
            "windows": c.windows,
            "shares": list(c.shares),
            "expected_share": 1.0 / BINS,
            "model": _model(model),
        }
        event_id_ = drift_event_id(model, c.key, c.time_ms)
        event = _cloud_event(DRIFT_TYPE, event_id_, model, c.key, c.time_ms, data)
        self.sink.send(self.topics.alarm_topic_name, key=c.key.encode(), value=orjson.dumps(event))
        self.metrics.events.labels("drift").inc()
        log.warning(
            "score drift: %s PSI %.3f >= %.3g over %d windows",
            "overall" if c.key == OVERALL else c.key,
            c.psi,
            limit,
            c.windows,
            extra={"fields": {"drift": c.key, "psi": c.psi}},
        )

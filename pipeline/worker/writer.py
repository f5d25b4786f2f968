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
    ALARM_RESOLVED_BY,
    ALARM_TYPES,
    DRIFT_TYPE,
    EVENT_TYPE,
    ModelIdentity,
    dead_letter_headers,
    drift_event_id,
    event_ids,
    iso_ms,
    iso_ms_many,
)
from pipeline.kafka_io.protocols import Record, Sink
from pipeline.modalities.base import Modality
from pipeline.modalities.readings import Rejection
from pipeline.worker.alarms import AlarmTransition
from pipeline.worker.drift import BINS, DriftCrossing
from pipeline.worker.metrics import WorkerMetrics, WorkerStats
from pipeline.worker.scorer import ScoredBatch
from pipeline.worker.settings import EventSettings, TopicSettings

__all__ = ["EventWriter", "alarm_event"]

log = logging.getLogger(__name__)


def _cloud_event(kind: str, event_id_: str, model: ModelIdentity, key: str, time: str, data: dict):
    return {
        "specversion": "1.0",
        "id": event_id_,
        "source": model.source,
        "type": kind,
        "subject": key,
        "time": time,
        "datacontenttype": "application/json",
        "data": data,
    }


def _model(model: ModelIdentity) -> dict:
    return {"name": model.name, "version": model.version, "alias": model.alias}


def _severity(score: float, threshold: float) -> float:
    return score / threshold if threshold > 0 else score


def _adaptive_fields(adaptive: AdaptiveScores | None, rows: np.ndarray) -> list[dict]:
    """Each row's surprise, likelihood and detection; none where the stage is off, or for a
    replayed window the stage took before."""
    if adaptive is None:
        return [{}] * len(rows)
    surprise = adaptive.surprise[rows]
    columns = zip(
        np.isfinite(surprise).tolist(),
        surprise.tolist(),
        adaptive.likelihood[rows].tolist(),
        adaptive.detection[rows].tolist(),
        strict=True,
    )
    return [
        {"surprise": s, "likelihood": p, "detection": bool(d)} if seen else {}
        for seen, s, p, d in columns
    ]


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
    return _cloud_event(ALARM_TYPES[t.kind], t.event_id, model, t.key, iso_ms(t.time_ms), data)


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
        reason = rejection.reason
        headers = list(record.headers or []) + dead_letter_headers(
            reason, rejection.detail, record.topic, record.partition, record.offset
        )
        self.sink.send(self.topics.dlq_topic, key=record.key, value=record.value, headers=headers)
        self.stats.dead_letters[reason] += 1
        self.metrics.dead_letters_by_reason[reason].inc()

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
        # every field as a list for all the chosen windows first, then one dict per event
        t = threshold.value
        scores = batch.scored.scores[chosen]
        keys = batch.keys()[chosen].tolist()
        group, first_offsets, last_offsets = (column[chosen] for column in batch.sources())
        sources = [batch.pending.partitions[g] for g in group.tolist()]
        ends = batch.end_ts[chosen]
        columns = zip(
            keys,
            scores.tolist(),
            threshold.p_values(scores).tolist(),
            flags[chosen].tolist(),
            _adaptive_fields(adaptive, chosen),
            self.modality.event_details(batch.scored, chosen, batch.start_ts[chosen], ends),
            sources,
            first_offsets.tolist(),
            last_offsets.tolist(),
            event_ids(model, keys, ends.tolist()),
            iso_ms_many(ends),
            strict=True,
        )
        fields, send, topic = _model(model), self.sink.send, self.topics.output_topic
        for key, score, p_value, flag, adaptive_, detail, source, first, last, id_, time in columns:
            data = {
                "key": key,
                "score": score,
                "threshold": t,
                "p_value": p_value,
                "severity": _severity(score, t),
                "is_anomaly": flag,
                **adaptive_,
                "model": fields,
                **detail,
                "source": {
                    "topic": source[0],
                    "partition": int(source[1]),
                    "offset_start": first,
                    "offset_end": last,
                },
            }
            event = _cloud_event(EVENT_TYPE, id_, model, key, time, data)
            send(topic, key=key.encode(), value=orjson.dumps(event))
        self.stats.events_out += len(chosen)
        self.metrics.events.labels("anomaly").inc(len(chosen))

    def alarm(self, transition: AlarmTransition, threshold: float, model: ModelIdentity) -> None:
        event = alarm_event(model, transition, threshold)
        resolved = transition.kind == "resolved"
        self.sink.send(
            self.topics.alarm_topic_name,
            key=transition.key.encode(),
            value=orjson.dumps(event),
            headers=[(ALARM_RESOLVED_BY, transition.cause.encode())] if resolved else None,
        )
        self.stats.alarms[transition.kind] += 1
        self.metrics.events.labels(f"alarm_{transition.kind}").inc()
        log.info(
            "alarm %s%s: %s (episode %s, peak %.4g)",
            transition.kind,
            f" by {transition.cause}" if resolved else "",
            transition.key,
            transition.episode_id,
            transition.peak_score,
            extra={"fields": {"alarm": transition.kind, "key": transition.key}},
        )

    def drift(self, crossing: DriftCrossing, limit: float, model: ModelIdentity) -> None:
        c = crossing
        data = {
            "key": c.key,
            "scope": "overall" if c.pooled else "key",
            "statistic": "psi",
            "value": c.psi,
            "limit": limit,
            "windows": c.windows,
            "shares": list(c.shares),
            "expected_share": 1.0 / BINS,
            "model": _model(model),
        }
        event_id_ = drift_event_id(model, c.key, c.time_ms, c.pooled)
        event = _cloud_event(DRIFT_TYPE, event_id_, model, c.key, iso_ms(c.time_ms), data)
        self.sink.send(self.topics.alarm_topic_name, key=c.key.encode(), value=orjson.dumps(event))
        self.metrics.events.labels("drift").inc()
        log.warning(
            "score drift: %s PSI %.3f >= %.3g over %d windows",
            "overall" if c.pooled else c.key,
            c.psi,
            limit,
            c.windows,
            extra={"fields": {"drift": c.key, "psi": c.psi}},
        )

"""Anomaly events (CloudEvents 1.0, structured JSON) and dead-letter records.

Event ids are deterministic, uuid5 of (model name, model version, key, window end), so a replay
after a restart or rebalance produces the same ids and consumers can deduplicate. The event schema
ships as `pipeline/schemas/anomaly-event.v1.schema.json`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.resources import files

import orjson

__all__ = [
    "ALARM_SCHEMA",
    "ALARM_TYPES",
    "EVENT_SCHEMA",
    "EVENT_TYPE",
    "alarm_event",
    "ModelIdentity",
    "dead_letter_headers",
    "event_id",
    "event_schema",
    "iso_ms",
]

EVENT_TYPE = "aewatch.anomaly.v1"
EVENT_SCHEMA = "anomaly-event.v1.schema.json"
ALARM_TYPES = {"opened": "aewatch.alarm.opened", "resolved": "aewatch.alarm.resolved"}
ALARM_SCHEMA = "alarm-event.v1.schema.json"
_NAMESPACE = uuid.UUID("6f6e1a52-8b3b-4e1e-9a55-616577617463")


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    version: str
    alias: str | None = None

    @property
    def source(self) -> str:
        return f"/aewatch/models/{self.name}/{self.version}"


def event_id(model: ModelIdentity, key: str, window_end_ms: int) -> str:
    return str(
        uuid.uuid5(_NAMESPACE, f"{model.name}\x1f{model.version}\x1f{key}\x1f{window_end_ms}")
    )


def iso_ms(epoch_ms: int) -> str:
    return (
        datetime.fromtimestamp(epoch_ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def event_schema(name: str = EVENT_SCHEMA) -> dict:
    return orjson.loads(files("pipeline.schemas").joinpath(name).read_bytes())


def alarm_event(model: ModelIdentity, transition, threshold: float) -> dict:
    """A CloudEvent for an alarm that opened or resolved (an `AlarmTransition`)."""
    return {
        "specversion": "1.0",
        "id": transition.event_id,
        "source": model.source,
        "type": ALARM_TYPES[transition.kind],
        "subject": transition.key,
        "time": iso_ms(transition.time_ms),
        "datacontenttype": "application/json",
        "data": {
            "key": transition.key,
            "episode_id": transition.episode_id,
            "state": transition.kind,
            "start": iso_ms(transition.start_ms),
            "end": None if transition.end_ms is None else iso_ms(transition.end_ms),
            "peak_score": transition.peak_score,
            "peak_time": iso_ms(transition.peak_ms),
            "threshold": threshold,
            "severity": transition.peak_score / threshold
            if threshold > 0
            else transition.peak_score,
            "windows": transition.windows,
            "anomalous_windows": transition.anomalous_windows,
            "top_features": [
                {"name": name, "error": float(error)} for name, error in transition.top_features
            ],
            "model": {"name": model.name, "version": model.version, "alias": model.alias},
            "source": {"topic": transition.partition[0], "partition": int(transition.partition[1])},
        },
    }


def dead_letter_headers(
    reason: str, detail: str, topic: str, partition: int, offset: int
) -> list[tuple[str, bytes]]:
    """Headers added to a dead letter; the original key, value and headers are kept as they are."""
    return [
        ("aewatch.dlq.reason", reason.encode()),
        ("aewatch.dlq.detail", detail.encode("utf-8", "replace")[:1000]),
        ("aewatch.source.topic", topic.encode()),
        ("aewatch.source.partition", str(partition).encode()),
        ("aewatch.source.offset", str(offset).encode()),
    ]

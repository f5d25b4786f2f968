"""What events are called and how they are identified, shared by the worker and batch scoring.

Event types and their JSON Schemas (`pipeline/schemas/`), the model identity events carry,
deterministic event ids, timestamps, and the headers of a dead letter. Event ids are uuid5 of
(model name, model version, key, window end), so a replay after a restart or rebalance produces
the same ids and consumers can deduplicate; `aewatch score` writes the same id for a window. The
worker builds and sends every event in `pipeline.worker.writer`.
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
    "DRIFT_SCHEMA",
    "DRIFT_TYPE",
    "EVENT_SCHEMA",
    "EVENT_TYPE",
    "ModelIdentity",
    "dead_letter_headers",
    "drift_event_id",
    "event_id",
    "event_schema",
    "iso_ms",
]

EVENT_TYPE = "aewatch.anomaly.v1"
EVENT_SCHEMA = "anomaly-event.v1.schema.json"
ALARM_TYPES = {"opened": "aewatch.alarm.opened", "resolved": "aewatch.alarm.resolved"}
ALARM_SCHEMA = "alarm-event.v1.schema.json"
DRIFT_TYPE = "aewatch.drift.v1"
DRIFT_SCHEMA = "drift-event.v1.schema.json"
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


def drift_event_id(model: ModelIdentity, key: str, time_ms: int) -> str:
    return str(
        uuid.uuid5(_NAMESPACE, f"drift\x1f{model.name}\x1f{model.version}\x1f{key}\x1f{time_ms}")
    )


def iso_ms(epoch_ms: int) -> str:
    return (
        datetime.fromtimestamp(epoch_ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def event_schema(name: str = EVENT_SCHEMA) -> dict:
    return orjson.loads(files("pipeline.schemas").joinpath(name).read_bytes())


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

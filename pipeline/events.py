"""What events are called and how they are identified, shared by the worker and batch scoring.

Event types and their JSON Schemas (`pipeline/schemas/`), the model identity events carry,
deterministic event ids, timestamps, and the headers of a dead letter. Event ids are uuid5 of
(model name, model version, key, window end), so a replay after a restart or rebalance produces
the same ids and consumers can deduplicate; `aewatch score` writes the same id for a window. The
worker builds and sends every event in `pipeline.worker.writer`.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.resources import files

import numpy as np
import orjson

__all__ = [
    "ALARM_SCHEMA",
    "ALARM_RESOLVED_BY",
    "ALARM_TYPES",
    "DRIFT_SCHEMA",
    "DRIFT_TYPE",
    "EVENT_SCHEMA",
    "EVENT_TYPE",
    "ModelIdentity",
    "dead_letter_headers",
    "drift_event_id",
    "event_id",
    "event_ids",
    "event_schema",
    "iso_ms",
    "iso_ms_many",
]

EVENT_TYPE = "aewatch.anomaly.v1"
EVENT_SCHEMA = "anomaly-event.v1.schema.json"
ALARM_TYPES = {"opened": "aewatch.alarm.opened", "resolved": "aewatch.alarm.resolved"}
ALARM_SCHEMA = "alarm-event.v1.schema.json"
# Kafka header of a resolved alarm event: "windows" (normal windows resolved it) or "silence"
# (its key was forgotten after `--key-ttl-s` of silence, `pipeline.worker.alarms`)
ALARM_RESOLVED_BY = "aewatch.alarm.resolved_by"
DRIFT_TYPE = "aewatch.drift.v1"
DRIFT_SCHEMA = "drift-event.v1.schema.json"
_NAMESPACE = uuid.UUID("6f6e1a52-8b3b-4e1e-9a55-616577617463")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    version: str
    alias: str | None = None

    @property
    def source(self) -> str:
        return f"/aewatch/models/{self.name}/{self.version}"


def event_id(model: ModelIdentity, key: str, window_end_ms: int) -> str:
    return event_ids(model, [key], [window_end_ms])[0]


def event_ids(model: ModelIdentity, keys: Iterable[str], window_ends_ms: Iterable[int]) -> list:
    """`event_id` of each (key, window end)."""
    names = (f"{key}\x1f{end}" for key, end in zip(keys, window_ends_ms, strict=True))
    return _uuid5(f"{model.name}\x1f{model.version}\x1f", names)


def drift_event_id(model: ModelIdentity, key: str, time_ms: int, pooled: bool = False) -> str:
    """The pooled statistic's crossings are named `*`; a key's by its key, set apart when the key
    is itself `*`."""
    name = "*" if pooled else ("\x1e*" if key == "*" else key)
    return _uuid5(f"drift\x1f{model.name}\x1f{model.version}\x1f", [f"{name}\x1f{time_ms}"])[0]


def _uuid5(prefix: str, names: Iterable[str]) -> list:
    """`str(uuid.uuid5(_NAMESPACE, prefix + name))` of each name, without a `UUID` object each:
    the SHA-1 digests' version and variant bits are set on all of them at once."""
    head = hashlib.sha1(_NAMESPACE.bytes + prefix.encode(), usedforsecurity=False)
    digests = []
    for name in names:
        sha = head.copy()
        sha.update(name.encode())
        digests.append(sha.digest())
    if not digests:
        return []
    raw = np.frombuffer(b"".join(digests), np.uint8).reshape(-1, 20)[:, :16].copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x50  # version 5
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    text = raw.tobytes().hex()
    return [
        f"{text[i : i + 8]}-{text[i + 8 : i + 12]}-{text[i + 12 : i + 16]}-"
        f"{text[i + 16 : i + 20]}-{text[i + 20 : i + 32]}"
        for i in range(0, len(text), 32)
    ]


def iso_ms(epoch_ms: int) -> str:
    """RFC 3339 UTC with milliseconds, exact (integer arithmetic, no float seconds)."""
    moment = _EPOCH + timedelta(milliseconds=int(epoch_ms))
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_ms_many(epoch_ms: np.ndarray) -> list:
    """`iso_ms` of each epoch-ms value, in one numpy conversion."""
    stamps = np.asarray(epoch_ms, np.int64).astype("datetime64[ms]")
    return [f"{text}Z" for text in np.datetime_as_string(stamps, unit="ms").tolist()]


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

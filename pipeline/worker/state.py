"""Per-key state that survives a restart, kept in a compacted Kafka topic.

At every checkpoint the worker writes one record per input partition it touched, keyed
`topic:partition`, holding each stage's per-key state by the stage's name:

- `resume`: each key's resume point, the series position and offset of the oldest reading a
  future window still needs (see `pipeline.modalities.windowing`);
- `alarms`: each key's alarm history and open episode (see `pipeline.worker.alarms`);
- `adaptive`: each key's adaptive likelihood and detection rule, packed, with the model version
  they were learnt under (see `pipeline.detector.adaptive_stage`).

The record is produced before the offsets are committed (same flush, or same transaction), so
the state is never older than the commit. A member that is assigned a partition reads the latest
record for it and hands each stage its part: windows skip readings before each key's resume
offset and continue their positions, giving the same windows and event ids as an uninterrupted
run; open alarm episodes continue. A stage added later stores its part under a name of its own;
records without it restore that stage empty.
"""

from __future__ import annotations

from typing import Protocol

import orjson

__all__ = [
    "KafkaStateStore",
    "KeyedState",
    "MemoryStateStore",
    "StateStore",
    "decode_state",
    "encode_state",
]

Partition = tuple[str, int]
FORMAT_VERSION = 1


class KeyedState(Protocol):
    """A stage that keeps per-key state for the partitions this member owns."""

    def state(self, partition: Partition) -> dict:
        """JSON-ready state of the partition's keys."""

    def restore(self, partition: Partition, saved: dict) -> None:
        """Replace the partition's keys with what `state` saved."""

    def forget(self, partitions: set[Partition]) -> None: ...


def _key(partition: Partition) -> bytes:
    return f"{partition[0]}:{partition[1]}".encode()


def encode_state(parts: dict[str, dict]) -> bytes:
    """A partition's record: `{"v": 1, "resume": {...}, "alarms": {...}, ...}`."""
    resume, alarms = parts.get("resume") or {}, parts.get("alarms") or {}
    others = {k: v for k, v in parts.items() if k not in ("resume", "alarms")}
    return orjson.dumps({"v": FORMAT_VERSION, "resume": resume, "alarms": alarms, **others})


def decode_state(value: bytes) -> dict[str, dict]:
    data = orjson.loads(value)
    parts = {k: v for k, v in data.items() if k != "v" and isinstance(v, dict)}
    parts["resume"] = {
        k: tuple(int(x) for x in point) for k, point in (data.get("resume") or {}).items()
    }
    return parts


class StateStore(Protocol):
    def load(self, partitions: set[Partition]) -> dict[Partition, dict[str, dict]]: ...
    def save(self, partition: Partition, parts: dict[str, dict]) -> None: ...


class MemoryStateStore:
    """In-memory state for tests of the loop logic."""

    def __init__(self) -> None:
        self.records: dict[Partition, bytes] = {}

    def load(self, partitions: set[Partition]) -> dict[Partition, dict[str, dict]]:
        return {p: decode_state(self.records[p]) for p in partitions if p in self.records}

    def save(self, partition: Partition, parts: dict[str, dict]) -> None:
        self.records[partition] = encode_state(parts)


class KafkaStateStore:
    """State records go out through the worker's producer (flushed, or committed in the same
    transaction, before the offsets are committed)."""

    def __init__(self, sink, read_latest, topic: str) -> None:
        self.sink, self.read_latest, self.topic = sink, read_latest, topic

    def load(self, partitions: set[Partition]) -> dict[Partition, dict[str, dict]]:
        wanted = {_key(p): p for p in partitions}
        latest = self.read_latest(self.topic, list(wanted))
        return {wanted[k]: decode_state(v) for k, v in latest.items()}

    def save(self, partition: Partition, parts: dict[str, dict]) -> None:
        self.sink.send(self.topic, key=_key(partition), value=encode_state(parts))

"""Window positions that survive a restart, kept in a compacted Kafka topic.

At every checkpoint the worker writes, per input partition, each key's resume point: the series
position and offset of the oldest reading a future window still needs. The record is produced
before the offsets are committed (same flush), so the state is never older than the commit. A
member that is assigned a partition reads the latest record for it, then skips readings before
each key's resume offset and continues its positions, giving the same windows and event ids as
an uninterrupted run. The same record carries the alarm state of the partition's keys (see
`pipeline.worker.alarms`), so open episodes continue across a restart or a rebalance.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import orjson

__all__ = ["KafkaStateStore", "MemoryStateStore", "PartitionState", "StateStore"]

Partition = tuple[str, int]
Resume = dict[str, tuple[int, ...]]  # key -> (position, offset, done)


class PartitionState(NamedTuple):
    resume: Resume
    alarms: dict[str, dict]


def _key(partition: Partition) -> bytes:
    return f"{partition[0]}:{partition[1]}".encode()


def encode_state(resume: Resume, alarms: dict[str, dict] | None = None) -> bytes:
    return orjson.dumps(
        {"v": 1, "resume": {k: list(point) for k, point in resume.items()}, "alarms": alarms or {}}
    )


def decode_state(value: bytes) -> PartitionState:
    data = orjson.loads(value)
    resume = {k: tuple(int(x) for x in point) for k, point in data.get("resume", {}).items()}
    return PartitionState(resume, data.get("alarms") or {})


class StateStore(Protocol):
    def load(self, partitions: set[Partition]) -> dict[Partition, PartitionState]: ...
    def save(
        self, partition: Partition, resume: Resume, alarms: dict[str, dict] | None = None
    ) -> None: ...


class MemoryStateStore:
    """In-memory state for tests of the loop logic."""

    def __init__(self) -> None:
        self.records: dict[Partition, bytes] = {}

    def load(self, partitions: set[Partition]) -> dict[Partition, PartitionState]:
        return {p: decode_state(self.records[p]) for p in partitions if p in self.records}

    def save(self, partition: Partition, resume: Resume, alarms=None) -> None:
        self.records[partition] = encode_state(resume, alarms)


class KafkaStateStore:
    """State records go out through the worker's producer (flushed, or committed in the same
    transaction, before the offsets are committed)."""

    def __init__(self, sink, read_latest, topic: str) -> None:
        self.sink, self.read_latest, self.topic = sink, read_latest, topic

    def load(self, partitions: set[Partition]) -> dict[Partition, PartitionState]:
        wanted = {_key(p): p for p in partitions}
        latest = self.read_latest(self.topic, list(wanted))
        return {wanted[k]: decode_state(v) for k, v in latest.items()}

    def save(self, partition: Partition, resume: Resume, alarms=None) -> None:
        self.sink.send(self.topic, key=_key(partition), value=encode_state(resume, alarms))

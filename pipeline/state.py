"""Window positions that survive a restart, kept in a compacted Kafka topic.

At every checkpoint the worker writes, per input partition, each key's resume point: the series
position and offset of the oldest reading a future window still needs. The record is produced
before the offsets are committed (same flush), so the state is never older than the commit. A
member that is assigned a partition reads the latest record for it, then skips readings before
each key's resume offset and continues its positions, giving the same windows and event ids as
an uninterrupted run.
"""

from __future__ import annotations

from typing import Protocol

import orjson

__all__ = ["KafkaStateStore", "MemoryStateStore", "StateStore"]

Partition = tuple[str, int]
Resume = dict[str, tuple[int, int]]


def _key(partition: Partition) -> bytes:
    return f"{partition[0]}:{partition[1]}".encode()


def encode_state(resume: Resume) -> bytes:
    return orjson.dumps({"v": 1, "resume": {k: [p, o] for k, (p, o) in resume.items()}})


def decode_state(value: bytes) -> Resume:
    data = orjson.loads(value)
    return {k: (int(p), int(o)) for k, (p, o) in data.get("resume", {}).items()}


class StateStore(Protocol):
    def load(self, partitions: set[Partition]) -> dict[Partition, Resume]: ...
    def save(self, partition: Partition, resume: Resume) -> None: ...


class MemoryStateStore:
    """In-memory state for tests of the loop logic."""

    def __init__(self) -> None:
        self.records: dict[Partition, bytes] = {}

    def load(self, partitions: set[Partition]) -> dict[Partition, Resume]:
        return {p: decode_state(self.records[p]) for p in partitions if p in self.records}

    def save(self, partition: Partition, resume: Resume) -> None:
        self.records[partition] = encode_state(resume)


class KafkaStateStore:
    """State records go out through the worker's producer (flushed before each commit)."""

    def __init__(self, sink, read_latest, topic: str) -> None:
        self.sink, self.read_latest, self.topic = sink, read_latest, topic

    def load(self, partitions: set[Partition]) -> dict[Partition, Resume]:
        wanted = {_key(p): p for p in partitions}
        latest = self.read_latest(self.topic, list(wanted))
        return {wanted[k]: decode_state(v) for k, v in latest.items()}

    def save(self, partition: Partition, resume: Resume) -> None:
        self.sink.send(self.topic, key=_key(partition), value=encode_state(resume))

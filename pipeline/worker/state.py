"""Per-key state that survives a restart, kept in a compacted Kafka topic.

At every checkpoint the worker writes one record per input partition it touched, keyed
`topic:partition`, holding each stage's per-key state by the stage's name:

- `resume`: each key's resume point, the series position and offset of the oldest reading a
  future window still needs (see `pipeline.modalities.windowing`);
- `parked`: the held readings of keys far behind their partition's newest reading, which no
  longer hold the commit back (see `pipeline.modalities.parking`);
- `alarms`: each key's alarm history and open episode (see `pipeline.worker.alarms`);
- `adaptive`: each key's adaptive likelihood and detection rule, packed, with the model version
  they were learnt under (see `pipeline.detector.adaptive_stage`).

The record is produced before the offsets are committed (same flush, or same transaction), so
the state is never older than the commit. A member that is assigned a partition reads the latest
record for it and hands each stage its part: windows skip readings before each key's resume
offset and continue their positions, giving the same windows and event ids as an uninterrupted
run; open alarm episodes continue. A stage added later stores its part under a name of its own;
records without it restore that stage empty.

A record that cannot be read (not this layout, or a part its stage refuses) is refused for its
partition alone, with one error line naming it: the partition's keys start afresh from the
committed offset (windows from there are emitted again, with the same event ids where positions
agree; adaptive and alarm state warm up again), and the next checkpoint writes a good record over
it. The other partitions restore as usual, and the member does not stop.
"""

from __future__ import annotations

from typing import Protocol

import orjson

__all__ = [
    "STATE_RECORD_MAX",
    "STATE_TOPIC",
    "KafkaStateStore",
    "KeyedState",
    "MemoryStateStore",
    "StateStore",
    "decode_state",
    "encode_state",
]

Partition = tuple[str, int]
FORMAT_VERSION = 1
# A partition's record holds a few hundred bytes a key (resume point, adaptive and alarm state):
# past a few thousand keys a partition it outgrows Kafka's default 1 MB message limit, so the
# state topic is created with room for this much, and the producer sends records this large.
STATE_RECORD_MAX = 16 << 20
STATE_TOPIC = {
    "topic_configs": {
        "cleanup.policy": "compact",
        "max.message.bytes": str(STATE_RECORD_MAX + (64 << 10)),
        # compacted segment by segment: smaller segments keep what a restoring member reads small
        "segment.bytes": str(64 << 20),
    }
}


class KeyedState(Protocol):
    """A stage that keeps per-key state for the partitions this member owns."""

    def state(self, partition: Partition) -> dict:
        """JSON-ready state of the partition's keys."""

    def restore(self, partition: Partition, saved: dict) -> None:
        """Replace the partition's keys with what `state` saved."""

    def drop(self, partition: Partition, keys) -> None:
        """Forget these keys of the partition: silent for long (`pipeline.modalities.expiry`)."""

    def forget(self, partitions: set[Partition]) -> None: ...


def _key(partition: Partition) -> bytes:
    return f"{partition[0]}:{partition[1]}".encode()


def encode_state(parts: dict[str, dict]) -> bytes:
    """A partition's record: `{"v": 1, "resume": {...}, "alarms": {...}, ...}`."""
    resume, alarms = parts.get("resume") or {}, parts.get("alarms") or {}
    others = {k: v for k, v in parts.items() if k not in ("resume", "alarms")}
    return orjson.dumps({"v": FORMAT_VERSION, "resume": resume, "alarms": alarms, **others})


def decode_state(value: bytes) -> dict[str, dict]:
    """A partition's record as each stage's part; ValueError (one line) if it is not one."""
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if data.__class__ is not dict:
        raise ValueError("not a JSON object")
    if (data.get("resume") or {}).__class__ is not dict:
        raise ValueError("'resume' is not an object")
    # each stage checks its own part as it restores it
    return {k: v for k, v in data.items() if k != "v" and isinstance(v, dict)}


class StateStore(Protocol):
    def load(self, partitions: set[Partition]) -> dict[Partition, bytes]:
        """The latest record of each of `partitions` that has one (`decode_state` reads it)."""

    def save(self, partition: Partition, parts: dict[str, dict]) -> int:
        """Write the partition's record; its size in bytes."""


class MemoryStateStore:
    """In-memory state for tests of the loop logic."""

    def __init__(self) -> None:
        self.records: dict[Partition, bytes] = {}

    def load(self, partitions: set[Partition]) -> dict[Partition, bytes]:
        return {p: self.records[p] for p in partitions if p in self.records}

    def save(self, partition: Partition, parts: dict[str, dict]) -> int:
        self.records[partition] = encode_state(parts)
        return len(self.records[partition])


class KafkaStateStore:
    """State records go out through the worker's producer (flushed, or committed in the same
    transaction, before the offsets are committed)."""

    def __init__(self, sink, read_latest, topic: str) -> None:
        self.sink, self.read_latest, self.topic = sink, read_latest, topic

    def load(self, partitions: set[Partition]) -> dict[Partition, bytes]:
        wanted = {_key(p): p for p in partitions}
        latest = self.read_latest(self.topic, list(wanted))
        return {wanted[k]: v for k, v in latest.items()}

    def save(self, partition: Partition, parts: dict[str, dict]) -> int:
        value = encode_state(parts)
        if len(value) > STATE_RECORD_MAX:
            raise ValueError(
                f"the state record of {partition[0]}:{partition[1]} is {len(value)} bytes, over "
                f"{STATE_RECORD_MAX}: spread its keys over more partitions, or forget silent ones "
                "sooner (--key-ttl-s)"
            )
        self.sink.send(self.topic, key=_key(partition), value=value)
        return len(value)

"""Parked keys: readings of unfinished windows kept in the state record instead of the input topic.

A key's resume point is the offset of the oldest reading its next window needs, and a partition's
commit is the smallest resume point of its keys (`pipeline.worker.checkpoint`). One key that goes
silent, or sends one reading for thousands of the others', would hold the commit back for as long
as it stays so: the group's lag grows without end, and a restart reads everything since again, or
finds it deleted by the topic's retention.

So a key whose oldest needed reading lies more than `reread_max` records behind the newest
reading taken on its partition (the partition's head) is parked: its held readings (at most W - 1,
with their timestamps and offsets) go into the partition's state record under `parked`, and its
resume point no longer holds the commit back. Keys are parked furthest behind first, while the
partition's parked readings take at most `PARKED_BYTES` of the record (`36 + 6 F` bytes a
reading at most), so that a state record stays well below Kafka's default 1 MB message limit;
keys beyond that still hold the commit back.

A member that restores a parked key puts its readings back in the key's row when the key's next
reading comes, and skips the key's readings before its latest one, which were taken already: its
windows, their positions and their event ids are those of an uninterrupted run. The record's part:

    {"head": 1234567, "keys": {"pump-7": {"next": 1001, "ts": [...], "offsets": [...],
                                          "values": "<base64 of float32, readings x features>"}}}
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from pipeline.modalities.windowing import StreamWindower

__all__ = [
    "PARKED_BYTES",
    "REREAD_MAX",
    "ParkedKeys",
    "Tail",
    "parked",
    "partition_head",
    "unpark",
]

Partition = tuple[str, int]
REREAD_MAX = 100_000  # records of a partition a restart reads again, at most, by default
PARKED_BYTES = 1 << 18  # of a partition's state record its parked readings take at most
_READING_BYTES = 36  # a parked reading's timestamp and offset, at most, and 6 bytes a value
_LIMIT = 2**62  # offsets and timestamps lie below it (and no timestamp reaches it)


class Tail(NamedTuple):
    """A parked key's held readings: timestamps, offsets, values [n, F], and the offset after its
    latest reading."""

    partition: Partition
    ts: np.ndarray
    offsets: np.ndarray
    values: np.ndarray
    next_offset: int

    def encode(self) -> dict:
        raw = np.ascontiguousarray(self.values, "<f4").tobytes()
        return {
            "next": self.next_offset,
            "ts": self.ts.tolist(),
            "offsets": self.offsets.tolist(),
            "values": base64.b64encode(raw).decode("ascii"),
        }

    @classmethod
    def decode(cls, partition: Partition, key: str, saved, features: int, most: int) -> Tail:
        """A parked key's part of a state record; ValueError (one line) for anything else."""
        try:
            if saved.__class__ is not dict:
                raise ValueError("not an object")
            ts, offsets, nxt = saved["ts"], saved["offsets"], saved["next"]
            ints = [nxt, *ts, *offsets]
            if any(x.__class__ is not int or not 0 <= x < _LIMIT for x in ints):
                raise ValueError("'next', 'ts' and 'offsets' must be counts")
            raw = base64.b64decode(saved["values"], validate=True)
            values = np.frombuffer(raw, "<f4").astype(np.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"parked readings of key {key!r} refused: {exc}") from None
        ts, offsets = np.array(ts, np.int64), np.array(offsets, np.int64)
        n = len(ts)
        if not (
            0 < n <= most
            and len(offsets) == n
            and len(values) == n * features
            and (np.diff(ts) > 0).all()
            and (np.diff(offsets) >= 0).all()
            and offsets[-1] < nxt
        ):
            raise ValueError(
                f"parked readings of key {key!r} refused: {n} readings, {len(offsets)} offsets, "
                f"{len(values)} values of {features} features, at most {most} readings, "
                "timestamps increasing, offsets before 'next'"
            )
        return cls(partition, ts, offsets, values.reshape(n, features), nxt)


class ParkedKeys:
    """The `parked` part of a partition's state record (a `KeyedState` of the worker's
    checkpoint), for the keys of one `StreamWindower`."""

    def __init__(self, windower: StreamWindower) -> None:
        self.windower = windower

    def state(self, partition: Partition) -> dict:
        w = self.windower
        keys = {k: t.encode() for k, t in w.tails.items() if t.partition == partition}
        slots = w._of(partition)
        if len(slots):
            held, position, offset, _ = w._oldest(slots)
            for i in np.flatnonzero(parked(w, partition, slots, held, position, offset)).tolist():
                slot = int(slots[i])
                fill = int(w.fill[slot])
                first = fill - int(w.count[slot] - position[i])  # its oldest needed reading
                tail = Tail(
                    partition,
                    w.ts[slot, first:fill],
                    w.offsets[slot, first:fill],
                    w.values[slot, first:fill],
                    int(w.next_offset[slot]),
                )
                keys[w._keys[slot]] = tail.encode()
        if not keys:
            return {}
        return {"head": w.heads.get(partition, 0), "keys": keys}

    def restore(self, partition: Partition, saved: dict) -> None:
        """Parked keys of `partition`, after their resume points (`StreamWindower.restore`);
        ValueError for a part that is not one."""
        if not saved:
            return
        w = self.windower
        head, keys = saved.get("head"), saved.get("keys")
        if head.__class__ is not int or not 0 <= head < _LIMIT or keys.__class__ is not dict:
            raise ValueError("parked part is not {'head': count, 'keys': {...}}")
        most = w.spec.length - 1
        tails = {
            key: Tail.decode(partition, key, value, w.n_features, most)
            for key, value in keys.items()
        }
        for key, tail in tails.items():
            point = w._restored.get(key)
            if point is not None and point[0] == partition and point[2] == int(tail.offsets[0]):
                w.tails[key] = tail  # a key seen already, or without its resume point, stays so
        w.heads[partition] = max(w.heads.get(partition, 0), head)

    def drop(self, partition: Partition, keys) -> None:
        pass  # the windower's `expire` drops them with the rest of their state

    def forget(self, partitions: set[Partition]) -> None:
        pass  # the windower's own `forget` drops them with the rest of the partitions' keys


def parked(
    windower: StreamWindower, partition: Partition, slots, held, position, offset
) -> np.ndarray:
    """Of `slots` (a partition's, with `held` and the series `position` and `offset` of their
    oldest needed reading, as `StreamWindower._oldest` gives them): those parked, furthest
    behind first, within `PARKED_BYTES` with the restored ones."""
    w = windower
    head = w.heads[partition] = partition_head(w, partition, slots)
    out = np.zeros(len(slots), bool)
    far = np.flatnonzero(held & (offset < head - w.reread_max))
    if not len(far):
        return out
    far = far[np.argsort(offset[far], kind="stable")]
    size = _READING_BYTES + 6 * w.n_features
    kept = (w.count[slots] - position)[far] * size  # held readings: from the oldest needed on
    restored = sum(len(t.ts) for t in w.tails.values() if t.partition == partition) * size
    out[far[np.cumsum(kept) + restored <= PARKED_BYTES]] = True
    return out


def partition_head(windower: StreamWindower, partition: Partition, slots) -> int:
    """The offset after the newest reading taken on `partition` (its keys' `slots` given)."""
    return max(windower.heads.get(partition, 0), int(windower.next_offset[slots].max()))


def unpark(windower: StreamWindower, slot: int, tail: Tail, position: int) -> None:
    """A restored parked key's readings back in its row (`slot`), from series `position`; its
    readings up to its latest one, which were taken already, are skipped when read again."""
    w, n = windower, len(tail.ts)
    w.values[slot, :n], w.ts[slot, :n], w.offsets[slot, :n] = tail.values, tail.ts, tail.offsets
    w.fill[slot], w.count[slot], w.last_ts[slot] = n, position + n, tail.ts[-1]
    w.next_offset[slot] = tail.next_offset
    w.skip_before[slot], w.skip_ts[slot] = tail.next_offset - 1, _LIMIT

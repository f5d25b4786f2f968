"""Forgotten keys: a key silent for long enough leaves the worker's memory and state record.

A fleet's keys come and go: machines are replaced, devices renamed, containers started with new
names. Every key seen keeps its row of readings (a few KiB) and, in the partition's state record,
its resume point and its adaptive and alarm state (about 400 bytes); without an end, memory grows
with every key ever seen, and a partition's state record reaches its size limit after some 40,000
keys, where the worker stops.

So a key is forgotten, at a checkpoint, when its latest reading lies both

- more than `ttl_ms` of event time behind the newest reading of its partition, and
- more than `reread_max` records behind the partition's head (the parked rule of
  `pipeline.modalities.parking`),

and every stage drops its state (`KeyedState.drop`). The second condition keeps a key that still
sends, whatever its clock says: a device whose clock was reset to 1970 is behind in event time
but not in records. When a forgotten key comes back, it starts afresh, as a key never seen: its
windows begin again with its new readings, and its adaptive state warms up again (`aewatch
score` on a file keeps each key's series whole, so the two differ for such a key). An alarm still
open on a forgotten key resolves first, with its event (`AlarmTracker.resolve_silent`).

A key restored from a state record and not seen since is judged by the timestamp of its oldest
held reading (or, parked, of its latest), and by its resume offset. Image keys follow the same
rule by their latest image (`pipeline.modalities.image.ImageKeys`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.modalities.parking import partition_head

if TYPE_CHECKING:
    from pipeline.modalities.windowing import StreamWindower

__all__ = ["KEY_TTL_S", "expire", "silent"]

Partition = tuple[str, int]
KEY_TTL_S = 7 * 86_400  # a week: longer than any maintenance window a key is expected to keep
_NO_TS = -(2**62)


def silent(last_ts, next_offset, newest: int, head: int, ttl_ms: int, reread_max: int):
    """Which of a partition's keys are silent beyond both limits, the rule of this module: the
    latest reading (`last_ts`, ms) more than `ttl_ms` behind the partition's `newest`, and the
    offset after it (`next_offset`) more than `reread_max` records behind its `head`. A key with
    no reading yet (`_NO_TS`) is not."""
    last_ts, next_offset = np.asarray(last_ts, np.int64), np.asarray(next_offset, np.int64)
    return (last_ts != _NO_TS) & (last_ts < newest - ttl_ms) & (next_offset <= head - reread_max)


def expire(windower: StreamWindower, partition: Partition) -> list[str]:
    """Forget the keys of `partition` silent beyond both limits; returns their names."""
    w = windower
    if w.ttl_ms <= 0:
        return []
    slots = w._of(partition)
    if not len(slots):
        return []
    last = w.last_ts[slots]
    newest = int(last.max())
    if newest == _NO_TS:
        return []
    limits = (newest, partition_head(w, partition, slots), w.ttl_ms, w.reread_max)
    gone = []
    for slot in slots[silent(last, w.next_offset[slots], *limits)].tolist():
        gone.append(w._keys[slot])
        w._free_slot(slot)
    restored = [key for key, point in w._restored.items() if point[0] == partition]
    if restored:
        ts, offsets = np.array([_latest(w, key) for key in restored], np.int64).T
        for key in np.asarray(restored, object)[silent(ts, offsets, *limits)].tolist():
            del w._restored[key]
            w.tails.pop(key, None)
            gone.append(key)
    return gone


def _latest(w: StreamWindower, key: str) -> tuple[int, int]:
    """A restored key's latest reading: its parked tail's, else its saved resume point's."""
    tail, point = w.tails.get(key), w._restored[key]
    if tail is not None:
        return int(tail.ts[-1]), tail.next_offset
    return point[4], point[2]

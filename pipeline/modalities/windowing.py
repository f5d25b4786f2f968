"""Per-key stream windows: the training job's window rule applied to readings as they arrive.

Each key keeps the readings a future window still needs (its "tail"), with their positions in the
key's series and their Kafka offsets, in its own row of one shared store ([keys, capacity, F]).
A partition's batch of readings is processed for all its keys at once with numpy: order checks,
one scatter of the new readings into their keys' rows, the window ends they complete (position t
ends a window when t + 1 >= W and (t + 1 - W) % S == 0, exactly as `pipeline.detector.windows`),
and one gather of those windows. A key's row is compacted (the readings no window needs any more
dropped) only when it is full, so kept readings are not copied on every batch. Python work per
reading is limited to numbering its key.

Ordering policy: per key, timestamps must increase. A reading older than the key's latest is
`out_of_order`, one with the same timestamp a `duplicate_timestamp`; neither enters a window.

Size: over 400 lines because the batch step and the restart state it keeps are one structure; the
parked and forgotten keys live in `parking` and `expiry`.

Restart: a key's resume point is the position and offset of the oldest reading it still needs,
and the position after the latest reading it took (windows ending before it were emitted).
Stored with each commit (see `pipeline.worker.state`), it lets a restarted worker skip what was already
processed and continue the same series positions, so windows, and event ids, are the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.detector import WindowSpec
from pipeline.modalities.expiry import KEY_TTL_S, expire
from pipeline.modalities.parking import REREAD_MAX, ParkedKeys, Tail, parked, unpark

__all__ = ["ReadyWindows", "StreamWindower"]

TopicPartition = tuple[str, int]
_NONE = np.zeros(0, np.int64)
_NO_TS = -(2**62)
RESUME_LIMIT = 2**62  # series positions and offsets of a resume point lie below it
# New readings a key's row takes at least between two compactions (more come in rounds).
ROOM = 128


@dataclass
class ReadyWindows:
    """Windows completed by a batch, with where they came from. `keys`, `partitions` and
    `counts` describe groups of consecutive windows of one key; the arrays hold the windows."""

    windows: list[np.ndarray] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    start_ts: list[np.ndarray] = field(default_factory=list)
    end_ts: list[np.ndarray] = field(default_factory=list)
    partitions: list[TopicPartition] = field(default_factory=list)
    first_offsets: list[np.ndarray] = field(default_factory=list)
    last_offsets: list[np.ndarray] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(self.counts)

    def without(self, partitions: set) -> ReadyWindows:
        """These windows less those of `partitions`."""
        gone = np.fromiter((p in partitions for p in self.partitions), bool, len(self.partitions))
        if not gone.any():
            return self
        out = ReadyWindows()
        kept = np.repeat(~gone, self.counts)
        if kept.any():
            for name in ("windows", "start_ts", "end_ts", "first_offsets", "last_offsets"):
                getattr(out, name).append(np.concatenate(getattr(self, name))[kept])
        for name in ("keys", "partitions", "counts"):
            setattr(out, name, [v for v, g in zip(getattr(self, name), gone, strict=True) if not g])
        return out

    def add(self, window: np.ndarray, key: str, start_ms: int, end_ms: int, partition, offset):
        """One window (or image) that a single record holds."""
        self.windows.append(window[None])
        self.keys.append(key)
        self.start_ts.append(np.array([start_ms], np.int64))
        self.end_ts.append(np.array([end_ms], np.int64))
        self.partitions.append(partition)
        first = last = np.array([offset], np.int64)
        self.first_offsets.append(first)
        self.last_offsets.append(last)
        self.counts.append(1)


class StreamWindower:
    """Every key's kept readings and series state, one slot (row of the store) per key."""

    def __init__(
        self,
        spec: WindowSpec,
        n_features: int,
        reread_max: int = REREAD_MAX,
        key_ttl_s: float = KEY_TTL_S,
    ) -> None:
        self.spec = spec
        self.n_features = n_features
        self.reread_max = reread_max  # see `pipeline.modalities.parking`
        self.ttl_ms = int(key_ttl_s * 1000)  # see `pipeline.modalities.expiry`
        self.tails: dict[str, Tail] = {}  # restored parked keys, until their next reading
        self.heads: dict[TopicPartition, int] = {}  # offset after the newest reading taken
        self.parked = ParkedKeys(self)
        # a key keeps at most W - 1 readings after compaction; the rest of its row takes new ones
        self.capacity = spec.length - 1 + max(spec.length + spec.stride + 1, ROOM)
        self.slots: dict[str, int] = {}
        self._keys: list[str | None] = []
        self._owners: dict[TopicPartition, int] = {}  # a number for each partition, from 1
        self._free: list[int] = []
        self._restored: dict[str, tuple[TopicPartition, int, int, int, int]] = {}
        # per slot: its row of readings, and (filled in when a key takes the slot) its state
        self.values = np.zeros((0, self.capacity, n_features), np.float32)
        self.ts = np.zeros((0, self.capacity), np.int64)
        self.offsets = np.zeros((0, self.capacity), np.int64)
        self.fill = np.zeros(0, np.int64)  # readings held in the row
        self.count = np.zeros(0, np.int64)  # series position the next reading gets
        self.next_offset = np.zeros(0, np.int64)  # offset after the latest reading taken
        self.skip_before = np.zeros(0, np.int64)  # offsets below were processed before a restart
        self.skip_ts = np.zeros(0, np.int64)  # and readings at that offset older than this
        self.replay_until = np.zeros(0, np.int64)  # windows ending before it were emitted
        self.last_ts = np.zeros(0, np.int64)
        self.owner = np.zeros(0, np.int32)  # the number of its key's partition (0: free)

    _PER_SLOT = (
        "values",
        "ts",
        "offsets",
        "fill",
        "count",
        "next_offset",
        "skip_before",
        "skip_ts",
        "replay_until",
        "last_ts",
        "owner",
    )

    def _grow(self, size: int) -> None:
        """Room for `size` slots; existing ones keep their contents."""
        old = len(self._keys)
        for name in self._PER_SLOT:
            array = getattr(self, name)
            more = np.zeros((size - old, *array.shape[1:]), array.dtype)
            setattr(self, name, np.concatenate([array, more]))
        self._free.extend(range(size - 1, old - 1, -1))
        self._keys.extend([None] * (size - old))

    def _slot(self, key: str, partition: TopicPartition) -> int:
        slot = self.slots.get(key)
        if slot is None:
            if not self._free:
                self._grow(max(16, 2 * len(self._keys)))
            slot = self.slots[key] = self._free.pop()
            self._keys[slot] = key
            self.fill[slot] = self.count[slot] = self.next_offset[slot] = 0
            self.skip_before[slot], self.replay_until[slot] = -1, 0
            self.last_ts[slot] = self.skip_ts[slot] = _NO_TS
            point, tail = self._restored.pop(key, None), self.tails.pop(key, None)
            # a key restored from another partition's state moved (the topic's partitions
            # grew): its resume point names that partition's offsets, so it starts afresh here
            if point is not None and point[0] == partition:
                _, position, offset, done, first_ts = point
                self.count[slot], self.skip_before[slot] = position, offset
                self.skip_ts[slot] = first_ts
                self.next_offset[slot], self.replay_until[slot] = offset, done
                if tail is not None:  # parked: its readings, and everything before them taken
                    unpark(self, slot, tail, position)
        self.owner[slot] = self._owners.setdefault(partition, len(self._owners) + 1)
        return slot

    def _needed(self, slots: np.ndarray) -> np.ndarray:
        """Per slot, the first column of its row a future window needs (may equal its fill)."""
        length, stride = self.spec.length, self.spec.stride
        count = self.count[slots]
        next_end = np.maximum(count, length - 1)
        next_end += (-(next_end + 1 - length)) % stride
        first = count - self.fill[slots]  # series position of column 0
        return np.clip(next_end - length + 1 - first, 0, self.fill[slots])

    def _oldest(self, slots: np.ndarray):
        """Per slot: whether it holds a reading a future window needs, the position, the
        offset and the timestamp of the oldest such reading (else of the next reading to come:
        its offset, and no timestamp)."""
        needed, fill, count = self._needed(slots), self.fill[slots], self.count[slots]
        held = needed < fill
        position = np.where(held, count - fill + needed, count)
        column = np.minimum(needed, self.capacity - 1)
        offset = np.where(held, self.offsets[slots, column], self.next_offset[slots])
        first_ts = np.where(held, self.ts[slots, column], _NO_TS)
        return held, position, offset, first_ts

    # -- restart state ---------------------------------------------------------------------------
    def restore(self, partition: TopicPartition, resume: dict[str, list]) -> None:
        """Resume points (position, offset[, done[, first ts]]) of a partition's keys, from the
        state topic; ValueError for one that is not 2 to 4 integers with its counts and offset
        in [0, 2**62)."""
        for key, point in resume.items():
            if (
                point.__class__ not in (list, tuple)
                or not 2 <= len(point) <= 4
                or any(x.__class__ is not int for x in point)
                or not all(0 <= x < RESUME_LIMIT for x in point[:3])
            ):
                raise ValueError(f"resume point of key {key!r} is not 2 to 4 counts: {point!r}")
            position, offset = point[0], point[1]
            done = point[2] if len(point) > 2 else position
            first_ts = point[3] if len(point) > 3 else _NO_TS
            if key not in self.slots:
                self._restored[key] = (partition, position, offset, done, first_ts)

    def _of(self, partition: TopicPartition) -> np.ndarray:
        """The slots of the partition's keys."""
        number = self._owners.get(partition)
        return np.flatnonzero(self.owner == number) if number else _NONE

    def resume_points(self, partition: TopicPartition) -> dict[str, tuple]:
        """Every key of `partition` this member knows, including restored keys not seen since:
        (position, offset) of the oldest reading still needed (or of the next reading), the
        position after the latest reading taken (windows ending before it are done), and,
        when a reading is held, its timestamp (a batched record read again from its offset
        skips its readings before it)."""
        points = {
            k: v[1:4] if v[4] == _NO_TS else v[1:]
            for k, v in self._restored.items()
            if v[0] == partition
        }
        slots = self._of(partition)
        if not len(slots):
            return points
        _, position, offset, first_ts = self._oldest(slots)
        done = np.maximum(self.count[slots], self.replay_until[slots])
        for slot, p, o, d, t in zip(
            slots.tolist(),
            position.tolist(),
            offset.tolist(),
            done.tolist(),
            first_ts.tolist(),
            strict=True,
        ):
            points[self._keys[slot]] = (p, o, d) if t == _NO_TS else (p, o, d, t)
        return points

    def state(self, partition: TopicPartition) -> dict[str, tuple]:
        """The partition's resume points, as the state topic keeps them."""
        return self.resume_points(partition)

    def oldest_needed(self, partition: TopicPartition) -> int | None:
        """Smallest offset of any reading a key of `partition` still needs (None if none).

        Keys restored from the state topic count too, before their first reading arrives and
        while they catch up to where the previous owner stopped: until then, everything from
        their resume offset is still needed. Parked keys do not: their readings are in the state
        record (`pipeline.modalities.parking`)."""
        needs = [
            point[2]
            for key, point in self._restored.items()
            if point[0] == partition and key not in self.tails
        ]
        slots = self._of(partition)
        if len(slots):
            held, position, offset, _ = self._oldest(slots)
            replaying = self.replay_until[slots] > self.count[slots]
            needed = (held | replaying) & ~parked(self, partition, slots, held, position, offset)
            needs += offset[needed].tolist()
        return min(needs) if needs else None

    def parts(self) -> dict:
        """Every holder of this per-key state, by its name in the state record."""
        return {"resume": self, "parked": self.parked}

    def expire(self, partition: TopicPartition) -> list[str]:
        """Forget the partition's long-silent keys (`pipeline.modalities.expiry`): their names."""
        return expire(self, partition)

    def drop(self, partition: TopicPartition, keys) -> None:
        pass  # `expire` has dropped them

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Drop keys of partitions this member no longer owns."""
        numbers = [self._owners[p] for p in partitions if p in self._owners]
        for slot in np.flatnonzero(np.isin(self.owner, numbers)).tolist():
            self._free_slot(slot)
        self._restored = {k: v for k, v in self._restored.items() if v[0] not in partitions}
        self.tails = {k: v for k, v in self.tails.items() if v.partition not in partitions}
        self.heads = {p: h for p, h in self.heads.items() if p not in partitions}

    def _free_slot(self, slot: int) -> None:
        del self.slots[self._keys[slot]]
        self._keys[slot], self.owner[slot] = None, 0
        self._free.append(slot)

    # -- the batch step --------------------------------------------------------------------------
    def push(
        self,
        partition: TopicPartition | Mapping[str, TopicPartition],
        keys: Sequence[str],
        ts: np.ndarray,
        values: np.ndarray,
        offsets: np.ndarray,
        out: ReadyWindows,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Add readings (arrival order; reading i belongs to `keys[i]`) of one partition, or of
        several with `partition` the partition of each key, and collect the windows they
        complete, grouped by key.

        Returns (index of readings rejected as out of order, index rejected as duplicates), into
        the arrays given. Readings before a restored key's resume offset are skipped silently.
        """
        n = len(ts)
        if n == 0:
            return _NONE, _NONE
        ids: dict[str, int] = {}
        code = np.array([ids.setdefault(k, len(ids)) for k in keys], np.int64)
        names = list(ids)
        if isinstance(partition, Mapping):
            owners = [partition[name] for name in names]
        else:
            owners = [partition] * len(names)
        slots = np.array(list(map(self._slot, names, owners)), np.int64)
        index = np.argsort(code, kind="stable") if len(names) > 1 else np.arange(n)
        code, ts, offsets = code[index], ts[index], offsets[index]
        values = values[index].astype(np.float32, copy=False)

        skip = self.skip_before[slots]
        if (skip >= 0).any():  # read again after a restart: what was processed before is skipped
            fresh = (offsets > skip[code]) | (
                (offsets == skip[code]) & (ts >= self.skip_ts[slots][code])
            )
            if not fresh.all():
                keep = np.flatnonzero(fresh)
                index, code, ts, values, offsets = (
                    a[keep] for a in (index, code, ts, values, offsets)
                )
            self.skip_before[slots[np.unique(code)]] = -1  # past it: the rest is all new
        late, duplicate, ok = _order(self.last_ts[slots], code, ts)
        late, duplicate = np.sort(index[late]), np.sort(index[duplicate])
        if ok is not None:
            code, ts, values, offsets = code[ok], ts[ok], values[ok], offsets[ok]
        if len(ts):
            taken = np.bincount(code, minlength=len(slots))
            rank = np.arange(len(ts)) - (np.cumsum(taken) - taken)[code]
            # a row takes at most `room` new readings at a time: more come in further rounds
            room = self.capacity - self.spec.length + 1
            for low in range(0, int(taken.max()), room):
                part = np.flatnonzero((rank >= low) & (rank < low + room))
                self._take(
                    owners,
                    names,
                    slots,
                    code[part],
                    rank[part] - low,
                    ts[part],
                    values[part],
                    offsets[part],
                    out,
                )
        return late, duplicate

    def _take(self, owners, names, slots, code, rank, ts, values, offsets, out) -> None:
        """At most `capacity - W + 1` new readings per key, grouped by key, in time order."""
        length, stride = self.spec.length, self.spec.stride
        taken = np.bincount(code, minlength=len(slots))
        full = np.flatnonzero(self.fill[slots] + taken > self.capacity)
        if len(full):
            self._compact(slots[full])
        slot = slots[code]
        column = self.fill[slot] + rank
        self.values[slot, column] = values
        self.ts[slot, column] = ts
        self.offsets[slot, column] = offsets
        position = self.count[slot] + rank
        # windows that ended before a restart's state was saved were emitted already
        ends = np.flatnonzero(
            (position + 1 >= length)
            & ((position + 1 - length) % stride == 0)
            & (position >= self.replay_until[slot])
        )
        if len(ends):
            at, end = slot[ends], column[ends]
            start = end - (length - 1)
            view = np.lib.stride_tricks.sliding_window_view(self.values, length, axis=1)
            out.windows.append(view[at, start].transpose(0, 2, 1))
            out.start_ts.append(self.ts[at, start])
            out.end_ts.append(self.ts[at, end])
            out.first_offsets.append(self.offsets[at, start])
            out.last_offsets.append(self.offsets[at, end])
            per_key = np.bincount(code[ends], minlength=len(slots))
            with_windows = np.flatnonzero(per_key)
            out.keys.extend(names[j] for j in with_windows)
            out.counts.extend(per_key[with_windows].tolist())
            out.partitions.extend(owners[j] for j in with_windows)
        last = np.cumsum(taken) - 1  # each key's latest reading (rows are grouped by key)
        touched = np.flatnonzero(taken)
        at = slots[touched]
        self.fill[at] += taken[touched]
        self.count[at] += taken[touched]
        self.last_ts[at] = ts[last[touched]]
        self.next_offset[at] = offsets[last[touched]] + 1

    def _compact(self, slots: np.ndarray) -> None:
        """Drop from these rows the readings no future window needs."""
        drop = self._needed(slots)
        columns = np.minimum(np.arange(self.capacity)[None, :] + drop[:, None], self.capacity - 1)
        rows = slots[:, None]
        self.values[slots] = self.values[rows, columns]
        self.ts[slots] = self.ts[rows, columns]
        self.offsets[slots] = self.offsets[rows, columns]
        self.fill[slots] -= drop


def _order(last_ts: np.ndarray, code: np.ndarray, ts: np.ndarray):
    """Readings (grouped by key) that are not later than everything before them of their key:
    (late, duplicate, mask of the good ones or None when all are good)."""
    previous = np.empty_like(ts)
    first = np.ones(len(ts), bool)
    first[1:] = code[1:] != code[:-1]
    previous[first] = last_ts[code[first]]
    previous[~first] = ts[:-1][~first[1:]]
    bad = ts <= previous
    if not bad.any():
        return _NONE, _NONE, None
    # keys with a reading out of place: compare against the running maximum
    for key in np.unique(code[bad]):
        rows = np.flatnonzero(code == key)
        previous[rows] = np.maximum.accumulate(np.concatenate([[last_ts[key]], ts[rows]]))[:-1]
    late = np.flatnonzero(ts < previous)
    duplicate = np.flatnonzero(ts == previous)
    return late, duplicate, ts > previous

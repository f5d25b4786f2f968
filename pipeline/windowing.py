"""Per-key stream windows: the training job's window rule applied to readings as they arrive.

Each key keeps only the readings a future window still needs (its "tail"), with their positions
in the key's series and their Kafka offsets. A partition's batch of readings is processed for all
its keys at once with numpy: order checks, the window ends it completes (position t ends a window
when t + 1 >= W and (t + 1 - W) % S == 0, exactly as `pipeline.detector.windows`), and the new
tails. Python work per reading is limited to numbering its key.

Ordering policy: per key, timestamps must increase. A reading older than the key's latest is
`out_of_order`, one with the same timestamp a `duplicate_timestamp`; neither enters a window.

Restart: a key's resume point is the position and offset of the oldest reading it still needs,
and the position after the latest reading it took (windows ending before it were emitted).
Stored with each commit (see `pipeline.state`), it lets a restarted worker skip what was already
processed and continue the same series positions, so windows, and event ids, are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.detector import WindowSpec

__all__ = ["KeyTail", "ReadyWindows", "StreamWindower"]

TopicPartition = tuple[str, int]
_NONE = np.zeros(0, np.int64)


@dataclass
class KeyTail:
    """What one key keeps between batches."""

    partition: TopicPartition
    count: int = 0  # position the next reading gets
    values: np.ndarray | None = None  # [k, F] readings still needed
    ts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    last_ts: int = -(2**62)
    next_offset: int = 0  # offset after the latest reading taken
    skip_before: int = -1  # offsets below this were processed before a restart
    replay_until: int = 0  # windows ending before this position were emitted before a restart

    @property
    def resume(self) -> tuple[int, int, int]:
        """(position, offset) of the oldest reading still needed (or of the next reading), and
        the position after the latest reading taken: windows ending before it are done."""
        done = max(self.count, self.replay_until)
        if len(self.offsets):
            return self.count - len(self.offsets), int(self.offsets[0]), done
        return self.count, self.next_offset, done


@dataclass
class ReadyWindows:
    """Windows completed by a batch, with where they came from."""

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


class StreamWindower:
    def __init__(self, spec: WindowSpec, n_features: int) -> None:
        self.spec = spec
        self.n_features = n_features
        self.tails: dict[str, KeyTail] = {}
        self._restored: dict[str, tuple[TopicPartition, int, int, int]] = {}

    # -- restart state ---------------------------------------------------------------------------
    def restore(self, partition: TopicPartition, resume: dict[str, tuple]) -> None:
        """Resume points (position, offset, done) of a partition's keys, from the state topic."""
        for key, point in resume.items():
            position, offset = int(point[0]), int(point[1])
            done = int(point[2]) if len(point) > 2 else position
            if key not in self.tails:
                self._restored[key] = (partition, position, offset, done)

    def resume_points(self, partition: TopicPartition) -> dict[str, tuple[int, int, int]]:
        """Every key of `partition` this member knows, including restored keys not seen since."""
        points = {k: tuple(v[1:]) for k, v in self._restored.items() if v[0] == partition}
        points.update({k: t.resume for k, t in self.tails.items() if t.partition == partition})
        return points

    def oldest_needed(self, partition: TopicPartition) -> int | None:
        """Smallest offset of any reading a key of `partition` still needs (None if none).

        Keys restored from the state topic count too, before their first reading arrives and
        while they catch up to where the previous owner stopped: until then, everything from
        their resume offset is still needed."""
        heads = [off for tp, _, off, _ in self._restored.values() if tp == partition]
        for tail in self.tails.values():
            if tail.partition != partition:
                continue
            if len(tail.offsets):
                heads.append(int(tail.offsets[0]))
            elif tail.replay_until > tail.count:
                heads.append(tail.next_offset)
        return min(heads) if heads else None

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Drop keys of partitions this member no longer owns."""
        self.tails = {k: t for k, t in self.tails.items() if t.partition not in partitions}
        self._restored = {k: v for k, v in self._restored.items() if v[0] not in partitions}

    def _tail(self, key: str, partition: TopicPartition) -> KeyTail:
        tail = self.tails.get(key)
        if tail is None:
            tail = KeyTail(partition, values=np.zeros((0, self.n_features), np.float32))
            if key in self._restored:
                _, position, offset, done = self._restored.pop(key)
                tail.count, tail.skip_before, tail.next_offset = position, offset, offset
                tail.replay_until = done
            self.tails[key] = tail
        tail.partition = partition
        return tail

    # -- the batch step --------------------------------------------------------------------------
    def push(
        self,
        partition: TopicPartition,
        keys: Sequence[str],
        ts: np.ndarray,
        values: np.ndarray,
        offsets: np.ndarray,
        out: ReadyWindows,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Add one partition's readings (arrival order; reading i belongs to `keys[i]`) and
        collect the windows they complete, grouped by key.

        Every key is handled at once: the readings are grouped by key, each key's tail is placed
        before its new readings in one combined array, and the windows are gathered from it in
        one indexing step, so the cost per batch does not grow with a Python loop per reading
        and little with the number of keys.

        Returns (index of readings rejected as out of order, index rejected as duplicates), into
        the arrays given. Readings before a restored key's resume offset are skipped silently.
        """
        n = len(ts)
        if n == 0:
            return _NONE, _NONE
        ids: dict[str, int] = {}
        code = np.array([ids.setdefault(k, len(ids)) for k in keys], np.int64)
        names = list(ids)
        tails = [self._tail(name, partition) for name in names]
        index = np.argsort(code, kind="stable") if len(names) > 1 else np.arange(n)
        code, ts, offsets = code[index], ts[index], offsets[index]
        values = values[index].astype(np.float32, copy=False)

        skip = np.array([t.skip_before for t in tails], np.int64)
        if (skip > 0).any():  # read again after a restart: what was processed before is skipped
            fresh = offsets >= skip[code]
            if not fresh.all():
                keep = np.flatnonzero(fresh)
                index, code, ts, values, offsets = (
                    a[keep] for a in (index, code, ts, values, offsets)
                )
        late, duplicate, ok = self._order(tails, code, ts)
        late, duplicate = np.sort(index[late]), np.sort(index[duplicate])
        if ok is not None:
            code, ts, values, offsets = code[ok], ts[ok], values[ok], offsets[ok]
        if len(ts) == 0:
            return late, duplicate

        length, stride = self.spec.length, self.spec.stride
        k = len(tails)
        fresh_n = np.bincount(code, minlength=k)
        tail_n = np.array([len(t.offsets) for t in tails], np.int64)
        count = np.array([t.count for t in tails], np.int64)
        replay = np.array([t.replay_until for t in tails], np.int64)
        # combined rows, key by key: the key's tail, then its new readings
        seg_n = tail_n + fresh_n
        seg_start = np.cumsum(seg_n) - seg_n
        fresh_start = np.cumsum(fresh_n) - fresh_n
        tail_start = np.cumsum(tail_n) - tail_n
        rows = np.arange(len(ts))
        fresh_rows = (seg_start + tail_n - fresh_start)[code] + rows
        tail_rows = np.repeat(seg_start - tail_start, tail_n) + np.arange(int(tail_n.sum()))
        all_values = np.empty((len(tail_rows) + len(ts), self.n_features), np.float32)
        all_ts = np.empty(len(all_values), np.int64)
        all_offsets = np.empty(len(all_values), np.int64)
        all_values[fresh_rows], all_ts[fresh_rows], all_offsets[fresh_rows] = values, ts, offsets
        if len(tail_rows):
            all_values[tail_rows] = np.concatenate([t.values for t in tails])
            all_ts[tail_rows] = np.concatenate([t.ts for t in tails])
            all_offsets[tail_rows] = np.concatenate([t.offsets for t in tails])

        # a reading at series position t ends a window when t + 1 >= W and (t + 1 - W) % S == 0;
        # windows that ended before a restart's state was saved were emitted already
        position = (count - fresh_start)[code] + rows
        ends = np.flatnonzero(
            (position + 1 >= length)
            & ((position + 1 - length) % stride == 0)
            & (position >= replay[code])
        )
        if len(ends):
            end_rows = fresh_rows[ends]
            starts = end_rows - (length - 1)
            view = np.lib.stride_tricks.sliding_window_view(all_values, length, axis=0)
            out.windows.append(view[starts].transpose(0, 2, 1))
            out.start_ts.append(all_ts[starts])
            out.end_ts.append(all_ts[end_rows])
            out.first_offsets.append(all_offsets[starts])
            out.last_offsets.append(all_offsets[end_rows])
            per_key = np.bincount(code[ends], minlength=k)
            with_windows = np.flatnonzero(per_key)
            out.keys.extend(names[j] for j in with_windows)
            out.counts.extend(per_key[with_windows].tolist())
            out.partitions.extend([partition] * len(with_windows))

        # each key keeps the readings from the start of its next window on
        end = count + fresh_n
        next_end = np.maximum(end, length - 1)
        next_end += (-(next_end + 1 - length)) % stride
        base = count - tail_n  # series position of each key's first combined row
        keep_from = seg_start + np.maximum(0, next_end - length + 1 - base)
        seg_end = (seg_start + seg_n).tolist()
        for j, (tail, a, b, taken) in enumerate(
            zip(tails, keep_from.tolist(), seg_end, fresh_n.tolist(), strict=True)
        ):
            if not taken:
                continue
            tail.values = all_values[a:b].copy()
            tail.ts = all_ts[a:b].copy()
            tail.offsets = all_offsets[a:b].copy()
            tail.count = int(end[j])
            tail.last_ts = int(all_ts[b - 1])
            tail.next_offset = int(all_offsets[b - 1]) + 1
        return late, duplicate

    @staticmethod
    def _order(tails: list[KeyTail], code: np.ndarray, ts: np.ndarray):
        """Readings (grouped by key) that are not later than everything before them of their
        key: (late, duplicate, mask of the good ones or None when all are good)."""
        previous = np.empty_like(ts)
        last = np.array([t.last_ts for t in tails], np.int64)
        first = np.ones(len(ts), bool)
        first[1:] = code[1:] != code[:-1]
        previous[first] = last[code[first]]
        previous[~first] = ts[:-1][~first[1:]]
        bad = ts <= previous
        if not bad.any():
            return _NONE, _NONE, None
        # keys with a reading out of place: compare against the running maximum
        for key in np.unique(code[bad]):
            rows = np.flatnonzero(code == key)
            seen = np.maximum.accumulate(np.concatenate([[last[key]], ts[rows]]))[:-1]
            previous[rows] = seen
        late = np.flatnonzero(ts < previous)
        duplicate = np.flatnonzero(ts == previous)
        return late, duplicate, ts > previous

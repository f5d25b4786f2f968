"""Per-key stream windows: the training job's window rule applied to readings as they arrive.

Each key keeps only the readings a future window still needs (its "tail"), with their positions
in the key's series and their Kafka offsets. A batch of readings is processed per key with numpy:
order checks, the window ends it completes (position t ends a window when t + 1 >= W and
(t + 1 - W) % S == 0, exactly as `pipeline.detector.windows`), and the new tail. Per-record Python
work is limited to grouping by key.

Ordering policy: per key, timestamps must increase. A reading older than the key's latest is
`out_of_order`, one with the same timestamp a `duplicate_timestamp`; neither enters a window.

Restart: a key's resume point is the position and offset of the oldest reading it still needs,
and the position after the latest reading it took (windows ending before it were emitted).
Stored with each commit (see `pipeline.state`), it lets a restarted worker skip what was already
processed and continue the same series positions, so windows, and event ids, are the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.detector import WindowSpec

__all__ = ["KeyTail", "ReadyWindows", "StreamWindower"]

TopicPartition = tuple[str, int]


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
        key: str,
        partition: TopicPartition,
        ts: np.ndarray,
        values: np.ndarray,
        offsets: np.ndarray,
        out: ReadyWindows,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Add one key's readings (arrival order) and collect the windows they complete.

        Returns (index of readings rejected as out of order, index rejected as duplicates),
        into the arrays given. Readings before the key's resume offset are skipped silently.
        """
        tail = self._tail(key, partition)
        if tail.skip_before > 0:
            fresh = offsets >= tail.skip_before
            if not fresh.all():
                keep = np.flatnonzero(fresh)
                ts, values, offsets = ts[keep], values[keep], offsets[keep]
                base_index = keep
            else:
                base_index = np.arange(len(ts))
        else:
            base_index = np.arange(len(ts))
        if len(ts) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        previous = np.maximum.accumulate(np.concatenate([[tail.last_ts], ts]))[:-1]
        ok = ts > previous
        late = base_index[ts < previous]
        duplicate = base_index[ts == previous]
        if not ok.all():
            ts, values, offsets = ts[ok], values[ok], offsets[ok]
        if len(ts) == 0:
            return late, duplicate
        tail.last_ts = int(ts[-1])
        tail.next_offset = int(offsets[-1]) + 1

        length, stride = self.spec.length, self.spec.stride
        base = tail.count - len(tail.offsets)  # position of the first reading in `combined`
        all_values = np.concatenate([tail.values, values.astype(np.float32, copy=False)])
        all_ts = np.concatenate([tail.ts, ts])
        all_offsets = np.concatenate([tail.offsets, offsets])
        first_new, end = tail.count, tail.count + len(ts)  # new positions [first_new, end)
        # window ends t in [first_new, end) with (t + 1 - W) >= 0 and divisible by S
        # windows that ended before a restart's state was saved were emitted already
        lowest = max(first_new, length - 1, tail.replay_until)
        first_end = lowest + (-(lowest + 1 - length)) % stride
        ends = np.arange(first_end, end, stride)
        if len(ends):
            starts = ends - length + 1 - base
            view = np.lib.stride_tricks.sliding_window_view(all_values, length, axis=0)
            out.windows.append(view[starts].transpose(0, 2, 1))
            out.keys.append(key)
            out.start_ts.append(all_ts[starts])
            out.end_ts.append(all_ts[ends - base])
            out.partitions.append(partition)
            out.first_offsets.append(all_offsets[starts])
            out.last_offsets.append(all_offsets[ends - base])
            out.counts.append(len(ends))
        tail.count = end
        next_end = max(end, length - 1)
        next_end += (-(next_end + 1 - length)) % stride
        keep_from = max(0, next_end - length + 1 - base)
        tail.values = all_values[keep_from:].copy()
        tail.ts = all_ts[keep_from:].copy()
        tail.offsets = all_offsets[keep_from:].copy()
        return late, duplicate

"""The adaptive stage per key of a stream: likelihood and detection rule, keyed and checkpointed.

The worker runs it on every scored batch between the scores and the decision, and
`aewatch score --stream` runs the same object over a file's windows in order, so both report the
same surprise, likelihood and detections (see `pipeline.detector.adaptive` for the arithmetic).

Keys live in partitions (a topic and partition of the input; a file is one partition). The stage
keeps the per-key state of the `KeyedState` protocol of `pipeline.worker.state`: `state`,
`restore` and `forget` per partition. A partition's saved state is

    {"v": model version, "c": channels, "keys": {key: base64 of the key's packed state}}

where a key's state is the likelihood (12 + 24 C bytes), the rule (17 bytes) and the end time of
the latest window it took (8 bytes): 61 bytes for one channel, 84 base64 characters (state
written without the likelihood's 4-byte freeze count, 76 characters, is read too). State saved
under another model version or channel count is not restored: raw scores of different versions
are not on one scale, so the keys warm up again, as they do when the worker loads a new version
(`reset`). A window that ends no later than its key's latest is a replay of one already taken
and is skipped (it reports nothing), so a replay never counts a window twice.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from pipeline.detector.adaptive import (
    AdaptiveLikelihood,
    AdaptiveScores,
    AdaptiveSettings,
    DetectionRule,
    RangeCheck,
    RuleSettings,
    lifted,
    rounds,
    scores_from,
    surprise_of,
)

__all__ = [
    "AdaptiveStage",
    "StreamReplay",
    "range_features",
    "replay",
    "score_reference",
    "window_extremes",
]

Partition = tuple[str, int]
FILE_PARTITION = ("file", 0)
_END = struct.Struct("<q")
_NONE = np.iinfo(np.int64).min
EXTREMES_CHUNK = 65_536  # windows of a file whose extremes are taken at once


def score_reference(threshold) -> float:
    """The reference scale of a model's window score: the median of its calibration scores (a
    typical normal score), else its threshold, else 1."""
    scores = np.asarray(threshold.calibration_scores, dtype=np.float64)
    if len(scores) and np.median(scores) > 0:
        return float(np.median(scores))
    if threshold.value is not None and threshold.value > 0:
        return float(threshold.value)
    return 1.0


class AdaptiveStage:
    """Adaptive likelihood and detection rule of every key of the partitions one member owns."""

    def __init__(
        self,
        settings: AdaptiveSettings,
        rule: RuleSettings,
        refs,
        version: str | None,
        range_features: int = 0,
    ) -> None:
        """`range_features`: how many features' ranges the range check follows (the first ones
        of `update`'s extremes; 0, or a range tolerance of 0: no range check)."""
        self.settings, self.rule_settings = settings, rule
        self.range_features = range_features if settings.range_tolerance > 0 else 0
        self._slots: dict[Partition, dict[str, int]] = {}
        self._free: list[int] = []
        self._next = 0
        self.last_end = np.full(16, _NONE, np.int64)
        self.reset(refs, version)

    def reset(self, refs, version: str | None) -> None:
        """Every key starts again from nothing (a new model version): its scores are on a new
        scale. `refs`: the version's reference scale of each channel."""
        self.version = None if version is None else str(version)
        self.likelihood = AdaptiveLikelihood(self.settings, refs, len(self.last_end))
        self.rule = DetectionRule(self.rule_settings, len(self.last_end))
        self.range = None
        if self.range_features:
            tolerance = self.settings.range_tolerance
            self.range = RangeCheck(tolerance, self.range_features, len(self.last_end))
        self.channels = self.likelihood.channels
        # each key's state, part by part, in the order it is packed
        self._parts = [p for p in (self.likelihood, self.rule, self.range) if p is not None]

    @property
    def keys(self) -> int:
        return sum(len(keys) for keys in self._slots.values())

    def _slot(self, partition: Partition, key: str) -> int:
        keys = self._slots.setdefault(partition, {})
        slot = keys.get(key)
        if slot is None:
            if self._free:
                slot = self._free.pop()
            else:
                slot, self._next = self._next, self._next + 1
                if slot >= len(self.last_end):
                    self.last_end = np.concatenate(
                        [self.last_end, np.full(len(self.last_end), _NONE, np.int64)]
                    )
                    for part in self._parts:
                        part.ensure(len(self.last_end))
            keys[key] = slot
        return slot

    def update(
        self,
        groups: Iterable[tuple[str, Partition, slice]],
        end_ts: np.ndarray,
        rows: np.ndarray,
        extremes: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> AdaptiveScores:
        """Windows of a batch in groups of one key, each key's in the order they came:
        `end_ts` [N] epoch ms, `rows` [N, C] (or [N] for C = 1); `extremes`, for the range check,
        each window's minimum and maximum [N, F'] per feature (F' >= the stage's range
        features). A window that does not end after every earlier window of its key (one taken
        before a restart and read again, or a pre-cut window behind its key's readings) is
        passed over, in one batch as across batches."""
        n = len(end_ts)
        slot_of, counts = [], []
        for key, partition, span in groups:
            slot_of.append(self._slot(partition, key))
            counts.append(span.stop - span.start)
        if not n:
            return AdaptiveScores.empty(0)
        slots = np.repeat(np.asarray(slot_of, np.int64), counts)
        end_ts = np.asarray(end_ts, np.int64)
        rows = np.asarray(rows, np.float64).reshape(n, self.channels)
        ranges = None
        if self.range is not None:
            if extremes is None:
                raise ValueError("the range check needs each window's extremes")
            ranges = [np.asarray(e, np.float64)[:, : self.range_features] for e in extremes]
        keep = end_ts > _ends_before(slots, end_ts, self.last_end)
        if keep.all():
            out = self._take(slots, rows, ranges)
        else:
            out = AdaptiveScores.empty(n)
            kept = None if ranges is None else [e[keep] for e in ranges]
            taken = self._take(slots[keep], rows[keep], kept)
            for name in ("likelihood", "log_likelihood", "surprise", "detection", "beyond"):
                getattr(out, name)[keep] = getattr(taken, name)
            slots, end_ts = slots[keep], end_ts[keep]
        np.maximum.at(self.last_end, slots, end_ts)
        return out

    def _take(self, slots, rows, ranges) -> AdaptiveScores:
        order = rounds(slots)  # one key's rows in turn, the same for every part
        logq, live = self.likelihood.update(slots, rows, order)
        surprise = surprise_of(logq, live)
        beyond = None
        if ranges is not None:
            beyond = self.range.update(slots, *ranges, order) & live
            surprise = lifted(surprise, beyond)  # for the rule: at least any threshold
        return scores_from(logq, live, self.rule.update(slots, surprise, order), beyond)

    # -- per-key state (the KeyedState protocol) --------------------------------------------------
    def _unpack(self, slot: int, text: str) -> None:
        blob = base64.b64decode(text)
        at = 0
        for part in self._parts:
            size = part.pack_format.size
            if part is self.likelihood and len(blob) < self.bytes_per_key:
                size = self.likelihood.legacy_size  # written before the freeze count was kept
            part.unpack(slot, blob[at : at + size])
            at += size
        (self.last_end[slot],) = _END.unpack(blob[at:])

    @property
    def bytes_per_key(self) -> int:
        return sum(part.pack_format.size for part in self._parts) + _END.size

    def state(self, partition: Partition) -> dict:
        keys = self._slots.get(partition, {})
        slots = np.fromiter(keys.values(), np.int64, len(keys))
        ends = self.last_end[slots].astype("<i8").view(np.uint8).reshape(len(slots), _END.size)
        rows = np.concatenate([*(part.pack_rows(slots) for part in self._parts), ends], axis=1)
        raw, size, encode = rows.tobytes(), rows.shape[1], base64.b64encode
        texts = [encode(raw[at : at + size]).decode() for at in range(0, len(raw), size)]
        return {"v": self.version, "c": self.channels, "keys": dict(zip(keys, texts, strict=True))}

    def restore(self, partition: Partition, saved: dict) -> None:
        self.forget({partition})
        if not saved or saved.get("v") != self.version or saved.get("c") != self.channels:
            return
        sizes = [self.bytes_per_key]
        if self.range is None:
            sizes.append(self.bytes_per_key - 4)  # written before the freeze count was kept
        lengths = {4 * -(-size // 3) for size in sizes}  # base64 of one key's state
        for key, text in (saved.get("keys") or {}).items():
            if len(text) in lengths:
                self._unpack(self._slot(partition, key), text)

    def drop(self, partition: Partition, keys: Iterable[str]) -> None:
        """Forget these keys of the partition (`pipeline.modalities.expiry`)."""
        held = self._slots.get(partition, {})
        self._release([held.pop(key) for key in keys if key in held])

    def forget(self, partitions: set[Partition]) -> None:
        for partition in partitions:
            self._release((self._slots.pop(partition, None) or {}).values())

    def _release(self, slots: Iterable[int]) -> None:
        for slot in slots:
            for part in self._parts:
                part.reset(slot)
            self.last_end[slot] = _NONE
            self._free.append(slot)


@dataclass
class StreamReplay:
    """The worker's streaming stages for a replay of a file (`aewatch score --stream`): a fresh
    adaptive stage (None: off) and what makes a window anomalous (`alarm_on` raw or adaptive,
    with the surprise threshold)."""

    stage: AdaptiveStage | None
    alarm_on: str = "raw"
    threshold: float = 5.0


def _epoch_ms(times: np.ndarray) -> np.ndarray:
    times = np.asarray(times)
    if np.issubdtype(times.dtype, np.datetime64):
        return times.astype("datetime64[ms]").astype(np.int64)
    return times.astype(np.int64)


def replay(stage: AdaptiveStage, windows, scores: np.ndarray) -> AdaptiveScores:
    """The stage over a file's windows (a `WindowSet`), each key's in time order, as the worker
    feeds it (the result does not depend on how keys interleave or batches are cut). Results
    come back in the order of `windows`."""
    keys = windows.keys.astype(str)
    end_ms = _epoch_ms(windows.end_times)
    order = np.lexsort((end_ms, keys))
    sorted_keys = keys[order]
    starts = np.r_[0, np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1, len(order)]
    groups = [
        (str(sorted_keys[a]), FILE_PARTITION, slice(int(a), int(b)))
        for a, b in zip(starts[:-1], starts[1:], strict=True)
        if b > a
    ]
    extremes = None
    if stage.range is not None:
        parts = [
            window_extremes(windows.windows[order[at : at + EXTREMES_CHUNK]])
            for at in range(0, max(len(order), 1), EXTREMES_CHUNK)
        ]  # a chunk of windows copied out at a time
        extremes = tuple(np.concatenate([part[i] for part in parts]) for i in (0, 1))
    got = stage.update(groups, end_ms[order], np.asarray(scores)[order], extremes)
    out = AdaptiveScores.empty(len(order))
    for name in ("likelihood", "log_likelihood", "surprise", "detection", "beyond"):
        getattr(out, name)[order] = getattr(got, name)
    return out


def range_features(detector) -> int:
    """The features a range check follows: a series detector's own (not its calendar inputs)."""
    if detector.input.kind != "series":
        return 0
    return len(detector.input.features) - len(detector.input.calendar)


def window_extremes(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each series window's minimum and maximum per feature: [N, W, F] -> two [N, F].

    Folded in halves along time (the elementwise extremes of the two halves, again and again):
    numpy's vector loops over contiguous runs, several times faster than a reduction over the
    middle axis, and no thread pool on the worker's loop thread (whose idle threads would spin
    against the scoring thread and the client)."""
    windows = np.asarray(windows)
    return _fold(windows, np.minimum), _fold(windows, np.maximum)


def _ends_before(slots: np.ndarray, end_ts: np.ndarray, last_end: np.ndarray) -> np.ndarray:
    """Each window's bound: the latest end its key had before it, from the stage's state or
    from the batch's earlier windows of the key."""
    bound = last_end[slots]
    if len(slots) < 2:
        return bound
    order = np.argsort(slots, kind="stable")
    key, end = slots[order], end_ts[order]
    same = key[1:] == key[:-1]
    if not (same & (end[1:] <= end[:-1])).any():  # each key's ends rise: its last end bounds all
        return bound
    bound = bound[order]
    starts = np.flatnonzero(np.r_[True, ~same])
    for start, stop in zip(starts.tolist(), [*starts[1:].tolist(), len(key)], strict=True):
        if stop - start > 1:  # the latest end of the key's windows before each
            earlier = np.maximum.accumulate(end[start : stop - 1])
            bound[start + 1 : stop] = np.maximum(bound[start + 1 : stop], earlier)
    out = np.empty_like(bound)
    out[order] = bound
    return out


def _fold(a: np.ndarray, op: np.ufunc) -> np.ndarray:
    while a.shape[1] > 1:
        half = a.shape[1] // 2
        folded = op(a[:, :half], a[:, half : 2 * half])
        if a.shape[1] % 2:  # the odd step joins the first
            folded[:, 0] = op(folded[:, 0], a[:, -1])
        a = folded
    return a[:, 0].copy()

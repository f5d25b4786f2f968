"""Alarm episodes per key, built from noisy window-level anomaly decisions.

A single anomalous window is rarely worth waking someone for; a run of them is. The tracker turns
each key's stream of window decisions into episodes with an opening and a resolution:

* **Open** - an alarm opens for a key when at least ``k`` of its last ``n`` windows are anomalous
  (defaults: 3 of 5). The episode starts at the earliest anomalous window among those ``n``; its
  id is derived from the key and that start, and the windows from that one up to the opening
  window are the first windows of the episode (their scores and feature errors count towards the
  episode's peak and top features).
* **Resolve** - it resolves after ``resolve_after`` consecutive normal windows (default 10). The
  resolution reports when the episode ended: the end of its last anomalous window.
* **Cooldown** - after a resolve the key cannot open again until event time (window end) reaches
  the resolve's time plus ``cooldown_ms`` (default 60 s). Windows inside the cooldown leave the
  key's history empty: an anomalous window during the cooldown does not count towards a later
  opening. A fault that is still present when the cooldown ends therefore needs ``k`` fresh
  anomalous windows, and the new episode starts at the first of those, after the cooldown.

Every transition carries the episode's peak score (the highest score of its anomalous windows, so
the peak lies within the episode's span whatever decides a window anomalous) and when it happened, how many windows and anomalous windows it spans so far, and the three features
with the largest mean error over its anomalous windows.

Cost: ``AlarmTracker.update`` takes all windows of one key from a scored batch as numpy arrays. A
key with no open alarm, an empty history and no anomalous window it could count (the common case)
costs a few array operations and no loop over its windows. Other keys loop in Python, and an idle
key jumps straight to its next anomalous window.

Restart: the worker saves ``AlarmTracker.state(partition)`` with its checkpoint in its compacted
state topic, and a member assigned the partition calls ``restore`` with it. Each key remembers the
end of the latest window it took (``last_end_ms``); a restarted worker re-reads and re-scores
windows it had already counted, and windows ending at or before ``last_end_ms`` are skipped, so
nothing is counted twice. Episode and event ids are uuid5 values of the key, the episode start
and the transition kind, so a replay produces the same ids and downstream consumers can drop
duplicates.

A key forgotten after a long silence (`pipeline.modalities.expiry`) leaves the tracker. An
episode still open on it resolves first (`resolve_silent`), at the end of the key's last window:
a machine that stopped sending, was replaced or renamed would otherwise keep its alarm open for
ever. Its transition's ``cause`` is ``silence``; one resolved by normal windows has ``windows``.

Size: over 400 lines because the rule, the episode's bookkeeping and its state part are one unit.

State entries are compact; per key (omitted fields are empty):

* ``e`` - end ms of the latest window taken (always present; needed to skip replayed windows)
* ``c`` - cooldown end ms, while in a cooldown
* ``h`` - recent windows while one of the last ``n`` is anomalous, oldest first:
  ``[start_ms, end_ms, score, flag, per-feature errors (only when given)]``
* open episode: ``id`` episode id, ``s`` start ms, ``pk`` peak score, ``pm`` peak ms, ``w``
  windows, ``a`` anomalous windows, ``r`` current run of normal windows, ``l`` end ms of the last
  anomalous window, ``f``/``fc`` per-feature error sums and the number of windows summed.
"""

from __future__ import annotations

import uuid
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass

import numpy as np

__all__ = ["ALARM_NAMESPACE", "AlarmRules", "AlarmTracker", "AlarmTransition"]

ALARM_NAMESPACE = uuid.UUID("0b7d4c1e-4a0f-4f3e-9a63-616c61726d73")
MAX_WINDOWS = 64  # the longest history a key keeps (its flags are bits of an int)
TOP_FEATURES = 3
Partition = tuple[str, int]


@dataclass(frozen=True)
class AlarmRules:
    """When an alarm opens, resolves and may open again. The worker builds them from its alarm
    settings, which name a bad value by its setting (see `pipeline.worker.settings`)."""

    k: int = 3  # anomalous windows among the last n that open an alarm
    n: int = 5
    resolve_after: int = 10  # consecutive normal windows that resolve it (m)
    cooldown_ms: int = 60_000  # after a resolve, no new alarm for this key until then

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.n <= MAX_WINDOWS or self.resolve_after < 1:
            raise ValueError(f"alarm rules out of range: {self}")
        if self.cooldown_ms < 0:
            raise ValueError(f"alarm cooldown must not be negative: {self}")


@dataclass(frozen=True)
class AlarmTransition:
    """An alarm opened or resolved for one key."""

    kind: str  # "opened" or "resolved"
    key: str
    partition: tuple[str, int]
    episode_id: str  # uuid5 of the key and start_ms
    event_id: str  # uuid5 of the episode id and kind; a replay gives the same id
    time_ms: int  # end ms of the window that caused the transition
    start_ms: int  # start ms of the episode's first anomalous window
    end_ms: int | None  # resolved: end ms of the episode's last anomalous window; opened: None
    peak_score: float  # highest score of the episode's anomalous windows so far
    peak_ms: int  # end ms of the window with the peak score
    windows: int  # windows in the episode so far, the ones that opened it included
    anomalous_windows: int
    top_features: list[tuple[str, float]]  # up to 3 (name, mean error), largest first
    cause: str = "windows"  # resolved: "windows" (normal ones) or "silence" (key forgotten)


class _Episode:
    __slots__ = (
        "anomalous",
        "feat_count",
        "feat_sum",
        "id",
        "last_anomalous",
        "normal_run",
        "peak",
        "peak_ms",
        "start",
        "windows",
    )

    def __init__(self, episode_id: str, start: int) -> None:
        self.id = episode_id
        self.start = start
        self.peak = float("-inf")
        self.peak_ms = start
        self.windows = 0
        self.anomalous = 0
        self.feat_sum: np.ndarray | None = None
        self.feat_count = 0
        self.normal_run = 0
        self.last_anomalous = start

    def add_features(self, row) -> None:
        if self.feat_sum is None:
            self.feat_sum = np.array(row, dtype=np.float64)
        else:
            self.feat_sum += row
        self.feat_count += 1


class _KeyState:
    __slots__ = ("bits", "cool_until", "episode", "hist", "last_end")

    def __init__(self) -> None:
        self.last_end: int | None = None
        # flags of the last n windows, newest in bit 0; non-zero only while no episode is open
        self.bits = 0
        # (start, end, score, flag, per-feature row or None) of the last n windows, while bits != 0
        self.hist: deque | None = None
        self.cool_until: int | None = None
        self.episode: _Episode | None = None


def _episode_id(key: str, start_ms: int) -> str:
    return str(uuid.uuid5(ALARM_NAMESPACE, f"{key}\x1f{start_ms}"))


class AlarmTracker:
    """Alarm state of every key of the partitions a worker owns."""

    def __init__(self, rules: AlarmRules, feature_names: tuple[str, ...] | None = None) -> None:
        self.rules = rules
        self.feature_names = tuple(feature_names) if feature_names is not None else None
        self._mask = (1 << rules.n) - 1
        self._keys: dict[Partition, dict[str, _KeyState]] = {}
        self._open = 0

    @property
    def open_count(self) -> int:
        """Keys with an open alarm, over all partitions."""
        return self._open

    def update(
        self,
        key: str,
        partition: tuple[str, int],
        start_ms: np.ndarray,
        end_ms: np.ndarray,
        scores: np.ndarray,
        flags: np.ndarray,
        per_feature: np.ndarray | None = None,
    ) -> list[AlarmTransition]:
        """Windows of one key in time order (int64 ms arrays, float scores, bool flags, per_feature
        [len, F] float or None). Returns the transitions they cause, oldest first."""
        count = len(end_ms)
        if count == 0:
            return []
        if not len(start_ms) == len(scores) == len(flags) == count:
            raise ValueError(
                f"window arrays differ in length: start_ms {len(start_ms)}, end_ms {count}, "
                f"scores {len(scores)}, flags {len(flags)}"
            )
        if per_feature is not None:
            if per_feature.ndim != 2 or per_feature.shape[0] != count:
                raise ValueError(
                    f"per_feature must have shape ({count}, features), got {per_feature.shape}"
                )
            names = self.feature_names
            if names is not None and per_feature.shape[1] != len(names):
                raise ValueError(
                    f"per_feature has {per_feature.shape[1]} columns, {len(names)} names"
                )
        flags = np.asarray(flags, dtype=bool)
        keys = self._keys.setdefault(partition, {})
        st = keys.get(key)
        if st is None:
            st = keys[key] = _KeyState()
        first = 0
        if st.last_end is not None:
            first = int(np.searchsorted(end_ms, st.last_end, side="right"))
            if first >= count:
                return []  # all of them were taken before
        if st.episode is None and not st.bits:
            lo = first
            if st.cool_until is not None:
                lo = max(lo, int(np.searchsorted(end_ms, st.cool_until, side="left")))
            if lo >= count or not flags[lo:].any():
                st.last_end = int(end_ms[-1])
                if st.cool_until is not None and st.last_end >= st.cool_until:
                    st.cool_until = None
                return []
        return self._walk(st, key, partition, first, start_ms, end_ms, scores, flags, per_feature)

    def _walk(self, st, key, partition, first, start_ms, end_ms, scores, flags, per_feature):
        k, resolve_after, mask, n = self.rules.k, self.rules.resolve_after, self._mask, self.rules.n
        starts = start_ms[first:].tolist()
        ends = end_ms[first:].tolist()
        values = scores[first:].tolist()
        marks = flags[first:].tolist()
        rows = per_feature[first:] if per_feature is not None else None
        anomalous_at = np.flatnonzero(flags[first:]).tolist()
        count = len(ends)
        out: list[AlarmTransition] = []
        i = 0
        while i < count:
            ep = st.episode
            if ep is None and not st.bits:
                # idle: jump to the next anomalous window that may count (outside any cooldown)
                lo = i
                if st.cool_until is not None:
                    lo = max(lo, bisect_left(ends, st.cool_until))
                p = bisect_left(anomalous_at, lo)
                if p == len(anomalous_at):
                    break
                i = anomalous_at[p]
                st.cool_until = None
            end = ends[i]
            flag = marks[i]
            if ep is None:
                bits = ((st.bits << 1) | flag) & mask
                st.bits = bits
                if not bits:
                    st.hist = None
                else:
                    if st.hist is None:
                        st.hist = deque(maxlen=n)
                    row = None if rows is None else np.array(rows[i], dtype=np.float64)
                    st.hist.append((starts[i], end, values[i], flag, row))
                    if flag and bits.bit_count() >= k:
                        out.append(self._open_episode(st, key, partition))
            else:
                ep.windows += 1
                if flag:
                    if values[i] > ep.peak:  # the peak of the anomalous windows: within the span
                        ep.peak, ep.peak_ms = values[i], end
                    ep.anomalous += 1
                    ep.normal_run = 0
                    ep.last_anomalous = end
                    if rows is not None:
                        ep.add_features(rows[i])
                else:
                    ep.normal_run += 1
                    if ep.normal_run >= resolve_after:
                        out.append(self._resolve(st, key, partition, end))
            i += 1
        st.last_end = ends[-1]
        if st.cool_until is not None and st.last_end >= st.cool_until:
            st.cool_until = None
        return out

    def _open_episode(self, st: _KeyState, key: str, partition: Partition) -> AlarmTransition:
        entries = list(st.hist)
        first = next(j for j, entry in enumerate(entries) if entry[3])
        entries = entries[first:]
        start = entries[0][0]
        ep = _Episode(_episode_id(key, start), start)
        ep.peak_ms = entries[0][1]
        for _, end, score, flag, row in entries:
            ep.windows += 1
            if flag:
                if score > ep.peak:
                    ep.peak, ep.peak_ms = score, end
                ep.anomalous += 1
                ep.last_anomalous = end
                if row is not None:
                    ep.add_features(row)
        st.episode, st.bits, st.hist = ep, 0, None
        self._open += 1
        return self._transition("opened", key, partition, ep, entries[-1][1], None)

    def resolve_silent(self, partition: Partition, keys) -> list[AlarmTransition]:
        """Resolve the open episodes of these keys of the partition, forgotten after a long
        silence, at the end of each one's last window (cause ``silence``)."""
        held = self._keys.get(partition, {})
        return [
            self._resolve(held[key], key, partition, held[key].last_end, cause="silence")
            for key in keys
            if key in held and held[key].episode is not None
        ]

    def _resolve(
        self, st: _KeyState, key: str, partition: Partition, time_ms: int, cause: str = "windows"
    ) -> AlarmTransition:
        ep = st.episode
        transition = self._transition(
            "resolved", key, partition, ep, time_ms, ep.last_anomalous, cause
        )
        st.episode, st.bits, st.hist = None, 0, None
        st.cool_until = time_ms + self.rules.cooldown_ms
        self._open -= 1
        return transition

    def _transition(
        self, kind, key, partition, ep: _Episode, time_ms, end_ms, cause="windows"
    ) -> AlarmTransition:
        return AlarmTransition(
            kind=kind,
            key=key,
            partition=partition,
            episode_id=ep.id,
            event_id=str(uuid.uuid5(ALARM_NAMESPACE, f"{ep.id}\x1f{kind}")),
            time_ms=time_ms,
            start_ms=ep.start,
            end_ms=end_ms,
            peak_score=ep.peak,
            peak_ms=ep.peak_ms,
            windows=ep.windows,
            anomalous_windows=ep.anomalous,
            top_features=self._top_features(ep),
            cause=cause,
        )

    def _top_features(self, ep: _Episode) -> list[tuple[str, float]]:
        names = self.feature_names
        if names is None or ep.feat_sum is None or not ep.feat_count:
            return []
        means = ep.feat_sum / ep.feat_count
        order = np.argsort(-means, kind="stable")[:TOP_FEATURES]
        return [(names[j], float(means[j])) for j in order.tolist()]

    def state(self, partition: Partition) -> dict[str, dict]:
        """JSON-ready state of every key of the partition that has any (see the module notes)."""
        out: dict[str, dict] = {}
        for key, st in self._keys.get(partition, {}).items():
            if st.last_end is None:
                continue
            entry: dict = {"e": st.last_end}
            if st.cool_until is not None:
                entry["c"] = st.cool_until
            if st.hist:
                entry["h"] = [
                    [s, e, v, int(f)] if row is None else [s, e, v, int(f), row.tolist()]
                    for s, e, v, f, row in st.hist
                ]
            ep = st.episode
            if ep is not None:
                entry.update(
                    id=ep.id,
                    s=ep.start,
                    pk=ep.peak,
                    pm=ep.peak_ms,
                    w=ep.windows,
                    a=ep.anomalous,
                    r=ep.normal_run,
                    l=ep.last_anomalous,
                )
                if ep.feat_sum is not None:
                    entry["f"] = ep.feat_sum.tolist()
                    entry["fc"] = ep.feat_count
            out[key] = entry
        return out

    def restore(self, partition: Partition, state: dict[str, dict]) -> None:
        """Replace the partition's keys with the state saved by `state`."""
        self.forget({partition})
        keys: dict[str, _KeyState] = {}
        opened = 0  # counted once the whole part has been read: a bad entry refuses it all
        for key, entry in state.items():
            st = _KeyState()
            st.last_end = int(entry["e"])
            if entry.get("c") is not None:
                st.cool_until = int(entry["c"])
            if entry.get("h"):
                hist: deque = deque(maxlen=self.rules.n)
                bits = 0
                for item in entry["h"]:
                    flag = bool(item[3])
                    row = np.asarray(item[4], dtype=np.float64) if len(item) > 4 else None
                    hist.append((int(item[0]), int(item[1]), float(item[2]), flag, row))
                    bits = ((bits << 1) | flag) & self._mask
                if bits:
                    st.hist, st.bits = hist, bits
            if "s" in entry:
                ep = _Episode(str(entry["id"]), int(entry["s"]))
                ep.peak = float(entry["pk"])
                ep.peak_ms = int(entry["pm"])
                ep.windows = int(entry["w"])
                ep.anomalous = int(entry["a"])
                ep.normal_run = int(entry["r"])
                ep.last_anomalous = int(entry["l"])
                if entry.get("f") is not None:
                    ep.feat_sum = np.asarray(entry["f"], dtype=np.float64)
                    ep.feat_count = int(entry.get("fc", ep.anomalous))
                st.episode = ep
                opened += 1
            keys[key] = st
        self._keys[partition] = keys
        self._open += opened

    def drop(self, partition: Partition, keys) -> None:
        """Forget these keys of the partition, but not one with an open episode (the
        checkpoint resolves those first, `resolve_silent`)."""
        held = self._keys.get(partition, {})
        for key in [k for k in keys if k in held and held[k].episode is None]:
            del held[key]

    def forget(self, partitions: set) -> None:
        """Drop the keys of these partitions (revoked from this worker)."""
        for partition in partitions:
            keys = self._keys.pop(partition, None)
            if keys:
                self._open -= sum(1 for st in keys.values() if st.episode is not None)

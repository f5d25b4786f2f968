"""Score drift: recent scores against the calibration distribution, per key and overall.

The statistic is the population stability index over the calibration scores' deciles: the
detector's calibration sample (held-out normal windows, stored with the threshold) gives 9 cut
points, so each of the 10 bins holds 10 % of normal windows; the recent scores of a key, its last
`drift_window` windows (a bounded reservoir: a ring of bin numbers), fall into those bins with
shares `a_i`, and

    PSI = sum_i (a_i - 0.1) * ln(a_i / 0.1),   a_i = (count_i + 0.5) / (window + 5)

(half a count added to every bin so an empty one stays finite). Where calibration scores tie
(a share of them equal, cut points repeated), each bin's expected share is its calibration share
instead of 0.1, and the bins no score can fall in are left out. A key's PSI is known once its
reservoir is full; "overall" pools the reservoirs of every key this member holds. Under no drift
PSI is about 9 / window for independent scores, more for overlapping windows; 0.1 is commonly read
as a moderate shift and 0.25 as a large one.

The calibration sample is the fleet's: a machine that is steadier or noisier than the fleet has a
per-key PSI well above zero without any change (up to 1.74 over the machines of stationary
simulated fleets, windows of 500), while the pooled PSI stays near 9 / window (at most 0.032
there; `benchmarks/bench_drift.py`).
So the pooled PSI reaching `drift_psi` emits a drift event, and a key's only if `drift_key_psi`
is set (a limit chosen for the fleet); one event per crossing, re-armed once the PSI falls below
half its limit. Each key's reservoir and whether it is drifting
travel in the state record under `drift` (with the pooled flag under `*` in every partition's
record, as `pooled_drifting` beside the reservoir of a key that is itself named `*`), so a restart
continues them. A key named `*` is a key like any other: its crossings say `scope: "key"`; only its
per-key gauge is not exported, the label `key="*"` being the pooled statistic's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BINS", "DriftCrossing", "DriftStage", "psi"]

Partition = tuple[str, int]
BINS = 10
EXPECTED = 1.0 / BINS
OVERALL = "*"  # the key of the pooled statistic


def psi(counts: np.ndarray, expected: np.ndarray | None = None) -> float:
    """Population stability index of bin counts against the calibration shares: equal (the
    deciles') unless `expected` gives them; a bin whose expected share is 0 is left out (no
    score can fall in it)."""
    if expected is None:
        total = float(counts.sum())
        shares = (counts + 0.5) / (total + 0.5 * BINS)
        return float(np.sum((shares - EXPECTED) * np.log(shares / EXPECTED)))
    used = expected > 0
    counts, expected = counts[used], expected[used]
    shares = (counts + 0.5) / (float(counts.sum()) + 0.5 * len(counts))
    return float(np.sum((shares - expected) * np.log(shares / expected)))


@dataclass(frozen=True)
class DriftCrossing:
    """A key's (or, `pooled`, with key `*`, every key's pooled) PSI reached the setting."""

    key: str
    psi: float
    shares: tuple[float, ...]  # observed share of each calibration decile
    windows: int  # scores the statistic covers
    time_ms: int  # end of the window that crossed
    pooled: bool = False


class _Reservoir:
    __slots__ = ("counts", "drifting", "filled", "pos", "ring")

    def __init__(self, size: int) -> None:
        self.ring = np.zeros(size, dtype=np.uint8)
        self.counts = np.zeros(BINS, dtype=np.int64)
        self.pos = self.filled = 0
        self.drifting = False

    def push(self, bins: np.ndarray) -> np.ndarray:
        """Add bin numbers (oldest first); returns the change of `counts`."""
        size, m = len(self.ring), len(bins)
        before = self.counts.copy()
        if m >= size:
            self.ring[:] = bins[-size:]
            self.pos, self.filled = 0, size
            self.counts = np.bincount(self.ring, minlength=BINS).astype(np.int64)
            return self.counts - before
        slots = (self.pos + np.arange(m)) % size
        fresh = min(m, size - self.filled)
        if m > fresh:
            self.counts -= np.bincount(self.ring[slots[fresh:]], minlength=BINS)
        self.ring[slots] = bins
        self.counts += np.bincount(bins, minlength=BINS)
        self.pos, self.filled = (self.pos + m) % size, min(size, self.filled + m)
        return self.counts - before

    def ordered(self) -> np.ndarray:
        """The bin numbers held, oldest first."""
        if self.filled < len(self.ring):
            return self.ring[: self.filled].copy()
        return np.roll(self.ring, -self.pos)


class DriftStage:
    """Per-key score reservoirs and the PSI they give (a `KeyedState` stage named `drift`)."""

    def __init__(
        self, calibration_scores, window: int, limit: float, key_limit: float = 0.0
    ) -> None:
        cal = np.sort(np.asarray(calibration_scores, dtype=np.float64))
        self.edges = np.quantile(cal, np.arange(1, BINS) / BINS) if len(cal) else None
        # Tied calibration scores repeat a cut point: the bins then do not hold 10 % each (a bin
        # between equal cuts holds none), so each bin's expected share is its calibration share.
        self.expected = None
        if self.edges is not None and (np.diff(self.edges) == 0).any():
            self.expected = np.bincount(self.bins(cal), minlength=BINS) / len(cal)
        self.window, self.limit, self.key_limit = window, limit, key_limit
        self.keys: dict[Partition, dict[str, _Reservoir]] = {}
        self.pooled = np.zeros(BINS, dtype=np.int64)
        self.pooled_drifting = False

    @property
    def enabled(self) -> bool:
        return self.edges is not None

    def bins(self, scores: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.edges, scores, side="right").astype(np.uint8)

    def take(self, batch) -> tuple[dict[str, float], float | None, list[DriftCrossing]]:
        """A scored batch's windows (a `ScoredBatch`): the PSI of each key it touched whose
        reservoir is full, the pooled PSI, and the crossings to report."""
        bins = self.bins(batch.scored.scores)
        values, crossings = {}, []
        for key, partition, rows in batch.groups():
            end_ms = int(batch.end_ts[rows.stop - 1])
            value, crossing = self.update(key, partition, bins[rows], end_ms)
            if value is not None:
                values[key] = value
            if crossing is not None:
                crossings.append(crossing)
        pooled = None
        if self.pooled.sum() >= self.window:
            pooled, crossing = self._judge(OVERALL, self, self.pooled, int(batch.end_ts.max()))
            if crossing is not None:
                crossings.append(crossing)
        return values, pooled, crossings

    def update(
        self, key: str, partition: Partition, bins: np.ndarray, end_ms: int
    ) -> tuple[float | None, DriftCrossing | None]:
        """Take a key's new scores (as bins, oldest first): its PSI once its reservoir is full,
        and a crossing if that reached the limit."""
        reservoir = self.keys.setdefault(partition, {}).get(key)
        if reservoir is None:
            reservoir = self.keys[partition][key] = _Reservoir(self.window)
        self.pooled += reservoir.push(bins)
        if reservoir.filled < self.window:
            return None, None
        return self._judge(key, reservoir, reservoir.counts, end_ms)

    def _judge(self, key: str, holder, counts: np.ndarray, end_ms: int):
        value = psi(counts, self.expected)
        pooled = holder is self
        limit = self.limit if pooled else self.key_limit
        flag = "pooled_drifting" if pooled else "drifting"
        if getattr(holder, flag):
            if value < limit / 2:
                setattr(holder, flag, False)
            return value, None
        if not limit or value < limit:
            return value, None
        setattr(holder, flag, True)
        total = counts.sum()
        shares = tuple(round(float(c) / float(total), 4) for c in counts)
        return value, DriftCrossing(key, value, shares, int(total), end_ms, pooled)

    def limit_of(self, crossing: DriftCrossing) -> float:
        return self.limit if crossing.pooled else self.key_limit

    def recalibrate(self, calibration_scores) -> None:
        """A new model version: new deciles, and every reservoir starts again."""
        self.__init__(calibration_scores, self.window, self.limit, self.key_limit)

    # -- KeyedState ------------------------------------------------------------------------------
    def state(self, partition: Partition) -> dict:
        saved = {
            key: {"bins": "".join(map(str, r.ordered().tolist())), "drifting": r.drifting}
            for key, r in self.keys.get(partition, {}).items()
        }
        if OVERALL in saved:  # a key named `*`: the pooled flag rides beside its reservoir
            saved[OVERALL]["pooled_drifting"] = self.pooled_drifting
        else:
            saved[OVERALL] = {"drifting": self.pooled_drifting}  # the member's pooled statistic
        return saved

    def restore(self, partition: Partition, saved: dict) -> None:
        self.forget({partition})
        for key, part in saved.items():
            if key == OVERALL:
                pooled = part.get(
                    "pooled_drifting", None if "bins" in part else part.get("drifting")
                )
                self.pooled_drifting |= bool(pooled)
                if "bins" not in part:
                    continue
            bins = np.frombuffer(str(part.get("bins", "")).encode(), dtype=np.uint8) - ord("0")
            bins = bins[(bins < BINS)][-self.window :].astype(np.uint8)
            if len(bins):
                self.update(key, partition, bins, 0)
            reservoir = self.keys.setdefault(partition, {}).get(key)
            if reservoir is not None:
                reservoir.drifting = bool(part.get("drifting"))

    def keys_of(self, partitions: set[Partition]) -> set[str]:
        """The keys whose reservoirs these partitions hold."""
        return {key for p in partitions for key in self.keys.get(p, {})}

    def drop(self, partition: Partition, keys) -> None:
        held = self.keys.get(partition, {})
        for key in keys:
            reservoir = held.pop(key, None)
            if reservoir is not None:
                self.pooled -= reservoir.counts

    def forget(self, partitions: set[Partition]) -> None:
        for partition in partitions:
            for reservoir in self.keys.pop(partition, {}).values():
                self.pooled -= reservoir.counts

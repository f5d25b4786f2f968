"""Adaptive scoring per key: raw scores -> an anomaly probability relative to the key's own history.

Stage 1, `AdaptiveLikelihood` (an anomaly likelihood in the manner of HTM, with bounded memory).
A key's input is a row of C channels per window (C = 1: the window score; more columns, such as
per-feature errors, are channels of their own). For each key, for each row x_t in the key's order
(n = the key's count so far, this row included), per channel c with reference scale ref_c:

    x    = max(s, 0) / ref_c                        ref: the serving model's typical score
    a_s  = max(2 / (short + 1), 1 / n)              short horizon (a plain mean at first)
    m_t  = m + a_s (x - m)                          short-term mean of the scores
    z_t  = (m_t - mu) / max(sd, min_std)            against the long-term estimate before m_t
    Q_t  = Phi(-z_t)                                Gaussian upper tail (log via log_ndtr)

then the long-term estimate takes m_t, winsorised so that one excursion moves it only slowly:

    m'   = min(m_t, mu + clip * sd)                 (not clipped during the warm-up)
    a_l  = max(2 / (long + 1), 1 / n)
    d    = m' - mu;  mu += a_l d;  var = (1 - a_l) (var + a_l d^2)

With `freeze` > 0, a row whose surprise (below) is at or above `freeze` does not update mu and var
at all: an anomaly does not teach the key that it is normal, so the return to normal is not new.
After `max_freeze` such rows in a row the key learns again until its surprise falls below
`freeze` (a lasting change becomes the new normal instead of an excursion for ever).

Channels combine by their most surprising one: Q = min_c Q_c. Reported per window: the surprise
S = -log10 Q (5 <=> p = 1 - 1e-5), the anomaly likelihood p = 1 - Q, and HTM's log-likelihood
L = log(Q + 1e-10) / log(1e-10). During a key's first `warmup` rows: p = 0.5, S = 0, L = 0.

Stage 1b, `RangeCheck` (with `range_tolerance` > 0, as Numenta's NAB detector does with 0.05): a
window whose readings go beyond the range the key's readings have spanned so far, by more than
`range_tolerance` times that range, on any feature, is `beyond` its range. After the warm-up
such a window counts as a surprise of at least the threshold for the rule below, whatever its
likelihood: a level a key has never had is an anomaly even where the score's history is noisy.

Stage 2, `DetectionRule`: a detection fires when S >= threshold and the key is armed; firing
disarms it. It re-arms once S has stayed below rearm * threshold for `quiet` consecutive rows and
more than `cooldown` rows have passed since the last detection: one detection per excursion.

Both take batches of (slot, row) in arrival order, possibly several rows per slot: the k-th row of
every slot is one vectorised step (`rounds`), so a batch gives exactly what feeding the rows one
at a time would, in any interleaving of keys. What no step feeds back is done for the whole
batch at once: the Gaussian tails (without a freeze), and the rule's or the range check's whole
step when the batch cannot make either report anything (every surprise below the re-arm level:
the rule's counts only grow; every window within its key's range: the ranges stay). Slots are
small integers the caller gives keys. The state of a slot packs into 12 + 24 C bytes (stage),
16 F bytes (range of F features, when on) and 17 bytes (rule), bit for bit.

Size: over 400 lines because the three parts share one batching rule (rounds, whole-batch paths)
and one state layout, and a test checks their batches against their steps row by row.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "AdaptiveLikelihood",
    "AdaptiveScores",
    "AdaptiveSettings",
    "DetectionRule",
    "RangeCheck",
    "RuleSettings",
    "lifted",
    "rounds",
    "scores_from",
    "surprise_of",
]

_LN10 = math.log(10.0)
_LOG_1E10 = math.log(1e-10)
_LOG_HALF = math.log(0.5)
_BIG = 1e12  # bound on a scaled score, so that the variance stays finite


def rounds(slots: np.ndarray) -> list[np.ndarray]:
    """Positions of a batch in groups with at most one row per slot, a slot's rows in arrival
    order: group k holds the k-th row of every slot."""
    slots = np.asarray(slots, dtype=np.int64)
    if len(slots) == 0:
        return []
    order = np.argsort(slots, kind="stable")
    s = slots[order]
    if len(s) == 1 or (s[1:] != s[:-1]).all():
        return [np.arange(len(slots))]
    starts = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(s)]))
    rank = np.empty(len(s), np.int64)
    rank[order] = np.arange(len(s)) - run_start
    by_rank = np.argsort(rank, kind="stable")
    cuts = np.searchsorted(rank[by_rank], np.arange(1, rank.max() + 1))
    return np.split(by_rank, cuts)


def _log_ndtr(z: np.ndarray) -> np.ndarray:
    """log Phi(z), exact far into the tail."""
    return torch.special.log_ndtr(torch.from_numpy(np.ascontiguousarray(z))).numpy()


@dataclass(frozen=True)
class AdaptiveSettings:
    short: int = 30  # rows: span of the short-term mean
    long: int = 1000  # rows: span of the long-term mean and variance
    warmup: int = 200  # rows of a key before it reports (it never detects before)
    clip: float = 3.0  # winsorise the long-term update at mu + clip * sd
    min_std: float = 0.1  # floor on the long-term sd, in units of ref
    freeze: float = 0.0  # rows at or above this surprise do not teach the estimate (0: all do)
    max_freeze: int = 1000  # ... for at most this many rows in a row
    range_tolerance: float = 0.0  # beyond the key's range by this share of it: anomalous (0: off)

    def __post_init__(self) -> None:
        if self.short < 1 or self.long < 1 or self.warmup < 0 or self.max_freeze < 0:
            raise ValueError(f"adaptive horizons out of range: {self}")
        if self.freeze < 0 or self.range_tolerance < 0:
            raise ValueError(f"adaptive freeze and range tolerance must be >= 0: {self}")
        if not (self.clip > 0 and self.min_std > 0):
            raise ValueError(f"adaptive clip and min_std must be > 0: {self}")


@dataclass(frozen=True)
class RuleSettings:
    threshold: float = 5.0  # on the surprise S = -log10 Q
    rearm: float = 0.9  # re-arm after S < rearm * threshold ...
    quiet: int = 10  # ... for this many consecutive rows ...
    cooldown: int = 100  # ... and more than this many rows after the last detection

    def __post_init__(self) -> None:
        if not (self.threshold > 0 and 0 < self.rearm <= 1) or self.quiet < 1 or self.cooldown < 0:
            raise ValueError(f"detection rule out of range: {self}")


@dataclass
class AdaptiveScores:
    """Per window: likelihood p, log-likelihood L, surprise S and the rule's detection."""

    likelihood: np.ndarray
    log_likelihood: np.ndarray
    surprise: np.ndarray
    detection: np.ndarray
    beyond: np.ndarray | None = None  # past the warm-up and beyond the key's range

    @classmethod
    def empty(cls, n: int) -> AdaptiveScores:
        nan = np.full(n, np.nan)
        return cls(nan, nan.copy(), nan.copy(), np.zeros(n, bool), np.zeros(n, bool))

    def deciding_surprise(self, floor: float = np.inf) -> np.ndarray:
        """The surprise a decision looks at: a window beyond its key's range counts as at
        least `floor` (any threshold when infinite)."""
        return self.surprise if self.beyond is None else lifted(self.surprise, self.beyond, floor)

    def anomalous(self, threshold: float) -> np.ndarray:
        """What makes a window anomalous when alarms follow the stage: a surprise at or above
        the threshold, or a window beyond its key's range."""
        return self.deciding_surprise() >= threshold


def _grow(array: np.ndarray, size: int, fill) -> np.ndarray:
    new = np.full((size, *array.shape[1:]), fill, array.dtype)
    new[: len(array)] = array
    return new


class AdaptiveLikelihood:
    """The likelihood of every slot, for rows of `len(refs)` channels."""

    def __init__(self, settings: AdaptiveSettings, refs, capacity: int = 16) -> None:
        self.settings = settings
        self.refs = np.asarray(refs, dtype=np.float64).reshape(-1)
        if not len(self.refs) or not (self.refs > 0).all():
            raise ValueError(f"adaptive reference scales must be > 0, got {self.refs}")
        self.channels = len(self.refs)
        self.a_short = 2.0 / (settings.short + 1)
        self.a_long = 2.0 / (settings.long + 1)
        self.pack_format = struct.Struct(f"<qi{3 * self.channels}d")
        self.n = np.zeros(capacity, np.int64)
        self.frozen = np.zeros(capacity, np.int32)
        self.m = np.zeros((capacity, self.channels))
        self.mu = np.zeros((capacity, self.channels))
        self.var = np.zeros((capacity, self.channels))

    def ensure(self, size: int) -> None:
        if size > len(self.n):
            size = max(size, 2 * len(self.n))
            self.n = _grow(self.n, size, 0)
            self.frozen = _grow(self.frozen, size, 0)
            self.m, self.mu, self.var = (_grow(a, size, 0.0) for a in (self.m, self.mu, self.var))

    def reset(self, slots) -> None:
        """These slots start again from nothing."""
        self.n[slots] = self.frozen[slots] = 0
        self.m[slots] = self.mu[slots] = self.var[slots] = 0.0

    def update(self, slots, rows, order=None) -> tuple[np.ndarray, np.ndarray]:
        """log Q per row of a batch of (slot, [C] row) in arrival order, and whether the row's
        key was past its warm-up. `order`: the batch's `rounds(slots)`, when already known."""
        slots = np.asarray(slots, np.int64)
        rows = np.asarray(rows, np.float64).reshape(len(slots), self.channels)
        logq = np.full(len(slots), _LOG_HALF)
        live = np.zeros(len(slots), bool)
        if not len(slots):
            return logq, live
        self.ensure(int(slots.max()) + 1)
        x = np.maximum(rows, 0.0) / self.refs
        x = np.minimum(np.where(np.isfinite(x), x, _BIG), _BIG)
        if self.settings.freeze > 0:  # a row's surprise decides whether it teaches the key
            for pos in rounds(slots) if order is None else order:
                logq[pos], live[pos] = self.step(slots[pos], x[pos])
            return logq, live
        # nothing that follows depends on a row's surprise: the tails of the whole batch at once
        z = np.zeros_like(x)
        for pos in rounds(slots) if order is None else order:
            z[pos], live[pos] = self._advance(slots[pos], x[pos])
        if live.any():
            logq[live] = _log_ndtr(-z[live]).min(axis=1)
        return logq, live

    def step(self, k: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One scaled row (`x`, see `update`) for each of the distinct slots `k`: log Q and
        whether it is past warm-up."""
        n, m, mu, var, sd, live = self._short_term(k, x)
        logq = np.where(live, _log_ndtr(-((m - mu) / sd)).min(axis=1), _LOG_HALF)
        a = np.maximum(self.a_long, 1.0 / n)[:, None]
        freeze = self.settings.freeze
        if freeze > 0:
            # rows in a row at or above `freeze`, counted up to max_freeze + 1 (learning again)
            count = np.where(live & (logq <= -freeze * _LN10), self.frozen[k] + 1, 0)
            count = np.minimum(count, self.settings.max_freeze + 1)
            self.frozen[k] = count
            a = np.where(((count > 0) & (count <= self.settings.max_freeze))[:, None], 0.0, a)
        self._learn(k, n, m, mu, var, sd, live, a)
        return logq, live

    def _advance(self, k: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`step` without a freeze: the row's z against the estimate before it, whether it is
        past warm-up, and the estimate learns the row."""
        n, m, mu, var, sd, live = self._short_term(k, x)
        self._learn(k, n, m, mu, var, sd, live, np.maximum(self.a_long, 1.0 / n)[:, None])
        return (m - mu) / sd, live

    def _short_term(self, k: np.ndarray, x: np.ndarray) -> tuple:
        """The slots' count and short-term mean with the row, and the long-term estimate (mean,
        variance, floored sd) before it; whether each is past warm-up."""
        n = self.n[k] + 1
        m_old, mu, var = self.m[k], self.mu[k], self.var[k]
        m = m_old + np.maximum(self.a_short, 1.0 / n)[:, None] * (x - m_old)
        sd = np.maximum(np.sqrt(var), self.settings.min_std)
        return n, m, mu, var, sd, n > self.settings.warmup

    def _learn(self, k, n, m, mu, var, sd, live, a) -> None:
        """The long-term estimate takes the short-term mean `m`, winsorised past warm-up."""
        clipped = np.where(live[:, None], np.minimum(m, mu + self.settings.clip * sd), m)
        d = clipped - mu
        self.mu[k] = mu + a * d
        self.var[k] = (1.0 - a) * (var + a * d * d)
        self.m[k], self.n[k] = m, n

    def pack_rows(self, slots: np.ndarray) -> np.ndarray:
        """The slots' states as `pack_format` lays them out: [len(slots), its size] bytes."""
        c = self.channels
        rows = np.empty(len(slots), [("n", "<i8"), ("frozen", "<i4"), ("f", "<f8", (3 * c,))])
        rows["n"], rows["frozen"] = self.n[slots], self.frozen[slots]
        rows["f"] = np.concatenate([self.m[slots], self.mu[slots], self.var[slots]], axis=1)
        return _bytes(rows)

    def pack(self, slot: int) -> bytes:
        return self.pack_rows(np.array([slot])).tobytes()

    @property
    def legacy_size(self) -> int:
        """Bytes of a slot's state as written before the freeze count was kept."""
        return self.pack_format.size - 4

    def unpack(self, slot: int, blob: bytes) -> None:
        self.ensure(slot + 1)
        if len(blob) == self.legacy_size:  # no freeze count: the key was not held
            blob = blob[:8] + b"\0\0\0\0" + blob[8:]
        n, frozen, *fields = self.pack_format.unpack(blob)
        c = self.channels
        self.n[slot], self.frozen[slot] = n, frozen
        self.m[slot], self.mu[slot], self.var[slot] = (
            fields[:c],
            fields[c : 2 * c],
            fields[2 * c :],
        )


class RangeCheck:
    """Per slot, the range [lo, hi] of each of F features' readings so far; a window beyond it by
    more than `tolerance` times its width (once the range has a width) is flagged."""

    def __init__(self, tolerance: float, features: int, capacity: int = 16) -> None:
        self.tolerance, self.features = float(tolerance), int(features)
        self.pack_format = struct.Struct(f"<{2 * self.features}d")
        self.lo = np.full((capacity, self.features), np.inf)
        self.hi = np.full((capacity, self.features), -np.inf)

    def ensure(self, size: int) -> None:
        if size > len(self.lo):
            size = max(size, 2 * len(self.lo))
            self.lo, self.hi = _grow(self.lo, size, np.inf), _grow(self.hi, size, -np.inf)

    def reset(self, slots) -> None:
        self.lo[slots], self.hi[slots] = np.inf, -np.inf

    def update(self, slots, lo, hi, order=None) -> np.ndarray:
        """Beyond (bool per row) for a batch of (slot, window minima [F], maxima [F]) in arrival
        order; each row then widens its slot's range. `order`: as for the likelihood."""
        slots = np.asarray(slots, np.int64)
        lo = np.asarray(lo, np.float64).reshape(len(slots), self.features)
        hi = np.asarray(hi, np.float64).reshape(len(slots), self.features)
        out = np.zeros(len(slots), bool)
        if len(slots):
            self.ensure(int(slots.max()) + 1)
            if (lo >= self.lo[slots]).all() and (hi <= self.hi[slots]).all():
                return out  # every row within its key's range so far: nothing beyond, or new
            for pos in rounds(slots) if order is None else order:
                out[pos] = self.step(slots[pos], lo[pos], hi[pos])
        return out

    def step(self, k: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        seen_lo, seen_hi = self.lo[k], self.hi[k]
        width = seen_hi - seen_lo
        margin = self.tolerance * width
        with np.errstate(invalid="ignore"):  # a first row: inf - inf
            beyond = (width > 0) & ((hi > seen_hi + margin) | (lo < seen_lo - margin))
        finite = np.isfinite(lo) & np.isfinite(hi)
        self.lo[k] = np.where(finite, np.minimum(seen_lo, lo), seen_lo)
        self.hi[k] = np.where(finite, np.maximum(seen_hi, hi), seen_hi)
        return beyond.any(axis=1)

    def pack_rows(self, slots: np.ndarray) -> np.ndarray:
        """The slots' states as `pack_format` lays them out: [len(slots), its size] bytes."""
        f = self.features
        rows = np.empty(len(slots), [("lo", "<f8", (f,)), ("hi", "<f8", (f,))])
        rows["lo"], rows["hi"] = self.lo[slots], self.hi[slots]
        return _bytes(rows)

    def pack(self, slot: int) -> bytes:
        return self.pack_rows(np.array([slot])).tobytes()

    def unpack(self, slot: int, blob: bytes) -> None:
        self.ensure(slot + 1)
        fields = self.pack_format.unpack(blob)
        self.lo[slot], self.hi[slot] = fields[: self.features], fields[self.features :]


class DetectionRule:
    """One detection per excursion of the surprise, per slot."""

    pack_format = struct.Struct("<?qq")
    _NEVER = np.iinfo(np.int64).max // 2

    def __init__(self, settings: RuleSettings, capacity: int = 16) -> None:
        self.settings = settings
        # per slot, so that one rule can try many thresholds at once (the NAB benchmark's sweep)
        self.threshold = np.full(capacity, float(settings.threshold))
        self.armed = np.ones(capacity, bool)
        self.since = np.full(capacity, self._NEVER, np.int64)
        self.below = np.zeros(capacity, np.int64)

    def ensure(self, size: int) -> None:
        if size > len(self.armed):
            size = max(size, 2 * len(self.armed))
            self.threshold = _grow(self.threshold, size, float(self.settings.threshold))
            self.armed = _grow(self.armed, size, True)
            self.since = _grow(self.since, size, self._NEVER)
            self.below = _grow(self.below, size, 0)

    def reset(self, slots) -> None:
        self.armed[slots], self.since[slots], self.below[slots] = True, self._NEVER, 0

    def update(self, slots, surprise, order=None) -> np.ndarray:
        """Detections (bool per row) for a batch of (slot, S) in arrival order. `order`: as
        for the likelihood."""
        slots = np.asarray(slots, np.int64)
        surprise = np.asarray(surprise, np.float64)
        out = np.zeros(len(slots), bool)
        if len(slots):
            self.ensure(int(slots.max()) + 1)
            if (surprise < self.settings.rearm * self.threshold[slots]).all():
                self._quiet(slots)
                return out
            for pos in rounds(slots) if order is None else order:
                out[pos] = self.step(slots[pos], surprise[pos])
        return out

    def _quiet(self, slots: np.ndarray) -> None:
        """`step` over rows that all stay below the re-arm level: none fires, and each slot's
        counts grow by its rows (re-arming, should it, by its last one: the counts only grow)."""
        k, rows = np.unique(slots, return_counts=True)
        since = np.minimum(self.since[k] + rows, self._NEVER)
        below = self.below[k] + rows
        rule = self.settings
        self.armed[k] |= (below >= rule.quiet) & (since > rule.cooldown)
        self.since[k], self.below[k] = since, below

    def step(self, k: np.ndarray, s: np.ndarray) -> np.ndarray:
        rule, threshold = self.settings, self.threshold[k]
        since = np.minimum(self.since[k] + 1, self._NEVER)
        below = np.where(s < rule.rearm * threshold, self.below[k] + 1, 0)
        armed = self.armed[k] | ((below >= rule.quiet) & (since > rule.cooldown))
        fire = armed & (s >= threshold)
        self.armed[k] = armed & ~fire
        self.since[k] = np.where(fire, 0, since)
        self.below[k] = below
        return fire

    def pack_rows(self, slots: np.ndarray) -> np.ndarray:
        """The slots' states as `pack_format` lays them out: [len(slots), its size] bytes."""
        rows = np.empty(len(slots), [("armed", "?"), ("since", "<i8"), ("below", "<i8")])
        rows["armed"], rows["since"], rows["below"] = (
            self.armed[slots],
            self.since[slots],
            self.below[slots],
        )
        return _bytes(rows)

    def pack(self, slot: int) -> bytes:
        return self.pack_rows(np.array([slot])).tobytes()

    def unpack(self, slot: int, blob: bytes) -> None:
        self.ensure(slot + 1)
        self.armed[slot], self.since[slot], self.below[slot] = self.pack_format.unpack(blob)


def _bytes(rows: np.ndarray) -> np.ndarray:
    """A packed structured array's rows as bytes: [rows, itemsize] uint8."""
    return rows.view(np.uint8).reshape(len(rows), rows.dtype.itemsize)


def lifted(surprise: np.ndarray, beyond: np.ndarray, floor: float = np.inf) -> np.ndarray:
    """The surprise with windows beyond their key's range raised to at least `floor`."""
    return np.where(beyond, np.maximum(surprise, floor), surprise)


def surprise_of(logq: np.ndarray, live: np.ndarray) -> np.ndarray:
    """S = -log10 Q past the warm-up, 0 during it."""
    return np.where(live, -logq / _LN10, 0.0)


def scores_from(
    logq: np.ndarray, live: np.ndarray, detection: np.ndarray, beyond: np.ndarray | None = None
) -> AdaptiveScores:
    """The reported values of a batch from its log Q (0.5, 0 and 0 during warm-up)."""
    q = np.exp(logq)
    return AdaptiveScores(
        likelihood=np.where(live, 1.0 - q, 0.5),
        log_likelihood=np.where(live, np.log(q + 1e-10) / _LOG_1E10, 0.0),
        surprise=surprise_of(logq, live),
        detection=detection,
        beyond=np.zeros(len(logq), bool) if beyond is None else beyond & live,
    )

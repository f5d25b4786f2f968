"""The four parts every dataset is cut into, and the rules of their sizes.

`train` fits the model, `validation` stops training, `calibration` sets the alert threshold and
`test` measures it, each disjoint from the others. Series are cut per key in time order, images
after a seeded shuffle; both follow `check_fractions` and `part_counts`.

`Splits` is what training, calibration and evaluation ask of data cut into parts, however it is
held: in memory (`training.data.prepared`) or read again on every pass (`training.data.
out_of_core`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pandas as pd

from pipeline.errors import DataError

if TYPE_CHECKING:  # the detector module loads torch
    from pipeline.detector import Detector, InputSpec, Scaler

__all__ = [
    "MIN_WINDOW",
    "PARTS",
    "SplitScores",
    "Splits",
    "calibration_hints",
    "check_fractions",
    "check_part_sizes",
    "floor_counts",
    "parse_time_limit",
    "part_counts",
    "part_windows",
    "plan_short_series",
    "short_series_settings",
    "windows_in",
]

log = logging.getLogger(__name__)
PARTS = ("train", "validation", "calibration", "test")
# Small slack so that floor(n * fraction) is not one short when the product is an integer that
# floating point rounds to just below it (10 * 0.7 == 6.999...).
_FLOOR_SLACK = 1e-9
_PARTS = PARTS


@dataclass(frozen=True)
class SplitScores:
    """Anomaly scores of every window (or image) of a split, with its labels and normal mask:
    `labels` (or None without labels) is what a stream decides on (a window's last reading, an
    image's class); `normal` marks those holding no labelled anomaly at all."""

    scores: np.ndarray
    labels: np.ndarray | None
    normal: np.ndarray


class Splits(Protocol):
    """Data cut into parts, as training, calibration and evaluation use it: the input it gives
    a detector, the scaler of its train part, and per part its windows' scores with labels."""

    input: InputSpec
    scaler: Scaler

    @property
    def digest(self) -> str:
        """SHA-256 of the content, the same however the data is held."""

    @property
    def time_range(self) -> tuple[str, str] | None: ...

    def has(self, split: str) -> bool: ...

    def window_counts(self) -> dict[str, int]: ...

    def first_sample(self, split: str) -> np.ndarray | None:
        """One raw window (or image) of the split, e.g. for an input example."""

    def split_scores(self, detector: Detector, split: str) -> SplitScores: ...

    def term_statistics(self, detector: Detector, split: str, limit: int) -> np.ndarray:
        """The terms score's statistics [N, T, F] of (at most about `limit` of) the split's
        normal windows (`Detector.term_statistics`)."""

    def fit_inputs(self, config, *, batch_size, shuffle_windows, seed, context, device):
        """(training input, validation input or None) for `training.fit.fit`: scaled tensors,
        or streams of batches."""

    def evaluate(
        self,
        detector: Detector,
        split: str,
        rule: str = "end",
        scores: np.ndarray | None = None,
        threshold: float | None = None,
    ) -> dict | None:
        """Metrics of a labelled split (decided against `threshold`, default the detector's);
        None when there is nothing to evaluate point by point."""

    def figures(self, detector: Detector, split: str, scores: np.ndarray) -> dict:
        """Figures that only this kind of data has (image reconstructions), by name."""


def parse_time_limit(train_until: str, source: str) -> np.int64:
    """`train_until` as int64 nanoseconds, naive UTC, comparable with the series' times."""
    try:
        stamp = pd.Timestamp(train_until)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{source}: train_until={train_until!r} is not a time: {exc}") from exc
    if pd.isna(stamp):
        raise DataError(f"{source}: train_until={train_until!r} is not a time")
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    return np.int64(stamp.as_unit("ns").value)


def part_counts(
    n: int,
    weights: Sequence[float],
    n_train: int | None = None,
    *,
    where: str = "",
    source: str = "series",
    train_until: str | None = None,
) -> list[int]:
    """Rows of one key's time-ordered series in train, validation, calibration and test.

    `weights` come from `check_fractions`. Without `n_train` (the rows at or before
    `train_until`), sizes are floor(n * fraction) with the remainder to train; with it, the rest
    is shared among the other three parts by largest remainders. `where` names the key in
    messages. The one rule of `split_series`, also applied by the out-of-core reader.
    """
    if n_train is None:
        return floor_counts(n, weights)
    rest = n - n_train
    if rest and not any(weights[1:]):
        raise DataError(
            f"{source}: {rest} rows{where} come after train_until={train_until} but the "
            "validation, calibration and test fractions are all 0"
        )
    return [n_train, *_largest_remainder(rest, weights[1:])]


def check_part_sizes(
    totals: Sequence[int],
    weights: Sequence[float],
    n_rows: int,
    *,
    source: str,
    train_until: str | None = None,
    keys: int = 1,
    longest: int | None = None,
) -> None:
    """Refuse an empty part whose fraction is not 0 (or an empty train part with train_until),
    saying why: `keys` series were split, each on its own, the `longest` of `n_rows` in all."""
    for part, weight, total in zip(_PARTS, weights, totals, strict=True):
        required = weight > 0 or (part == "train" and train_until is not None)
        if not required or total:
            continue
        each = f" ({keys} keys, each split on its own in time order)" if keys > 1 else ""
        if part == "train" and train_until is not None:
            why = f"no row is at or before train_until={train_until}"
        elif train_until is not None and totals[0] == n_rows:
            why = f"every row is at or before train_until={train_until}"
        elif train_until is not None:
            rest = n_rows - totals[0]
            why = f"the {rest} rows after train_until={train_until}{each} are too few for "
            why += f"fraction {weight:g} of them"
        elif keys > 1:
            why = f"the longest of the {keys} keys has {longest} rows, too few for fraction "
            why += f"{weight:g} (each key's rows are split on their own, in time order)"
        else:
            why = f"{n_rows} rows are too few for fraction {weight:g}"
        raise DataError(f"{source}: the {part} part would be empty: {why}")


def check_fractions(fractions: Sequence[float], source: str) -> list[float]:
    """Four finite, non-negative fractions summing to 1 (within 1e-6), normalised to sum 1."""
    try:
        values = [float(f) for f in fractions]
    except (TypeError, ValueError) as exc:
        raise DataError(f"{source}: fractions {fractions!r} are not numbers") from exc
    if len(values) != len(_PARTS):
        raise DataError(f"{source}: {len(values)} fractions given; need 4 ({', '.join(_PARTS)})")
    if not all(math.isfinite(f) and f >= 0 for f in values):
        raise DataError(f"{source}: fractions {values} must be finite and non-negative")
    total = math.fsum(values)
    if abs(total - 1.0) > 1e-6:
        raise DataError(f"{source}: fractions {values} sum to {total:g}, not 1")
    return [f / total for f in values]


def floor_counts(n: int, weights: Sequence[float]) -> list[int]:
    """floor(n * weight) for every part but train, which takes the remainder."""
    rest = [math.floor(n * w + _FLOOR_SLACK) for w in weights[1:]]
    return [n - sum(rest), *rest]


def _largest_remainder(n: int, weights: Sequence[float]) -> list[int]:
    """Share `n` rows in proportion to `weights`; leftovers go to the largest remainders."""
    total = math.fsum(weights)
    if n == 0 or total == 0:
        return [0] * len(weights)
    shares = [n * w / total for w in weights]
    counts = [math.floor(s + _FLOOR_SLACK) for s in shares]
    leftover = n - sum(counts)
    ranked = sorted(
        (i for i, w in enumerate(weights) if w > 0), key=lambda i: (counts[i] - shares[i], i)
    )
    for i in ranked[:leftover]:
        counts[i] += 1
    return counts


# -- short series: a split that fits, and flags that would ------------------------------------
MIN_WINDOW = 8  # the shortest window the split plan and the hints propose


def windows_in(rows: int, window: int, stride: int = 1) -> int:
    return 0 if rows < window else (rows - window) // stride + 1


def part_windows(
    key_rows: Sequence[int], fractions: Sequence[float], window: int, stride: int = 1
) -> list[int]:
    """Windows per part (train, validation, calibration, test) over keys of `key_rows` rows."""
    totals = [0] * len(_PARTS)
    for rows in key_rows:
        for i, count in enumerate(floor_counts(rows, fractions)):
            totals[i] += windows_in(count, window, stride)
    return totals


def plan_short_series(
    key_rows: Sequence[int],
    window: int,
    stride: int,
    fractions: Sequence[float],
    min_windows: int,
    source: str = "series",
) -> tuple[int, tuple[float, ...]]:
    """The split of default flags for series too short for them: when calibration gets fewer
    than `min_windows` windows, (1) its share takes the test rows (there is then no held-out
    false-positive estimate), and (2) the window halves (not below `MIN_WINDOW`) until
    validation and calibration hold `min_windows` windows each. A change is logged as a
    warning. Returns (window, fractions)."""
    fractions, w, changes = tuple(fractions), window, []
    counts = part_windows(key_rows, fractions, w, stride)
    if counts[2] < min_windows and fractions[3] > 0:
        fractions = (fractions[0], fractions[1], fractions[2] + fractions[3], 0.0)
        changes.append("the test rows go to calibration (no held-out false-positive estimate)")
        counts = part_windows(key_rows, fractions, w, stride)
    while min(counts[1], counts[2]) < min_windows and w > MIN_WINDOW:
        w = max(MIN_WINDOW, w // 2)
        counts = part_windows(key_rows, fractions, w, stride)
    if w != window:
        changes.append(f"window {window} -> {w}")
    if changes:
        log.warning(
            "%s: %d rows are short for the default split: %s (--window %d --fractions %s)",
            source,
            sum(key_rows),
            "; ".join(changes),
            w,
            ",".join(f"{f:g}" for f in fractions),
        )
    return w, fractions


def short_series_settings(settings, table):
    """`settings` with the window and fractions `plan_short_series` gives `table`'s keys."""
    from dataclasses import replace

    from training.calibrate import MIN_WINDOWS

    key_rows = [len(positions) for _, positions in table._group_positions()]
    window, fractions = plan_short_series(
        key_rows, settings.window, settings.stride, settings.fractions, MIN_WINDOWS, table.source
    )
    return replace(settings, window=window, fractions=fractions)


def calibration_hints(
    key_rows: Sequence[int],
    window: int,
    stride: int,
    fractions: Sequence[float],
    needed: int,
) -> str:
    """Flags and values that give the calibration part `needed` windows on these rows: a
    shorter --window, or a larger calibration share of --fractions (taken from train, which
    keeps at least 40 %), with this window or with `MIN_WINDOW`."""
    hints = []
    for w in range(window - 1, MIN_WINDOW - 1, -1):
        counts = part_windows(key_rows, fractions, w, stride)
        if counts[2] >= needed and counts[0] > 0:
            hints.append(f"--window {w}")
            break
    for w in dict.fromkeys((window, MIN_WINDOW)):
        larger = _larger_calibration(key_rows, fractions, w, stride, needed)
        if larger is not None:
            hint = "--fractions " + ",".join(f"{f:g}" for f in larger)
            hints.append(hint + (f" --window {w}" if w != window else ""))
            break
    if hints:
        return "for these data " + " or ".join(hints) + " would work"
    rows = math.ceil((MIN_WINDOW + (needed - 1) * stride) / 0.25)
    return (
        f"{max(key_rows, default=0)} rows per key are too few: about {rows} are needed "
        f"(--window {MIN_WINDOW} --fractions 0.6,0.15,0.25,0)"
    )


def _larger_calibration(key_rows, fractions, window, stride, needed) -> tuple | None:
    """The smallest calibration share (in steps of 0.01, taken from train while it keeps 40 %)
    that gives `needed` calibration windows."""
    share = round(fractions[2] + 0.01, 2)
    while (train := round(1 - fractions[1] - share - fractions[3], 2)) >= 0.4:
        new = (train, fractions[1], share, fractions[3])
        counts = part_windows(key_rows, new, window, stride)
        if counts[2] >= needed and counts[0] > 0:
            return new
        share = round(share + 0.01, 2)
    return None

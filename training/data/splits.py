"""The four parts every dataset is cut into, and the rules of their sizes.

`train` fits the model, `validation` stops training, `calibration` sets the alert threshold and
`test` measures it, each disjoint from the others. Series are cut per key in time order, images
after a seeded shuffle; both follow `check_fractions` and `part_counts`.

`Splits` is what training, calibration and evaluation ask of data cut into parts, however it is
held: in memory (`training.data.prepared`) or read again on every pass (`training.data.
out_of_core`).
"""

from __future__ import annotations

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
    "PARTS",
    "SplitScores",
    "Splits",
    "check_fractions",
    "check_part_sizes",
    "floor_counts",
    "parse_time_limit",
    "part_counts",
]

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
) -> None:
    """Refuse an empty part whose fraction is not 0 (or an empty train part with train_until)."""
    for part, weight, total in zip(_PARTS, weights, totals, strict=True):
        required = weight > 0 or (part == "train" and train_until is not None)
        if required and total == 0:
            why = (
                f"no row is at or before train_until={train_until}"
                if part == "train" and train_until is not None
                else f"{n_rows} rows are too few for fraction {weight:g}"
            )
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

"""Multivariate time series: one or more entities (keys), read, cleaned, fingerprinted and split.

`load_series` reads CSV or Parquet (see `training.data.columns` for how each column is read and
what a gap does) into a `SeriesTable`, sorted by key then time; `split_series` cuts each key's
rows in time order into the four parts (`training.data.splits`); `series_groups` hands a table to
`cut_windows`, the window rule shared with the worker. A table carries a `digest()` of its
content, never of its path. Anything that makes the data unusable raises `DataError` with a
message that names the file and, where it applies, the column or the 1-based data row.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import DataError
from training.data.columns import (
    FILL_POLICIES,
    fill_gaps,
    first_true,
    in_float32_range,
    parse_keys,
    parse_labels,
    parse_numeric,
    parse_times,
    read_table,
    refuse_gaps,
    select_columns,
    tell_repeats,
)
from training.data.splits import (
    PARTS,
    check_fractions,
    check_part_sizes,
    parse_time_limit,
    part_counts,
)

__all__ = [
    "SeriesTable",
    "auto_calendar_table",
    "load_series",
    "series_groups",
    "split_series",
    "with_calendar",
]


@dataclass(frozen=True, eq=False)
class SeriesTable:
    """Multivariate time series, one or more entities (keys), sorted by key then time.

    `frame` has the index 0..n-1 and the columns `time_col` (datetime64[ns], naive UTC),
    `key_col` (str) when there is one, the `features` (float64, finite) and `label_col`
    (int64, 0 or 1) when there is one. `source` is the file it was read from; it appears in
    messages but never in `digest()`. Equality is identity: two tables with the same content
    compare by `digest()`.
    """

    frame: pd.DataFrame
    time_col: str
    key_col: str | None
    features: tuple[str, ...]
    label_col: str | None
    source: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        named = [self.time_col, *self.features]
        named += [c for c in (self.key_col, self.label_col) if c is not None]
        missing = [c for c in named if c not in self.frame.columns]
        if missing:
            raise DataError(
                f"{self.source}: the table lacks the column(s) {', '.join(map(repr, missing))}"
            )

    def __len__(self) -> int:
        return len(self.frame)

    def keys(self) -> list[str]:
        """Entity keys in sorted order; `[""]` (one empty key) when there is no key column."""
        if self.key_col is None:
            return [""]
        return sorted({str(k) for k in self.frame[self.key_col]})

    def groups(self) -> Iterator[tuple[str, pd.DataFrame]]:
        """Yield `(key, rows of that key sorted by time)`, keys in sorted order.

        The rows keep their index in `frame`, so a result can be mapped back to the table. With
        no key column the single group has the key `""`.
        """
        for key, positions in self._group_positions():
            yield key, self.frame.iloc[positions]

    def normal_rows(self) -> SeriesTable:
        """The rows not labelled anomalous (all of them without a label column): what the
        scaler and the keys' baselines are fitted on."""
        if self.label_col is None:
            return self
        normal = self.frame[self.label_col].to_numpy() == 0
        if normal.all():
            return self
        frame = self.frame.loc[normal].reset_index(drop=True)
        return SeriesTable(
            frame, self.time_col, self.key_col, self.features, self.label_col, self.source
        )

    def values(self) -> np.ndarray:
        """The features as float32 `[n, F]`, columns in `features` order."""
        return self.frame.loc[:, list(self.features)].to_numpy(dtype=np.float32)

    def digest(self) -> str:
        """SHA-256 (hex) of the feature values (float32), times (int64 ns) and keys.

        Computed from little-endian bytes so it is the same on every machine and run; the path,
        column names and labels do not enter it.
        """
        values = np.ascontiguousarray(self.values(), dtype="<f4")
        h = hashlib.sha256(b"aewatch.series/1\0")
        h.update(struct.pack("<qq", *values.shape))
        h.update(values.tobytes())
        h.update(np.ascontiguousarray(self._times_ns(), dtype="<i8").tobytes())
        if self.key_col is not None:
            encoded = [str(k).encode("utf-8") for k in self.frame[self.key_col]]
            h.update(np.asarray([len(b) for b in encoded], dtype="<i8").tobytes())
            h.update(b"".join(encoded))
        return h.hexdigest()

    def time_range(self) -> tuple[str, str]:
        """The first and last timestamp of the table, ISO-8601."""
        if len(self.frame) == 0:
            raise DataError(f"{self.source}: the table is empty, so it has no time range")
        times = self.frame[self.time_col]
        return pd.Timestamp(times.min()).isoformat(), pd.Timestamp(times.max()).isoformat()

    def _times_ns(self) -> np.ndarray:
        return self.frame[self.time_col].to_numpy(dtype="datetime64[ns]").view(np.int64)

    def _group_positions(self) -> list[tuple[str, np.ndarray]]:
        """`(key, positions in frame sorted by time)` for each key, keys in sorted order."""
        times = self._times_ns()
        if self.key_col is None:
            groups = [("", np.arange(len(self.frame)))]
        else:
            indices = self.frame.groupby(self.key_col, sort=False).indices
            groups = sorted(
                ((str(k), np.asarray(v, dtype=np.int64)) for k, v in indices.items()),
                key=lambda item: item[0],
            )
        return [(key, pos[np.argsort(times[pos], kind="stable")]) for key, pos in groups]


def load_series(
    path: str | Path,
    *,
    time_col: str,
    key_col: str | None = None,
    features: Sequence[str] | None = None,
    label_col: str | None = None,
    fill: str = "error",
    sep: str | None = None,
) -> SeriesTable:
    """Read a time series from CSV or Parquet, check it, fill its gaps and sort it.

    `path` is a `.csv`, `.csv.gz` or `.txt` file (separator `sep`, or the first of `,` `;` and
    tab whose header holds `time_col`), a `.parquet`/`.pq` file, or a directory of Parquet files.
    Times are ISO-8601 strings (converted to naive UTC) or, in a numeric column, epoch
    milliseconds. `features` defaults to every numeric column other than the time, key and label
    columns (and pandas' `Unnamed: i` placeholders for headerless columns). Infinite feature
    values, and values beyond float32's range (which the model cannot hold), count as missing, and `fill` (one of `FILL_POLICIES`) decides what happens to missing
    values: `error` refuses them, `ffill` carries the last value forward within each key (and
    the first one back over a leading gap), `interpolate` interpolates linearly by position within
    each key (holding the end values at the edges), `drop` drops the rows. Labels become 0/1.
    """
    source = str(path)
    if fill not in FILL_POLICIES:
        raise DataError(
            f"{source}: unknown fill policy {fill!r}; allowed: {', '.join(FILL_POLICIES)}"
        )
    file = Path(path)
    if not file.exists():
        raise DataError(f"{source}: no such file or directory")
    raw = read_table(file, source, time_col=time_col, key_col=key_col, sep=sep)
    if len(raw) == 0:
        raise DataError(f"{source}: the file has no data rows")
    names = select_columns(raw, source, time_col, key_col, features, label_col)

    times = parse_times(raw[time_col], source, time_col)
    keys = parse_keys(raw[key_col], source, key_col) if key_col is not None else None
    values = np.empty((len(raw), len(names)), dtype=np.float64)
    for j, name in enumerate(names):
        values[:, j] = parse_numeric(raw[name], source, name)
    values[~in_float32_range(values)] = np.nan
    labels = parse_labels(raw[label_col], source, label_col) if label_col is not None else None
    if fill == "error":
        refuse_gaps(values, names, source)
    rows = np.arange(len(raw))  # each row's place in the file, for messages
    if fill == "drop":  # before the repeats, as the worker refuses a reading with a gap first
        keep = ~np.isnan(values).any(axis=1)
        if not keep.any():
            raise DataError(f"{source}: fill='drop' leaves no rows; every row has a missing value")
        times, values, rows = times[keep], values[keep], rows[keep]
        labels = labels[keep] if labels is not None else None
        keys = keys[keep] if keys is not None else None

    if keys is None:
        order = np.argsort(times.view(np.int64), kind="stable")
        codes = np.zeros(len(times), dtype=np.int64)
        unique_keys = np.asarray([""], dtype=object)
    else:
        codes, unique_keys = pd.factorize(keys, sort=True)
        order = np.lexsort((times.view(np.int64), codes))
    repeated = np.zeros(len(order), dtype=bool)
    repeated[1:] = (codes[order][1:] == codes[order][:-1]) & (times[order][1:] == times[order][:-1])
    if repeated.any():  # as the worker does: the first reading of a timestamp counts
        first = rows[order[first_true(repeated)]]
        tell_repeats(source, int(repeated.sum()), f"data row {first + 1}")
        order = order[~repeated]
    times, codes, values = times[order], codes[order], values[order]
    labels = labels[order] if labels is not None else None
    keys = keys[order] if keys is not None else None

    starts = np.flatnonzero(np.diff(codes, prepend=-1))
    bounds = list(zip(starts, [*starts[1:], len(codes)], strict=True))
    if fill in ("ffill", "interpolate"):
        group_keys = [str(unique_keys[codes[start]]) for start, _ in bounds]
        fill_gaps(values, bounds, group_keys, names, fill, source, keyed=key_col is not None)

    columns: dict[str, object] = {time_col: times}
    if key_col is not None:
        columns[key_col] = keys
    for j, name in enumerate(names):
        columns[name] = values[:, j]
    if label_col is not None:
        columns[label_col] = labels
    frame = pd.DataFrame(columns, index=pd.RangeIndex(len(times)))
    return SeriesTable(
        frame=frame,
        time_col=time_col,
        key_col=key_col,
        features=tuple(names),
        label_col=label_col,
        source=source,
    )


def split_series(
    table: SeriesTable,
    fractions: Sequence[float] = (0.6, 0.15, 0.15, 0.1),
    *,
    train_until: str | None = None,
) -> dict[str, SeriesTable]:
    """Cut each key's rows, in time order, into train, validation, calibration and test.

    Each key contributes contiguous runs to the parts, in that order, so no part looks into the
    future of an earlier one. By default part sizes per key are floor(n * fraction), the
    remainder going to train. With `train_until` (an ISO-8601 time, UTC when it has no offset)
    train is every row at or before it and the rest of each key is shared among the other three
    parts in proportion to their fractions (largest remainders get the leftover rows). A part
    comes back empty only when its fraction is 0; otherwise too little data is a `DataError`.
    """
    source = table.source
    weights = check_fractions(fractions, source)
    limit = parse_time_limit(train_until, source) if train_until is not None else None
    times = table._times_ns()
    chosen: dict[str, list[np.ndarray]] = {part: [] for part in PARTS}
    sizes = []
    for key, positions in table._group_positions():
        sizes.append(len(positions))
        n_train = None
        if limit is not None:
            n_train = int(np.searchsorted(times[positions], limit, side="right"))
        where = f" for key {key!r}" if table.key_col is not None else ""
        counts = part_counts(
            len(positions), weights, n_train, where=where, source=source, train_until=train_until
        )
        start = 0
        for part, count in zip(PARTS, counts, strict=True):
            chosen[part].append(positions[start : start + count])
            start += count

    totals = [sum(len(p) for p in chosen[part]) for part in PARTS]
    check_part_sizes(
        totals,
        weights,
        len(table),
        source=source,
        train_until=train_until,
        keys=len(sizes),
        longest=max(sizes),
    )
    parts: dict[str, SeriesTable] = {}
    for part in PARTS:
        positions = np.concatenate(chosen[part]) if chosen[part] else np.empty(0, np.int64)
        frame = table.frame.iloc[positions].reset_index(drop=True)
        parts[part] = SeriesTable(
            frame=frame,
            time_col=table.time_col,
            key_col=table.key_col,
            features=table.features,
            label_col=table.label_col,
            source=source,
        )
    return parts


def series_groups(table: SeriesTable):
    """(key, times, values [T, F], labels or None) per key: the input of `cut_windows`."""
    for key, frame in table.groups():
        labels = frame[table.label_col].to_numpy() if table.label_col else None
        values = frame[list(table.features)].to_numpy(dtype=np.float32)
        yield key, frame[table.time_col].to_numpy(), values, labels


def with_calendar(table: SeriesTable, kinds: tuple[str, ...]) -> SeriesTable:
    """The table with calendar inputs made from its times (`pipeline.detector.calendar`) as its
    last features, as the worker makes them from each reading's timestamp."""
    if not kinds:
        return table
    from pipeline.detector.calendar import calendar_columns, calendar_names

    names = calendar_names(kinds)
    taken = [n for n in names if n in table.features]
    if taken:
        raise DataError(f"{table.source}: the column(s) {taken} are calendar inputs' names")
    stamps = table.frame[table.time_col].to_numpy(dtype="datetime64[ms]").view(np.int64)
    frame = table.frame.copy()
    frame[list(names)] = calendar_columns(stamps, kinds)
    return SeriesTable(
        frame,
        table.time_col,
        table.key_col,
        (*table.features, *names),
        table.label_col,
        table.source,
    )


def auto_calendar_table(table: SeriesTable, train: SeriesTable) -> tuple[tuple, SeriesTable]:
    """`--calendar auto`: the calendar inputs that the training rows' span supports (the
    longest of any key's) and the table with them."""
    from pipeline.detector.calendar import auto_calendar

    span = max(
        int((rows[train.time_col].max() - rows[train.time_col].min()) / pd.Timedelta(1, "ms"))
        for _, rows in train.groups()
    )
    kinds = auto_calendar(span)
    return kinds, with_calendar(table, kinds)

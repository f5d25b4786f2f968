"""Training data: multivariate time series and image sets, loaded, cleaned, fingerprinted, split.

Every model is trained, calibrated and evaluated from one of two shapes of data:

* `SeriesTable` - a multivariate time series, optionally several entities told apart by a key
  column, read from CSV or Parquet by `load_series` and cut in time order by `split_series`.
* `ImageSet` - a stack of images `[N, C, H, W]` with optional class labels, read by `load_images`
  from scikit-learn's digits, `.npy`/`.npz` arrays, MNIST-style IDX files or a folder of PNG/JPEG
  files, and shuffled into parts by `split_images`.

Both split into the same four parts: `train` fits the model, `validation` stops training,
`calibration` sets the alert threshold and `test` measures it, each disjoint from the others.
Both carry a `digest()` of their content (never of their path) so a registered model can name
exactly the data it came from. Anything that makes the data unusable raises `DataError` with a
message that names the file and, where it applies, the column or the 1-based data row.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import math
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import DataError

__all__ = [
    "FILL_POLICIES",
    "ImageSet",
    "SeriesTable",
    "load_images",
    "load_series",
    "check_fractions",
    "check_part_sizes",
    "parse_time_limit",
    "part_counts",
    "split_images",
    "split_series",
]

FILL_POLICIES = ("ffill", "interpolate", "drop", "error")
"""How `load_series` treats missing or non-finite feature values."""

_PARTS = ("train", "validation", "calibration", "test")
_CSV_SUFFIXES = (".csv", ".csv.gz", ".txt", ".txt.gz", ".tsv", ".tsv.gz")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_SNIFF_SEPARATORS = (",", ";", "\t")
_UNNAMED = re.compile(r"^Unnamed: \d+$")
_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_IMAGE_KEYS = ("images", "x", "X")
_LABEL_KEYS = ("labels", "y", "Y")
_CHANNELS = (1, 3, 4)
# IDX type codes (the third byte of the magic number) and the big-endian dtype each stands for.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# Small slack so that floor(n * fraction) is not one short when the product is an integer that
# floating point rounds to just below it (10 * 0.7 == 6.999...).
_FLOOR_SLACK = 1e-9


# -- time series ---------------------------------------------------------------------------------
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
    values count as missing, and `fill` (one of `FILL_POLICIES`) decides what happens to missing
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
    raw = _read_table(file, source, time_col=time_col, key_col=key_col, sep=sep)
    if len(raw) == 0:
        raise DataError(f"{source}: the file has no data rows")
    names = _select_columns(raw, source, time_col, key_col, features, label_col)

    times = _parse_times(raw[time_col], source, time_col)
    keys = _parse_keys(raw[key_col], source, key_col) if key_col is not None else None
    values = np.empty((len(raw), len(names)), dtype=np.float64)
    for j, name in enumerate(names):
        values[:, j] = _parse_numeric(raw[name], source, name)
    values[~np.isfinite(values)] = np.nan
    labels = _parse_labels(raw[label_col], source, label_col) if label_col is not None else None
    if fill == "error":
        _refuse_gaps(values, names, source)

    if keys is None:
        order = np.argsort(times.view(np.int64), kind="stable")
        codes = np.zeros(len(raw), dtype=np.int64)
        unique_keys = np.asarray([""], dtype=object)
    else:
        codes, unique_keys = pd.factorize(keys, sort=True)
        order = np.lexsort((times.view(np.int64), codes))
    times, codes, values = times[order], codes[order], values[order]
    labels = labels[order] if labels is not None else None
    keys = keys[order] if keys is not None else None

    starts = np.flatnonzero(np.diff(codes, prepend=-1))
    bounds = list(zip(starts, [*starts[1:], len(codes)], strict=True))
    if fill == "drop":
        keep = ~np.isnan(values).any(axis=1)
        times, values = times[keep], values[keep]
        labels = labels[keep] if labels is not None else None
        keys = keys[keep] if keys is not None else None
        if len(times) == 0:
            raise DataError(f"{source}: fill='drop' leaves no rows; every row has a missing value")
    elif fill in ("ffill", "interpolate"):
        group_keys = [str(unique_keys[codes[start]]) for start, _ in bounds]
        _fill_gaps(values, bounds, group_keys, names, fill, source, keyed=key_col is not None)

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
    chosen: dict[str, list[np.ndarray]] = {part: [] for part in _PARTS}
    for key, positions in table._group_positions():
        n_train = None
        if limit is not None:
            n_train = int(np.searchsorted(times[positions], limit, side="right"))
        where = f" for key {key!r}" if table.key_col is not None else ""
        counts = part_counts(
            len(positions), weights, n_train, where=where, source=source, train_until=train_until
        )
        start = 0
        for part, count in zip(_PARTS, counts, strict=True):
            chosen[part].append(positions[start : start + count])
            start += count

    totals = [sum(len(p) for p in chosen[part]) for part in _PARTS]
    check_part_sizes(totals, weights, len(table), source=source, train_until=train_until)
    parts: dict[str, SeriesTable] = {}
    for part in _PARTS:
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


def _read_table(
    file: Path, source: str, *, time_col: str, key_col: str | None, sep: str | None
) -> pd.DataFrame:
    """The file's rows as read, in file order, with the index 0..n-1."""
    name = file.name.lower()
    if file.is_dir():
        return _read_parquet(file, source, directory=True)
    if name.endswith(_PARQUET_SUFFIXES):
        return _read_parquet(file, source, directory=False)
    if name.endswith(_CSV_SUFFIXES):
        return _read_csv(file, source, time_col=time_col, key_col=key_col, sep=sep)
    raise DataError(
        f"{source}: unsupported file type; expected one of {', '.join(_CSV_SUFFIXES)}, "
        f"{', '.join(_PARQUET_SUFFIXES)} or a directory of Parquet files"
    )


def _read_csv(
    file: Path, source: str, *, time_col: str, key_col: str | None, sep: str | None
) -> pd.DataFrame:
    header: list[str] = []
    if sep is None:
        sep, header = _sniff_separator(file, source, time_col)
        if sep is None and not _header_fields(file, source, ","):
            raise DataError(f"{source}: the file is empty")
    elif len(sep) == 1:
        header = _header_fields(file, source, sep)
    options: dict[str, object] = {"encoding": "utf-8-sig", "sep": sep}
    if sep is None or len(sep) > 1:
        options["engine"] = "python"
    else:
        options["low_memory"] = False
    if key_col is not None and key_col in header:
        # Read keys as text so identifiers such as "007" keep their leading zeros.
        options["dtype"] = {key_col: str}
    try:
        frame = pd.read_csv(file, **options)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{source}: the file is empty") from exc
    except (
        pd.errors.ParserError,
        csv.Error,
        UnicodeDecodeError,
        OSError,
        EOFError,
        ValueError,
    ) as exc:
        raise DataError(f"{source}: cannot be read as CSV: {exc}") from exc
    return frame.reset_index(drop=True)


def _header_fields(file: Path, source: str, sep: str) -> list[str]:
    try:
        opener = gzip.open if file.name.lower().endswith(".gz") else open
        with opener(file, "rt", encoding="utf-8-sig", newline="") as handle:
            line = handle.readline()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{source}: cannot read the header: {exc}") from exc
    if not line.strip():
        return []
    return [field.strip() for field in next(csv.reader([line], delimiter=sep))]


def _sniff_separator(file: Path, source: str, time_col: str) -> tuple[str | None, list[str]]:
    """The first of `,` `;` tab whose header holds `time_col`; None leaves it to pandas."""
    for candidate in _SNIFF_SEPARATORS:
        fields = _header_fields(file, source, candidate)
        if time_col in fields:
            return candidate, fields
    return None, []


def _read_parquet(file: Path, source: str, *, directory: bool) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    try:
        if directory:
            dataset = ds.dataset(
                file,
                format="parquet",
                partitioning="hive",
                ignore_prefixes=[".", "_"],
                exclude_invalid_files=True,
            )
            if not dataset.files:
                raise DataError(f"{source}: the directory holds no Parquet files")
            table = dataset.to_table()
        else:
            table = pq.read_table(file)
        frame = table.to_pandas(date_as_object=False)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{source}: cannot be read as Parquet: {exc}") from exc
    return frame.reset_index(drop=True)


def _select_columns(
    raw: pd.DataFrame,
    source: str,
    time_col: str,
    key_col: str | None,
    features: Sequence[str] | None,
    label_col: str | None,
) -> list[str]:
    """Check the named columns exist and return the feature columns, in order."""
    available = [str(c) for c in raw.columns]

    def missing(column: str, role: str) -> DataError:
        listed = ", ".join(map(repr, available)) or "none"
        return DataError(f"{source}: no {role} column {column!r}; the columns are {listed}")

    roles = [("time", time_col), ("key", key_col), ("label", label_col)]
    special = [column for _, column in roles if column is not None]
    if len(set(special)) != len(special):
        raise DataError(f"{source}: the time, key and label columns must differ: {special}")
    for role, column in roles:
        if column is not None and column not in raw.columns:
            raise missing(column, role)

    if features is None:
        names = [
            str(c)
            for c in raw.columns
            if c not in special
            and not _UNNAMED.match(str(c))
            and pd.api.types.is_numeric_dtype(raw[c])
            and not pd.api.types.is_complex_dtype(raw[c])
        ]
        if not names:
            raise DataError(
                f"{source}: no numeric feature columns besides time, key and label; "
                f"the columns are {', '.join(map(repr, available))}"
            )
        return names

    names = [features] if isinstance(features, str) else list(features)
    if not names:
        raise DataError(f"{source}: the feature list is empty")
    for name in names:
        if name in special:
            role = next(role for role, column in roles if column == name)
            raise DataError(f"{source}: column {name!r} is the {role} column, not a feature")
        if name not in raw.columns:
            raise missing(name, "feature")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{source}: feature(s) named more than once: {', '.join(repeated)}")
    return names


def _first(mask: np.ndarray) -> int:
    """Position of the first True in `mask`."""
    return int(np.argmax(mask))


def _parse_times(series: pd.Series, source: str, column: str) -> np.ndarray:
    """The column as datetime64[ns] (naive UTC); a row that is not a time is a DataError."""
    kind = pd.api.types
    try:
        if kind.is_bool_dtype(series):
            raise DataError(f"{source}: column {column!r} holds booleans, not times")
        if kind.is_datetime64_any_dtype(series):
            parsed = series
            if getattr(series.dt, "tz", None) is not None:
                parsed = series.dt.tz_convert("UTC").dt.tz_localize(None)
        elif kind.is_numeric_dtype(series):
            parsed = pd.to_datetime(series, unit="ms", errors="coerce")
        else:
            parsed = pd.to_datetime(series, format="ISO8601", utc=True, errors="coerce")
            parsed = parsed.dt.tz_localize(None)
        bad = parsed.isna().to_numpy()
        if bad.any():
            row = _first(bad)
            raise DataError(
                f"{source}: column {column!r}, data row {row + 1}: {series.iloc[row]!r} is not a "
                f"time (ISO-8601 text or numeric epoch milliseconds); {int(bad.sum())} such rows"
            )
        return parsed.to_numpy(dtype="datetime64[ns]")
    except (ValueError, TypeError, OverflowError, pd.errors.OutOfBoundsDatetime) as exc:
        raise DataError(f"{source}: column {column!r} cannot be read as times: {exc}") from exc


def _parse_keys(series: pd.Series, source: str, column: str) -> np.ndarray:
    missing = series.isna().to_numpy()
    if missing.any():
        raise DataError(f"{source}: column {column!r}, data row {_first(missing) + 1}: no key")
    return np.asarray([str(k) for k in series], dtype=object)


def _parse_numeric(series: pd.Series, source: str, column: str) -> np.ndarray:
    """The column as float64; a value that is not a number is a DataError naming its row."""
    kind = pd.api.types
    if kind.is_complex_dtype(series):
        raise DataError(f"{source}: column {column!r} holds complex numbers")
    if kind.is_bool_dtype(series) or kind.is_numeric_dtype(series):
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    coerced = pd.to_numeric(series, errors="coerce")
    bad = (coerced.isna() & series.notna()).to_numpy()
    if bad.any():
        row = _first(bad)
        raise DataError(
            f"{source}: column {column!r} is not numeric: data row {row + 1} holds "
            f"{series.iloc[row]!r}"
        )
    return coerced.to_numpy(dtype=np.float64, na_value=np.nan)


def _parse_labels(series: pd.Series, source: str, column: str) -> np.ndarray:
    """The label column as int64 0/1: every non-zero value is 1, a missing one is an error."""
    values = _parse_numeric(series, source, column)
    bad = ~np.isfinite(values)
    if bad.any():
        row = _first(bad)
        raise DataError(
            f"{source}: label column {column!r}, data row {row + 1}: {series.iloc[row]!r} is "
            "not a label (0 for normal, non-zero for anomalous)"
        )
    return (values != 0).astype(np.int64)


def _refuse_gaps(values: np.ndarray, names: Sequence[str], source: str) -> None:
    """fill='error': refuse the first feature column with a missing value."""
    for j, name in enumerate(names):
        gaps = np.isnan(values[:, j])
        if gaps.any():
            raise DataError(
                f"{source}: column {name!r} has {int(gaps.sum())} missing or non-finite "
                f"value(s), the first at data row {_first(gaps) + 1}; fill='error' refuses "
                f"them (other policies: {', '.join(p for p in FILL_POLICIES if p != 'error')})"
            )


def _fill_gaps(
    values: np.ndarray,
    bounds: Sequence[tuple[int, int]],
    keys: Sequence[str],
    names: Sequence[str],
    policy: str,
    source: str,
    *,
    keyed: bool,
) -> None:
    """Fill NaNs in place, each key's rows `values[start:stop]` on their own."""
    for (start, stop), key in zip(bounds, keys, strict=True):
        block = values[start:stop]
        positions = np.arange(stop - start)
        for j, name in enumerate(names):
            column = block[:, j]
            known = ~np.isnan(column)
            if known.all():
                continue
            if not known.any():
                where = f" for key {key!r}" if keyed else ""
                raise DataError(
                    f"{source}: column {name!r} has no finite value{where}; "
                    f"fill={policy!r} has nothing to fill from"
                )
            if policy == "ffill":
                last = np.where(known, positions, -1)
                np.maximum.accumulate(last, out=last)
                last[last < 0] = _first(known)
                column[:] = column[last]
            else:
                column[:] = np.interp(positions, positions[known], column[known])


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


# -- splitting -----------------------------------------------------------------------------------
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
        return _floor_counts(n, weights)
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


def _floor_counts(n: int, weights: Sequence[float]) -> list[int]:
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


# -- images --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images `[N, C, H, W]` as float32 raw pixel values, with class labels when known.

    `class_names[i]` names label `i` when the labels came from class folders. `source` names the
    origin for messages; it never enters `digest()`. Equality is identity; compare digests.
    """

    images: np.ndarray
    labels: np.ndarray | None
    source: str
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(f"{self.source}: images must be [N, C, H, W], got {self.images.shape}")
        if self.labels is not None and self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"{self.source}: {self.labels.shape} labels for {self.images.shape[0]} images"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def digest(self) -> str:
        """SHA-256 (hex) of the pixels (float32, with the shape) and the labels, if any."""
        pixels = np.ascontiguousarray(self.images, dtype="<f4")
        h = hashlib.sha256(b"aewatch.images/1\0")
        h.update(struct.pack("<4q", *pixels.shape))
        h.update(pixels.tobytes())
        if self.labels is None:
            h.update(b"\0")
        else:
            h.update(b"\1")
            h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        return h.hexdigest()

    def subset(self, index: np.ndarray) -> ImageSet:
        """The images at `index` (integer positions or a boolean mask), in that order."""
        index = np.asarray(index)
        if index.dtype != bool and not np.issubdtype(index.dtype, np.integer):
            if index.size:
                raise DataError(f"{self.source}: subset index must be integers or a boolean mask")
            index = index.astype(np.int64)
        return ImageSet(
            images=self.images[index],
            labels=None if self.labels is None else self.labels[index],
            source=self.source,
            class_names=self.class_names,
        )


def load_images(
    source: str | Path,
    *,
    normal_class: int | str | None = None,
    labels_path: str | Path | None = None,
) -> ImageSet:
    """Load an image set as float32 `[N, C, H, W]` raw pixel values with optional labels.

    `source` is `"digits"` (scikit-learn's 8x8 digits, values 0..16), a `.npy` array
    (`[N, H, W]`, `[N, H, W, C]` or `[N, C, H, W]` with C in 1, 3, 4), a `.npz` archive
    (`images`/`x`/`X` and optional `labels`/`y`/`Y`), an MNIST IDX image file (`*idx3-ubyte`,
    optionally `.gz`), or a folder of PNG/JPEG files, flat or with one subfolder per class (label
    = index of the folder name in sorted order). `labels_path` (`.npy`, `.npz` or IDX) gives
    labels to array and IDX sources. Arrays are never unpickled. `normal_class` keeps only the
    images of that class: a label value, or for class folders the folder name or its index.
    """
    name = str(source)
    if labels_path is not None and not Path(labels_path).exists():
        raise DataError(f"{labels_path}: no such labels file")
    if name == "digits" and not Path(name).exists():
        if labels_path is not None:
            raise DataError("sklearn:digits: carries its own labels; labels_path is not used")
        images, labels, class_names, name = _load_digits()
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"{name}: no such file or directory")
        if path.is_dir():
            if labels_path is not None:
                raise DataError(
                    f"{name}: an image folder takes its labels from class subfolders; "
                    "labels_path is not used"
                )
            images, labels, class_names = _load_folder(path, name)
        else:
            images, labels = _load_array_file(path, name)
            class_names = None
            if labels_path is not None:
                labels = _load_labels(Path(labels_path), str(labels_path))
            if labels is not None and labels.shape != (images.shape[0],):
                raise DataError(
                    f"{labels_path or name}: {labels.shape[0]} labels for {images.shape[0]} "
                    f"images in {name}"
                )
    if not np.isfinite(images).all():
        bad = int(np.argmax(~np.isfinite(images).reshape(len(images), -1).all(axis=1)))
        raise DataError(f"{name}: image {bad} holds a non-finite pixel value")
    image_set = ImageSet(images=images, labels=labels, source=name, class_names=class_names)
    if normal_class is not None:
        image_set = image_set.subset(_class_mask(image_set, normal_class))
    return image_set


def split_images(
    images: ImageSet,
    fractions: Sequence[float] = (0.6, 0.15, 0.15, 0.1),
    *,
    seed: int = 0,
) -> dict[str, ImageSet]:
    """Shuffle with `numpy.random.default_rng(seed)` and cut into the four parts.

    Part sizes are floor(N * fraction), the remainder going to train, as for `split_series`;
    the same seed gives the same parts. A part is empty only when its fraction is 0.
    """
    weights = check_fractions(fractions, images.source)
    order = np.random.default_rng(seed).permutation(len(images))
    parts: dict[str, ImageSet] = {}
    start = 0
    for part, weight, count in zip(
        _PARTS, weights, _floor_counts(len(images), weights), strict=True
    ):
        if weight > 0 and count == 0:
            raise DataError(
                f"{images.source}: the {part} part would be empty: {len(images)} images are too "
                f"few for fraction {weight:g}"
            )
        parts[part] = images.subset(order[start : start + count])
        start += count
    return parts


def _load_digits() -> tuple[np.ndarray, np.ndarray, None, str]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float32)[:, None, :, :]
    return images, np.asarray(digits.target, dtype=np.int64), None, "sklearn:digits"


def _load_npy(path: Path, source: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "pickled" in str(exc):
            raise DataError(f"{source}: pickled (object) arrays are refused") from exc
        raise DataError(f"{source}: cannot be read as a .npy array: {exc}") from exc
    except (OSError, EOFError) as exc:
        raise DataError(f"{source}: cannot be read as a .npy array: {exc}") from exc
    if not isinstance(array, np.ndarray):
        raise DataError(f"{source}: holds an archive, not a single .npy array")
    return array


def _load_npz(path: Path, source: str) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise DataError(f"{source}: is not a .npz archive")
            names = list(archive.files)
            image_key = next((k for k in _IMAGE_KEYS if k in names), None)
            if image_key is None:
                image_key = next((k for k in names if k not in _LABEL_KEYS), None)
            if image_key is None:
                raise DataError(f"{source}: holds no image array; its arrays are {names}")
            label_key = next((k for k in _LABEL_KEYS if k in names), None)
            images = archive[image_key]
            labels = archive[label_key] if label_key is not None else None
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "pickled" in str(exc):
            raise DataError(f"{source}: pickled (object) arrays are refused") from exc
        raise DataError(f"{source}: cannot be read as a .npz archive: {exc}") from exc
    except (OSError, EOFError) as exc:
        raise DataError(f"{source}: cannot be read as a .npz archive: {exc}") from exc
    return images, labels


def _is_idx(name: str) -> bool:
    stem = name.lower().removesuffix(".gz")
    return stem.endswith("ubyte") or stem.endswith((".idx", "idx1", "idx3"))


def _read_idx(path: Path, source: str) -> np.ndarray:
    """Parse an IDX file (the MNIST format): magic 0 0 type ndim, big-endian uint32 dims, data."""
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                raw = handle.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(f"{source}: cannot read the IDX file: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        magic = raw[:4].hex() or "none"
        raise DataError(f"{source}: not an IDX file (magic number {magic})")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise DataError(f"{source}: IDX header truncated: {ndim} dimensions announced")
    dims = struct.unpack(f">{ndim}I", raw[4:offset])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = math.prod(dims)
    expected = count * dtype.itemsize
    if len(raw) - offset != expected:
        raise DataError(
            f"{source}: IDX header announces shape {dims} ({expected} bytes) but "
            f"{len(raw) - offset} bytes follow it"
        )
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def _load_array_file(path: Path, source: str) -> tuple[np.ndarray, np.ndarray | None]:
    name = path.name.lower()
    labels: np.ndarray | None = None
    if name.endswith(".npy"):
        array = _load_npy(path, source)
    elif name.endswith(".npz"):
        array, raw_labels = _load_npz(path, source)
        labels = _as_labels(raw_labels, source) if raw_labels is not None else None
    elif name.removesuffix(".gz").endswith("idx3-ubyte"):
        array = _read_idx(path, source)
    else:
        raise DataError(
            f"{source}: unsupported image source; expected 'digits', a .npy or .npz array, an "
            "IDX file (*idx3-ubyte[.gz]) or a folder of PNG/JPEG images"
        )
    return _to_nchw(array, source), labels


def _load_labels(path: Path, source: str) -> np.ndarray:
    name = path.name.lower()
    if name.endswith(".npy"):
        return _as_labels(_load_npy(path, source), source)
    if name.endswith(".npz"):
        images, labels = _load_npz(path, source)
        return _as_labels(labels if labels is not None else images, source)
    if _is_idx(name):
        return _as_labels(_read_idx(path, source), source)
    raise DataError(f"{source}: unsupported labels file; expected .npy, .npz or IDX (idx1-ubyte)")


def _as_labels(array: np.ndarray, source: str) -> np.ndarray:
    """Labels as int64 `[N]`; integral floats are accepted, anything else is refused."""
    array = np.asarray(array)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise DataError(f"{source}: labels must be one-dimensional, got shape {array.shape}")
    if array.dtype == bool or np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int64)
    if np.issubdtype(array.dtype, np.floating):
        integral = np.isfinite(array) & (array == np.round(array))
        if integral.all():
            return array.astype(np.int64)
        raise DataError(f"{source}: label {_first(~integral)} is {array[~integral][0]!r}")
    raise DataError(f"{source}: labels have dtype {array.dtype}, not integers")


def _to_nchw(array: np.ndarray, source: str) -> np.ndarray:
    """A numeric array of images as float32 `[N, C, H, W]`.

    A 4-d array is channels-last when only its last axis could be channels, channels-first when
    only its second could; when both could, the reading whose spatial axes are square wins
    (channels-last if neither is).
    """
    if array.dtype == object or not (
        array.dtype == bool
        or np.issubdtype(array.dtype, np.integer)
        or np.issubdtype(array.dtype, np.floating)
    ):
        raise DataError(f"{source}: images have dtype {array.dtype}, not numbers")
    if array.ndim == 3:
        array = array[:, None, :, :]
    elif array.ndim == 4:
        last, second = array.shape[3] in _CHANNELS, array.shape[1] in _CHANNELS
        if last and second:
            last = array.shape[1] == array.shape[2] or array.shape[2] != array.shape[3]
        if last:
            array = np.moveaxis(array, 3, 1)
        elif not second:
            raise DataError(
                f"{source}: images of shape {array.shape} have no channel axis of size 1, 3 or 4"
            )
    else:
        raise DataError(
            f"{source}: images must be [N, H, W], [N, H, W, C] or [N, C, H, W], got {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[2] == 0 or array.shape[3] == 0:
        raise DataError(f"{source}: no images (shape {array.shape})")
    return np.ascontiguousarray(array, dtype=np.float32)


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        (
            f
            for f in folder.iterdir()
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in _IMAGE_SUFFIXES
        ),
        key=lambda f: f.name,
    )


def _load_folder(
    root: Path, source: str
) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...] | None]:
    """A folder of PNG/JPEG images: flat (no labels) or one subfolder per class."""
    flat = _image_files(root)
    class_dirs = [
        d
        for d in sorted(root.iterdir(), key=lambda d: d.name)
        if d.is_dir() and not d.name.startswith(".") and _image_files(d)
    ]
    if flat and class_dirs:
        raise DataError(
            f"{source}: holds images both directly and in class subfolders "
            f"({', '.join(d.name for d in class_dirs)}); use one layout"
        )
    if not flat and not class_dirs:
        raise DataError(f"{source}: holds no PNG or JPEG images")
    files: list[tuple[Path, int]] = [(f, -1) for f in flat]
    for index, folder in enumerate(class_dirs):
        files += [(f, index) for f in _image_files(folder)]

    first_file = files[0][0]
    first, mode = _read_image(first_file)
    images = np.empty((len(files), *first.shape), dtype=np.float32)
    images[0] = first
    for i, (file, _) in enumerate(files[1:], start=1):
        pixels, file_mode = _read_image(file)
        if file_mode != mode or pixels.shape != first.shape:
            raise DataError(
                f"{file}: mode {file_mode} and size {pixels.shape[2]}x{pixels.shape[1]} differ "
                f"from {first_file.name} ({mode}, {first.shape[2]}x{first.shape[1]}); all "
                f"images in {source} must share size and mode"
            )
        images[i] = pixels
    if not class_dirs:
        return images, None, None
    labels = np.asarray([label for _, label in files], dtype=np.int64)
    return images, labels, tuple(d.name for d in class_dirs)


def _read_image(file: Path) -> tuple[np.ndarray, str]:
    """One image as `[C, H, W]` raw pixel values, with its Pillow mode."""
    from PIL import Image

    try:
        with Image.open(file) as image:
            image.load()
            mode = image.mode
            if mode == "1":
                image = image.convert("L")
            elif mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            elif mode not in ("L", "I", "I;16", "F", "RGB", "RGBA"):
                raise DataError(
                    f"{file}: unsupported image mode {mode}; use grayscale, RGB or RGBA"
                )
            pixels = np.asarray(image)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{file}: cannot be read as an image: {exc}") from exc
    pixels = pixels[None, :, :] if pixels.ndim == 2 else np.moveaxis(pixels, 2, 0)
    return pixels.astype(np.float32), mode


def _class_mask(images: ImageSet, normal_class: int | str) -> np.ndarray:
    """Boolean mask of the images whose class is `normal_class`."""
    source = images.source
    if images.labels is None:
        raise DataError(
            f"{source}: normal_class={normal_class!r} needs class labels and there are none; "
            "give labels_path or use one subfolder per class"
        )
    if images.class_names is not None:
        names = images.class_names
        if isinstance(normal_class, str) and normal_class in names:
            return images.labels == names.index(normal_class)
        if isinstance(normal_class, int | np.integer) and 0 <= int(normal_class) < len(names):
            return images.labels == int(normal_class)
        raise DataError(
            f"{source}: unknown class {normal_class!r}; the classes are "
            f"{', '.join(f'{i}={n}' for i, n in enumerate(names))}"
        )
    known = sorted(int(v) for v in np.unique(images.labels))
    try:
        value = int(normal_class)
    except (TypeError, ValueError):
        value = None
    if value is None or value not in known:
        raise DataError(
            f"{source}: unknown class {normal_class!r}; the labels are {', '.join(map(str, known))}"
        )
    return images.labels == value

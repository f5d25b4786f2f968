"""Reading a table's columns: CSV and Parquet readers, the column roles, values checked row by row.

Shared by the in-memory reader (`training.data.series.load_series`) and the out-of-core one
(`training.data.streamed.SeriesStream`), so that both read a series the same way: times as
ISO-8601 text or epoch milliseconds (naive UTC), keys as text, features and labels as numbers, a
bad value named by its column and 1-based data row, gaps filled or refused by one policy.

Size: over 400 lines because every rule of reading a column lives here once, for both readers;
split across them, the two would drift apart.
"""

from __future__ import annotations

import csv
import gzip
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import DataError, one_line
from pipeline.modalities.times import SECONDS_LIKE, cut_to_ms, too_short

__all__ = [
    "FILL_POLICIES",
    "fill_gaps",
    "first_true",
    "in_float32_range",
    "parse_keys",
    "parse_labels",
    "parse_numeric",
    "parse_times",
    "read_table",
    "refuse_gaps",
    "select_columns",
    "tell_repeats",
]

FILL_POLICIES = ("ffill", "interpolate", "drop", "error")
"""How `load_series` treats missing or non-finite feature values."""

_CSV_SUFFIXES = (".csv", ".csv.gz", ".txt", ".txt.gz", ".tsv", ".tsv.gz")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_SNIFF_SEPARATORS = (",", ";", "\t")
_UNNAMED = re.compile(r"^Unnamed: \d+$")
# Column names that hold labels, not readings: never picked as features by default.
LABEL_LIKE = frozenset(
    {"label", "labels", "anomaly", "anomalies", "is_anomaly", "anomalous", "outlier", "is_outlier"}
    | {"changepoint", "target"}
)

log = logging.getLogger(__name__)


def read_table(
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
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:  # pandas would rename the second one (`s0.1`), which no reading carries
        raise DataError(f"{source}: the header names column {repeated[0]!r} more than once")
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


PARQUET_SUFFIXES = (".parquet", ".pq")


def parquet_dataset(path: Path, source: str):
    """The pyarrow dataset of a Parquet file or folder (hive partitions; files starting with
    `.` or `_` left out), read as both readers read it. DataError in one line for one that
    cannot be opened, a folder without Parquet files, or a file of the folder named as Parquet
    that the dataset left out as unreadable (its other files, a README or a CSV, are passed
    over)."""
    import pyarrow as pa

    folder = path.is_dir()
    try:
        dataset = _open_dataset(path, folder)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{source}: cannot be read as Parquet: {one_line(exc)}") from exc
    if folder:
        taken = {Path(f).resolve() for f in dataset.files}
        for file in sorted(path.rglob("*")):
            parts = file.relative_to(path).parts
            if any(part.startswith((".", "_")) for part in parts) or not file.is_file():
                continue
            if file.name.lower().endswith(PARQUET_SUFFIXES) and file.resolve() not in taken:
                raise DataError(f"{source}: {file.relative_to(path)} cannot be read as Parquet")
    if not dataset.files:
        raise DataError(f"{source}: the directory holds no Parquet files")
    if folder and len(dataset.files) > 1:
        dataset = _every_files_columns(dataset, path, source)
    return dataset


def _open_dataset(path: Path, folder: bool, schema=None):
    import pyarrow.dataset as ds

    return ds.dataset(
        path,
        schema=schema,
        format="parquet",
        partitioning="hive" if folder else None,
        ignore_prefixes=[".", "_"],
        exclude_invalid_files=True,
    )


def _every_files_columns(dataset, path: Path, source: str):
    """The folder's dataset with the columns of every file, not only of the first (columns a
    later file adds were left out without a word), read as missing in the files without them;
    a column that is text in one file and numbers in another is refused naming both files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def name(file: str) -> str:
        return str(Path(file).relative_to(path)) if Path(file).is_relative_to(path) else file

    fields = {field.name: (field, dataset.files[0]) for field in dataset.schema}
    added: list[str] = []  # columns the first file lacks
    for file in dataset.files[1:]:
        try:
            schema = pq.read_schema(file)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{source}: {name(file)} cannot be read as Parquet: {exc}") from exc
        for field in schema:
            known = fields.get(field.name)
            if known is None:
                fields[field.name] = (field, file)
                added.append(field.name)
            elif _is_text(known[0].type) != _is_text(field.type):
                raise DataError(
                    f"{source}: column {field.name!r} is {field.type} in {name(file)} and "
                    f"{known[0].type} in {name(known[1])}"
                )
    if not added:
        return dataset
    log.warning(
        "%s: column(s) %s are not in every file (the first without them: %s); read as missing "
        "values in the files without them",
        source,
        ", ".join(map(repr, added)),
        name(dataset.files[0]),  # (a column another file adds is never in the first)
    )
    return _open_dataset(path, True, pa.schema([field for field, _ in fields.values()]))


def _is_text(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)


def _read_parquet(file: Path, source: str, *, directory: bool) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = parquet_dataset(file, source).to_table() if directory else pq.read_table(file)
        frame = table.to_pandas(date_as_object=False)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{source}: cannot be read as Parquet: {one_line(exc)}") from exc
    return frame.reset_index(drop=True)


def select_columns(
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
        names = _default_features(raw, source, special)
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


def _default_features(raw: pd.DataFrame, source: str, special: list[str]) -> list[str]:
    """Every numeric column but the time, key and label columns. A column named like labels is
    left out with a warning; a column of numbers with a few cells that are not numbers is an
    error naming the first such cell (not a silently dropped sensor); text columns are left out
    with a warning that names them."""
    names, text, labels = [], [], []
    for column in raw.columns:
        name = str(column)
        if column in special or _UNNAMED.match(name):
            continue
        series = raw[column]
        if name.lower() in LABEL_LIKE:
            labels.append(name)
        elif pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_complex_dtype(series):
            names.append(name)
        elif pd.api.types.is_complex_dtype(series):
            text.append(name)
        else:
            present = series.dropna()
            numbers = pd.to_numeric(present, errors="coerce")
            if len(present) and numbers.notna().mean() >= 0.5:
                row = raw.index.get_loc(numbers.index[first_true(numbers.isna().to_numpy())])
                raise DataError(
                    f"{source}: column {name!r} holds numbers, but data row {row + 1} holds "
                    f"{series.iloc[row]!r} ({int(numbers.isna().sum())} such cells): fix or "
                    "blank them (--fill decides what a blank does), or name the features with "
                    "--features"
                )
            text.append(name)
    if labels:
        log.warning(
            "%s: column(s) %s look like labels and are not features; --label-col reads one as "
            "labels, --features chooses the features",
            source,
            ", ".join(map(repr, labels)),
        )
    if text:
        log.warning(
            "%s: %d column(s) are not numeric and are not features: %s",
            source,
            len(text),
            ", ".join(map(repr, text)),
        )
    return names


FLOAT32_MAX = float(np.finfo(np.float32).max)


def in_float32_range(values: np.ndarray) -> np.ndarray:
    """Where `values` are finite and within float32's range (what the model can hold); the
    worker dead-letters a reading outside it as `non_finite`."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & (np.abs(values) <= FLOAT32_MAX)


def first_true(mask: np.ndarray) -> int:
    """Position of the first True in `mask`."""
    return int(np.argmax(mask))


def parse_times(series: pd.Series, source: str, column: str) -> np.ndarray:
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
            _refuse_epoch_seconds(series, source, column)
            whole = series.transform(np.trunc) if kind.is_float_dtype(series) else series
            parsed = pd.to_datetime(
                whole, unit="ms", errors="coerce"
            )  # a fraction cut, as the worker does
        else:
            parsed = pd.to_datetime(series, format="ISO8601", utc=True, errors="coerce")
            parsed = parsed.dt.tz_localize(None)
            parsed[too_short(series)] = pd.NaT
        bad = parsed.isna().to_numpy()
        if bad.any():
            row = first_true(bad)
            raise DataError(
                f"{source}: column {column!r}, data row {row + 1}: {series.iloc[row]!r} is not a "
                f"time (ISO-8601 text or numeric epoch milliseconds); {int(bad.sum())} such rows"
            )
        beyond = ((parsed < pd.Timestamp.min) | (parsed > pd.Timestamp.max)).to_numpy()
        if beyond.any():  # nanoseconds since 1970 in int64, as tables hold times here
            row = first_true(beyond)
            value = series.iloc[row]
            shown = value.item() if isinstance(value, np.generic) else value
            raise DataError(
                f"{source}: column {column!r}, data row {row + 1}: {shown!r} is "
                f"outside the years {pd.Timestamp.min.year + 1} to {pd.Timestamp.max.year - 1} "
                f"that tables of readings hold; {int(beyond.sum())} such rows"
            )
        return cut_to_ms(parsed.to_numpy(dtype="datetime64[ns]"))
    except (ValueError, TypeError, OverflowError, pd.errors.OutOfBoundsDatetime) as exc:
        raise DataError(f"{source}: column {column!r} cannot be read as times: {exc}") from exc


def _refuse_epoch_seconds(series: pd.Series, source: str, column: str) -> None:
    """Numeric times are epoch milliseconds (as the worker reads a reading's `ts`); a number
    that falls between 1970-01-02 and 1973 as milliseconds is epoch seconds, refused as the
    worker refuses such a reading, naming the first."""
    values = series.to_numpy(dtype=np.float64, na_value=np.nan)
    seconds = (values >= SECONDS_LIKE[0]) & (values < SECONDS_LIKE[1])
    if seconds.any():
        row = first_true(seconds)
        first = series.iloc[row]
        first = first.item() if isinstance(first, np.generic) else first
        raise DataError(
            f"{source}: column {column!r}, data row {row + 1}: {first!r} read as epoch "
            f"milliseconds falls in 1970-1973 ({pd.to_datetime(first, unit='ms')}); "
            f"{int(seconds.sum())} such rows; epoch seconds? multiply them by 1000, or give "
            "ISO-8601 text"
        )


def tell_repeats(source: str, count: int, first: str) -> None:
    """Rows repeating their key's timestamp were left out: one warning, with where the first was."""
    log.warning(
        "%s: %d row(s) repeat their key's timestamp and are left out, the first reading of each "
        "timestamp kept (the worker dead-letters them as duplicate_timestamp); the first is %s",
        source,
        count,
        first,
    )


def parse_keys(series: pd.Series, source: str, column: str) -> np.ndarray:
    missing = series.isna().to_numpy()
    if missing.any():
        raise DataError(f"{source}: column {column!r}, data row {first_true(missing) + 1}: no key")
    return np.asarray([str(k) for k in series], dtype=object)


def parse_numeric(series: pd.Series, source: str, column: str) -> np.ndarray:
    """The column as float64; a value that is not a number is a DataError naming its row."""
    kind = pd.api.types
    if kind.is_complex_dtype(series):
        raise DataError(f"{source}: column {column!r} holds complex numbers")
    if kind.is_bool_dtype(series) or kind.is_numeric_dtype(series):
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    coerced = pd.to_numeric(series, errors="coerce")
    bad = (coerced.isna() & series.notna()).to_numpy()
    if bad.any():
        row = first_true(bad)
        raise DataError(
            f"{source}: column {column!r} is not numeric: data row {row + 1} holds "
            f"{series.iloc[row]!r}"
        )
    return coerced.to_numpy(dtype=np.float64, na_value=np.nan)


def parse_labels(series: pd.Series, source: str, column: str) -> np.ndarray:
    """The label column as int64 0/1: every non-zero value is 1, a missing one is an error."""
    values = parse_numeric(series, source, column)
    bad = ~np.isfinite(values)
    if bad.any():
        row = first_true(bad)
        raise DataError(
            f"{source}: label column {column!r}, data row {row + 1}: {series.iloc[row]!r} is "
            "not a label (0 for normal, non-zero for anomalous)"
        )
    return (values != 0).astype(np.int64)


def refuse_gaps(values: np.ndarray, names: Sequence[str], source: str) -> None:
    """fill='error': refuse the first feature column with a missing value."""
    for j, name in enumerate(names):
        gaps = np.isnan(values[:, j])
        if gaps.any():
            raise DataError(
                f"{source}: column {name!r} has {int(gaps.sum())} missing or non-finite "
                f"value(s) (empty, NaN, infinite or beyond float32), the first at data row {first_true(gaps) + 1}; fill='error' refuses "
                f"them (other policies: {', '.join(p for p in FILL_POLICIES if p != 'error')})"
            )


def fill_gaps(
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
                last[last < 0] = first_true(known)
                column[:] = column[last]
            else:
                column[:] = np.interp(positions, positions[known], column[known])

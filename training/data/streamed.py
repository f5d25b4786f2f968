"""Series larger than memory: a Parquet dataset read in record batches, never whole.

`SeriesStream` reads a Parquet file or a directory of Parquet files (hive-partitioned or not,
e.g. `date=2026-01-01/part-0.parquet` or `machine=m1/...`) one record batch at a time, with the
same column rules and checks as `load_series` (`training.data.columns`). Windows, the split and the scaler follow the
in-memory job's rules exactly:

* **Order.** Files are read in sorted path order; within each key, readings must be in time
  order across that sequence (zero-padded dates in partition names sort correctly). Keys may
  interleave freely. A reading earlier than its key's previous one is a `DataError` naming the
  file and key, never silently reordered: sort the files, or use the in-memory path.
* **Split.** A first pass counts each key's rows (and those at or before `train_until`); each
  key's series is then cut in time order with `part_counts`, the rule of `split_series`.
* **Scaler.** A second pass feeds the training rows to `ScalerFit` (`standard`, `minmax` or
  `none`: `robust` needs every row and is refused).
* **Windows.** Each later pass cuts one split's windows per key with `WindowCarry`, carrying at
  most W - 1 readings per key across batch and file boundaries: the same windows as
  `cut_windows` on the whole table.

Memory is bounded by the record batch (`batch_rows`), the per-key carry-over and the consumer's
own buffer, not by the dataset. Fill policies that need a key's future (`ffill` back-filling a
leading gap, `interpolate`) are refused; `error` and `drop` apply.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from pipeline.detector import STREAMING_KINDS, Scaler, ScalerFit, WindowCarry, WindowSet, WindowSpec
from pipeline.errors import ConfigError, DataError, one_line
from training.data.columns import (
    PARQUET_SUFFIXES,
    in_float32_range,
    parquet_dataset,
    parse_labels,
    parse_numeric,
    parse_times,
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

__all__ = ["STREAM_FILL_POLICIES", "Chunk", "SeriesStream", "SplitPlan", "parquet_decoded_bytes"]

STREAM_FILL_POLICIES = ("error", "drop")
_NO_TIME = np.iinfo(np.int64).min


@dataclass(frozen=True)
class Chunk:
    """Consecutive readings of one key from one record batch, in time order."""

    key: str
    times: np.ndarray  # datetime64[ns]
    values: np.ndarray  # [n, F] float32
    labels: np.ndarray | None  # [n] int64 0/1


@dataclass
class SplitPlan:
    """Per key, the series positions where each part starts, and the last one's end:
    part i of key k is positions `bounds[k][i]` to `bounds[k][i + 1]`."""

    bounds: dict[str, np.ndarray]
    digest: str
    time_range: tuple[str, str]

    def rows(self, part: str) -> int:
        i = PARTS.index(part)
        return int(sum(b[i + 1] - b[i] for b in self.bounds.values()))

    def windows(self, part: str, spec: WindowSpec) -> int:
        """How many windows the part gives (before labelled training windows are left out)."""
        i = PARTS.index(part)
        return sum(spec.count(int(b[i + 1] - b[i])) for b in self.bounds.values())


@dataclass
class _Survey:
    counts: dict[str, int] = field(default_factory=dict)
    until: dict[str, int] = field(default_factory=dict)
    hashes: dict[str, tuple] = field(default_factory=dict)  # key: (times, values) hashes
    first: int = np.iinfo(np.int64).max
    last: int = _NO_TIME


class SeriesStream:
    """A Parquet series dataset, read batch by batch; see the module notes for the rules."""

    def __init__(
        self,
        path: str | Path,
        *,
        time_col: str,
        key_col: str | None = None,
        features: tuple[str, ...] | None = None,
        label_col: str | None = None,
        fill: str = "error",
        batch_rows: int = 65_536,
    ) -> None:
        if fill not in STREAM_FILL_POLICIES:
            raise ConfigError(
                "fill", f"out-of-core data takes {' or '.join(STREAM_FILL_POLICIES)}, not {fill!r}"
            )
        if batch_rows < 1:
            raise ConfigError("batch_rows", f"must be >= 1, got {batch_rows}")
        self.source = str(path)
        self.time_col, self.key_col, self.label_col = time_col, key_col, label_col
        self.fill, self.batch_rows = fill, batch_rows
        self._dataset, self._fragments = _open(Path(path), self.source)
        # Read column chunks as they are decoded rather than whole row groups ahead of time.
        self._scan_options = ds.ParquetFragmentScanOptions(
            pre_buffer=False, use_buffered_stream=True, buffer_size=1 << 20
        )
        empty = self._dataset.schema.empty_table().to_pandas()
        names = select_columns(empty, self.source, time_col, key_col, features, label_col)
        self.features = tuple(names)
        self._columns = [c for c in (time_col, key_col, label_col) if c is not None] + names
        self._repeats_told = False  # each pass meets the same repeats: said once

    # -- reading -------------------------------------------------------------------------------
    def chunks(self) -> Iterator[list[Chunk]]:
        """Every record batch as per-key chunks, checked and in time order within each key."""
        latest: dict[str, int] = {}
        repeats = [0, ""]  # rows that repeat their key's timestamp, and the first's place
        for fragment in self._fragments:
            offset = 0
            for batch in fragment.to_batches(
                schema=self._dataset.schema,
                columns=self._columns,
                batch_size=self.batch_rows,
                batch_readahead=1,
                fragment_readahead=1,
                fragment_scan_options=self._scan_options,
                use_threads=False,
            ):
                where = f"{fragment.path} (rows from {offset + 1})"
                offset += batch.num_rows
                if batch.num_rows:
                    yield self._chunks(batch, where, latest, repeats)
        if repeats[0] and not self._repeats_told:
            self._repeats_told = True
            tell_repeats(self.source, repeats[0], f"in {repeats[1]}")

    def _chunks(self, batch, where: str, latest: dict[str, int], repeats: list) -> list[Chunk]:
        codes, uniques = self._key_codes(batch, where)
        others = [c for c in self._columns if c != self.key_col]
        frame = batch.select(others).to_pandas(date_as_object=False, split_blocks=True)
        times = parse_times(frame[self.time_col], where, self.time_col)
        values = np.column_stack(
            [parse_numeric(frame[name], where, name) for name in self.features]
        )
        values[~in_float32_range(values)] = np.nan
        labels = (
            parse_labels(frame[self.label_col], where, self.label_col)
            if self.label_col is not None
            else None
        )
        if self.fill == "error":
            refuse_gaps(values, self.features, where)
        else:
            keep = ~np.isnan(values).any(axis=1)
            times, codes, values = times[keep], codes[keep], values[keep]
            labels = labels[keep] if labels is not None else None
            if not keep.any():  # a batch of rows that all had a gap
                return []
        order = np.argsort(codes, kind="stable")
        starts = np.flatnonzero(np.diff(codes[order], prepend=-1))
        out = []
        for start, stop in zip(starts, [*starts[1:], len(order)], strict=True):
            rows = order[start:stop]
            key = uniques[codes[rows[0]]]
            ns = times[rows].view(np.int64)
            repeat = np.r_[ns[0] == latest.get(key), ns[1:] == ns[:-1]]
            if repeat.any():  # as the worker does: the first reading of a timestamp counts
                repeats[0] += int(repeat.sum())
                repeats[1] = repeats[1] or f"{where}, key {key!r}"
                rows, ns = rows[~repeat], ns[~repeat]
                if not len(rows):
                    continue
            before = np.concatenate([[latest.get(key, ns[0])], ns[:-1]])
            if (ns < before).any():
                bad = int(np.argmax(ns < before))
                raise DataError(
                    f"{where}: key {key!r}: the reading at {pd.Timestamp(ns[bad])} comes after "
                    f"one at {pd.Timestamp(before[bad])}; out-of-core data must be in time "
                    "order within each key, across files in sorted path order"
                )
            latest[key] = int(ns[-1])
            out.append(
                Chunk(
                    key,
                    times[rows],
                    values[rows].astype(np.float32),
                    None if labels is None else labels[rows],
                )
            )
        return out

    def _key_codes(self, batch, where: str) -> tuple[np.ndarray, list[str]]:
        """Each row's key as a code into the batch's distinct keys (as text, like
        `load_series`), dictionary-encoded by Arrow rather than row by row."""
        import pyarrow.compute as pc

        if self.key_col is None:
            return np.zeros(batch.num_rows, dtype=np.int64), [""]
        column = batch.column(self.key_col)
        if column.null_count:
            row = int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))
            raise DataError(f"{where}: column {self.key_col!r}, data row {row + 1}: no key")
        encoded = column if pa.types.is_dictionary(column.type) else pc.dictionary_encode(column)
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        return codes, [str(k) for k in encoded.dictionary.to_pylist()]

    # -- passes --------------------------------------------------------------------------------
    def plan(self, fractions, train_until: str | None = None) -> SplitPlan:
        """Pass one: count each key's rows and cut them into the four parts as `split_series`
        does; also the time range and a content digest (`_digest`)."""
        weights = check_fractions(fractions, self.source)
        limit = parse_time_limit(train_until, self.source) if train_until is not None else None
        survey = _Survey()
        for chunks in self.chunks():
            for chunk in chunks:
                ns = chunk.times.view(np.int64)
                survey.counts[chunk.key] = survey.counts.get(chunk.key, 0) + len(ns)
                if limit is not None:
                    before = int(np.searchsorted(ns, limit, side="right"))
                    survey.until[chunk.key] = survey.until.get(chunk.key, 0) + before
                survey.first, survey.last = min(survey.first, ns[0]), max(survey.last, ns[-1])
                if chunk.key not in survey.hashes:
                    survey.hashes[chunk.key] = (hashlib.sha256(), hashlib.sha256())
                times_hash, values_hash = survey.hashes[chunk.key]
                times_hash.update(np.ascontiguousarray(ns, dtype="<i8").tobytes())
                values_hash.update(np.ascontiguousarray(chunk.values, dtype="<f4").tobytes())
        if not survey.counts:
            raise DataError(f"{self.source}: the dataset has no data rows")
        bounds = {}
        for key in sorted(survey.counts):
            where = f" for key {key!r}" if self.key_col is not None else ""
            counts = part_counts(
                survey.counts[key],
                weights,
                survey.until.get(key, 0) if limit is not None else None,
                where=where,
                source=self.source,
                train_until=train_until,
            )
            bounds[key] = np.cumsum([0, *counts])
        totals = [sum(int(b[i + 1] - b[i]) for b in bounds.values()) for i in range(4)]
        check_part_sizes(
            totals,
            weights,
            sum(survey.counts.values()),
            source=self.source,
            train_until=train_until,
            keys=len(survey.counts),
            longest=max(survey.counts.values()),
        )
        span = (pd.Timestamp(survey.first).isoformat(), pd.Timestamp(survey.last).isoformat())
        return SplitPlan(bounds, _digest(survey.hashes), span)

    def part(self, plan: SplitPlan, part: str) -> Iterator[Chunk]:
        """The chunks of one part: each key's rows at positions within the part's bounds."""
        i = PARTS.index(part)
        seen: dict[str, int] = {}
        for chunks in self.chunks():
            for chunk in chunks:
                start = seen.get(chunk.key, 0)
                seen[chunk.key] = start + len(chunk.times)
                low, high = plan.bounds[chunk.key][i : i + 2] - start
                low, high = max(int(low), 0), min(int(high), len(chunk.times))
                if low < high:
                    labels = None if chunk.labels is None else chunk.labels[low:high]
                    yield Chunk(chunk.key, chunk.times[low:high], chunk.values[low:high], labels)

    def fit_scaler(self, plan: SplitPlan, kind: str) -> Scaler:
        """Pass two: the scaler of the training rows, in constant memory."""
        if kind not in STREAMING_KINDS:
            raise ConfigError(
                "scaler", f"out-of-core data takes {', '.join(STREAMING_KINDS)}, not {kind!r}"
            )
        fitted = ScalerFit(kind)
        for chunk in self.part(plan, "train"):  # rows labelled anomalous set no scale
            fitted.update(chunk.values if chunk.labels is None else chunk.values[chunk.labels == 0])
        return fitted.compute()

    def windows(self, plan: SplitPlan, part: str, spec: WindowSpec) -> Iterator[WindowSet]:
        """The part's windows, batch by batch, exactly those `cut_windows` gives per key."""
        carry = WindowCarry(spec)
        for chunk in self.part(plan, part):
            cut = carry.push(chunk.key, chunk.times, chunk.values, chunk.labels)
            if cut is not None:
                yield cut


def _digest(hashes: dict[str, tuple]) -> str:
    """SHA-256 over each key's hashes of its times and of its values in order, keys sorted:
    the same however the rows are spread over files and batches (not the in-memory digest,
    which hashes a whole table at once)."""
    h = hashlib.sha256(b"aewatch.series-stream/1\0")
    for key in sorted(hashes):
        h.update(key.encode("utf-8") + b"\0")
        for part in hashes[key]:
            h.update(part.digest())
    return h.hexdigest()


def _open(path: Path, source: str):
    """The pyarrow dataset and its file fragments in sorted path order."""
    if not path.exists():
        raise DataError(f"{source}: no such file or directory")
    if not path.is_dir() and not path.name.lower().endswith(PARQUET_SUFFIXES):
        raise ConfigError("data", f"{source}: out-of-core data is a Parquet file or directory")
    dataset = parquet_dataset(path, source)
    try:
        fragments = sorted(dataset.get_fragments(), key=lambda f: f.path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{source}: cannot be read as Parquet: {one_line(exc)}") from exc
    return dataset, fragments


def parquet_decoded_bytes(root: Path) -> int:
    """A Parquet dataset's size once decoded into memory (the row groups' uncompressed sizes)."""
    import pyarrow.parquet as pq

    total = 0
    for file in Path(root).rglob("*.parquet"):
        meta = pq.ParquetFile(file).metadata
        total += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return total

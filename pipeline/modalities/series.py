"""Series of sensor readings: a detector that takes windows [W, F] of a key's readings.

Records are JSON readings or pre-cut windows (see `pipeline.modalities.readings`), windowed per
key with the training job's rule (see `pipeline.modalities.windowing`). An anomaly event names
the window's span and the features and time steps with the largest errors; alarm episodes sum
the per-feature errors of their windows.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate, chain, repeat
from typing import TYPE_CHECKING

import numpy as np

from pipeline.detector.calendar import calendar_columns
from pipeline.events import iso_ms_many
from pipeline.kafka_io.protocols import record_columns
from pipeline.modalities.base import Partition, Reject
from pipeline.modalities.batches import ReadingBatch
from pipeline.modalities.expiry import KEY_TTL_S
from pipeline.modalities.parking import REREAD_MAX
from pipeline.modalities.readings import (
    BEYOND_YEARS,
    MAX_FUTURE_S,
    MS_RANGE,
    Decoded,
    RecordDecoder,
    Rejection,
    finite_rows,
    unforeseen,
)
from pipeline.modalities.windowing import ReadyWindows, StreamWindower

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.detector import Detector, InputSpec, Scores

__all__ = ["SeriesModality"]

TOP_FEATURES = 3
TOP_STEPS = 3
_NON_FINITE = Rejection("non_finite", "a value is NaN, infinite or beyond float32")
_BEYOND = Rejection(*BEYOND_YEARS)
_NO_INDEX = np.zeros(0, np.int64)


class SeriesIntake:
    """Decodes a poll's readings of the common shape (one C-level pass over their values: the
    only per-record Python work) and its other records one by one, then checks and windows the
    readings of every key together, in record order; pre-cut windows pass straight on. A
    batched record adds its readings as arrays; the poll's Arrow records of one schema are read
    as one table. A bad record among good ones costs only its own decoding: the poll's other
    readings still take the one pass."""

    def __init__(
        self,
        spec: InputSpec,
        max_record_bytes: int,
        reread_max: int = REREAD_MAX,
        max_future_s: float = MAX_FUTURE_S,
        wall_ms: Callable[[], float] = lambda: time.time() * 1000.0,
        key_ttl_s: float = KEY_TTL_S,
    ) -> None:
        """`max_future_s`: readings and windows stamped further ahead of `wall_ms` are refused
        as `bad_timestamp` (0: no limit). A reading of a wrong clock, years ahead, would
        otherwise become its key's latest, and every later reading of the key out of order.
        `key_ttl_s`: keys silent that long are forgotten (`pipeline.modalities.expiry`)."""
        self.decoder = RecordDecoder(
            spec.features, spec.window.length, max_record_bytes, spec.data_features
        )
        self.windows = StreamWindower(spec.window, len(spec.features), reread_max, key_ttl_s)
        self.calendar = spec.calendar
        self.max_future_ms, self.wall_ms = max_future_s * 1000.0, wall_ms
        self._future = Rejection(
            "bad_timestamp",
            f"'ts' is more than {max_future_s:g} s ahead of the worker's clock "
            "(--max-future-s): a sensor clock that is wrong?",
        )

    def take_all(
        self, polled: Sequence[tuple[Partition, Sequence]], pending: ReadyWindows, reject: Reject
    ) -> None:
        """A poll's records of every partition, decoded, checked and windowed together (one
        pass for the poll, however many partitions it spans)."""
        if len(polled) == 1:
            self.take(*polled[0], pending, reject)
            return
        columns = [record_columns(records) for _, records in polled]
        keys, values, offsets = (list(chain.from_iterable(c[j] for c in columns)) for j in range(3))
        joined = _Joined(polled)
        self._take(joined, list(joined.partitions()), keys, values, offsets, pending, reject)

    def take(
        self, partition: Partition, records: Sequence, pending: ReadyWindows, reject: Reject
    ) -> None:
        keys, values, offsets = record_columns(records)
        self._take(records, partition, keys, values, offsets, pending, reject)

    def _take(self, records, partitions, keys, values, offsets, pending, reject: Reject) -> None:
        """Readings of the common shape decoded together (`RecordDecoder.decode_many`), the
        other records one by one, then all readings windowed in record order. `partitions`: the
        records' partition, or a list of each record's."""
        common = self.decoder.decode_many(keys, values)
        if common is None:
            parts, others = [], range(len(values))
        else:
            names, ts, rows, at, others = common
            parts = [self._finite(records, names, ts, rows, at, reject)] if len(at) else []
        cut: list[tuple] = []
        if len(others):
            batched, others = self.decoder.decode_arrow_many(keys, values, others)
            if batched is not None:
                parts.append(batched)
        if len(others):
            more, cut = self._one_by_one(records, partitions, keys, values, offsets, others, reject)
            parts += more
        owner = partitions
        if isinstance(partitions, list):  # each key's partition: that of its latest record
            latest: dict[str, int] = {}
            for names, _, _, at in parts:
                if len(at) > 1 and (at[1:] == at[:-1]).any():  # batches: one look a record
                    runs = np.flatnonzero(np.r_[True, at[1:] != at[:-1]])
                    names, at = map(names.__getitem__, runs.tolist()), at[runs]
                latest.update(zip(names, at.tolist(), strict=True))
            owner = {key: partitions[index] for key, index in latest.items()}
        self._push(owner, records, offsets, parts, cut, pending, reject)

    def _one_by_one(self, records, partitions, keys, values, offsets, indices, reject):
        """Records of `indices` decoded one by one: the (keys, ts, values, record index) of
        their readings, and their pre-cut windows as (record index, `ReadyWindows.add`
        arguments), both in record order; bad records go to `reject`."""
        readings: list[Decoded] = []
        taken: list[int] = []
        parts: list[tuple] = []
        cut: list[tuple] = []
        for i in indices:
            try:
                decoded = self.decoder.decode(keys[i], values[i])
            except Exception as exc:
                decoded = unforeseen(exc)
            kind = decoded.__class__
            if kind is Decoded:
                if decoded.is_window:
                    partition = partitions[i] if isinstance(partitions, list) else partitions
                    window = np.asarray(decoded.values, np.float32)
                    start, end = decoded.ts_start_ms, decoded.ts_ms
                    cut.append((i, (window, decoded.key, start, end, partition, offsets[i])))
                else:
                    readings.append(decoded)
                    taken.append(i)
            elif kind is ReadingBatch:
                if readings:
                    parts.append(self._readings(records, readings, taken, reject))
                    readings, taken = [], []
                n = len(decoded.ts)
                parts.append(([decoded.key] * n, decoded.ts, decoded.values, np.full(n, i)))
            else:
                reject(records[i], decoded)
        if readings:
            parts.append(self._readings(records, readings, taken, reject))
        return parts, cut

    def _push(self, partition, records, offsets, parts: list, cut, pending, reject) -> None:
        """Window the readings of `parts` and pass on the pre-cut windows of `cut`, in record
        order (a key's windows reach the adaptive stage in the order they came); refuse
        readings out of order and readings or windows stamped in the future."""
        latest = self.wall_ms() + self.max_future_ms if self.max_future_ms else np.inf
        if cut and any(window[3] > latest for _, window in cut):
            for index, _ in (c for c in cut if c[1][3] > latest):
                reject(records[index], self._future)
            cut = [c for c in cut if c[1][3] <= latest]
        if not parts:
            for _, window in cut:
                pending.add(*window)
            return
        if len(parts) == 1:
            names, ts, rows, at = parts[0]
        else:  # in record order: a key's readings are windowed in the order they came
            names = [k for part in parts for k in part[0]]
            ts, rows, at = (np.concatenate([part[j] for part in parts]) for j in (1, 2, 3))
            order = np.argsort(at, kind="stable")
            names = [names[i] for i in order.tolist()]
            ts, rows, at = ts[order], rows[order], at[order]
        future = ts > latest
        wrong = future | (ts < MS_RANGE[0]) | (ts >= MS_RANGE[1])
        if wrong.any():  # a batched record is refused once, for its first wrong time
            refused = {}
            why = future[wrong].astype(np.int64)
            reasons = (_BEYOND, self._future)
            for index, code in zip(at[wrong].tolist(), why.tolist(), strict=True):
                refused.setdefault(index, reasons[code])
            for index, rejection in refused.items():
                reject(records[index], rejection)
            keep = np.flatnonzero(~np.isin(at, at[wrong]))
            names = [names[i] for i in keep]
            ts, rows, at = ts[keep], rows[keep], at[keep]
        if self.calendar:  # calendar inputs from each reading's timestamp, as in training
            rows = np.hstack([rows, calendar_columns(ts, self.calendar)])
        at_offsets = np.asarray(offsets, np.int64)[at]
        if cut:
            late, duplicate = self._push_around(
                partition, names, ts, rows, at, at_offsets, cut, pending
            )
        elif len(ts):
            late, duplicate = self.windows.push(partition, names, ts, rows, at_offsets, pending)
        else:
            return
        refused: dict[int, str] = {}  # a batched record is refused once
        for index, reason in [(i, "out_of_order") for i in late.tolist()] + [
            (i, "duplicate_timestamp") for i in duplicate.tolist()
        ]:
            refused.setdefault(int(at[index]), reason)
        for index, reason in refused.items():
            reject(records[index], Rejection(reason, "timestamp not after the key's latest"))

    def _push_around(self, partition, names, ts, rows, at, at_offsets, cut, pending) -> tuple:
        """`StreamWindower.push` of the readings in runs between the pre-cut windows of `cut`,
        each window passed on after the readings before it: (late, duplicate) as one push
        gives them."""
        late, duplicate = [], []
        start = 0
        for end, window in [*cut, (None, None)]:
            stop = len(at) if end is None else int(np.searchsorted(at, end))
            if stop > start:
                run = slice(start, stop)
                pushed = self.windows.push(
                    partition, names[run], ts[run], rows[run], at_offsets[run], pending
                )
                late.append(pushed[0] + start)
                duplicate.append(pushed[1] + start)
                start = stop
            if window is not None:
                pending.add(*window)
        if not late:
            return _NO_INDEX, _NO_INDEX
        return np.concatenate(late), np.concatenate(duplicate)

    def _readings(self, records: Sequence, readings: list, taken: list, reject: Reject) -> tuple:
        """Single readings as arrays; those with a non-finite value rejected."""
        keys = [r.key for r in readings]
        ts = np.array([r.ts_ms for r in readings], np.int64)
        values = np.array([r.values for r in readings], np.float64)
        return self._finite(records, keys, ts, values, np.array(taken, np.int64), reject)

    @staticmethod
    def _finite(records: Sequence, keys: list, ts, values, at, reject: Reject) -> tuple:
        """(keys, ts, values, record index) of the readings whose values are finite; the others
        rejected."""
        finite = finite_rows(values)
        if not finite.all():
            for index in np.flatnonzero(~finite):
                reject(records[int(at[index])], _NON_FINITE)
            keep = np.flatnonzero(finite)
            keys = [keys[i] for i in keep]
            ts, values, at = ts[keep], values[keep], at[keep]
        return keys, ts, values, at


class _Joined(Sequence):
    """The records of several partitions as one sequence, in poll order."""

    def __init__(self, polled: Sequence[tuple[Partition, Sequence]]) -> None:
        self.polled = polled
        self.ends = list(accumulate(len(records) for _, records in polled))

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, index: int):
        part = bisect_right(self.ends, index)
        return self.polled[part][1][index - (self.ends[part - 1] if part else 0)]

    def partitions(self) -> Iterator[Partition]:
        """The partition of each record."""
        return chain.from_iterable(repeat(p, len(records)) for p, records in self.polled)


class SeriesModality:
    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec

    def intake(self, max_record_bytes: int, reread_max: int = REREAD_MAX, **clock) -> SeriesIntake:
        """`clock`: `max_future_s`, `wall_ms` and `key_ttl_s` (see `SeriesIntake`)."""
        return SeriesIntake(self.spec, max_record_bytes, reread_max, **clock)

    def event_details(
        self, scored: Scores, rows: np.ndarray, start_ms: np.ndarray, end_ms: np.ndarray
    ) -> list[dict]:
        """Each window's span, and its features and time steps of largest error (ties in their
        order), gathered for all the rows at once."""
        spec = self.spec.window
        per_feature, per_step = scored.per_feature[rows], scored.per_step[rows]
        features = np.argsort(-per_feature, axis=1, kind="stable")[:, :TOP_FEATURES]
        steps = np.argsort(-per_step, axis=1, kind="stable")[:, :TOP_STEPS]
        feature_errors = np.take_along_axis(per_feature, features, 1).tolist()
        step_errors = np.take_along_axis(per_step, steps, 1).tolist()
        steps = steps.tolist()
        names = [[self.spec.features[f] for f in row] for row in features.tolist()]
        terms = None
        if scored.terms is not None:
            term_index = np.take_along_axis(scored.terms[rows], features, 1).tolist()
            terms = [[scored.term_names[t] for t in row] for row in term_index]
        details = []
        for j, (start, end) in enumerate(
            zip(iso_ms_many(start_ms), iso_ms_many(end_ms), strict=True)
        ):
            top = [
                {"name": n, "error": e} for n, e in zip(names[j], feature_errors[j], strict=True)
            ]
            if terms is not None:
                for item, term in zip(top, terms[j], strict=True):
                    item["term"] = term
            details.append(
                {
                    "window": {
                        "start": start,
                        "end": end,
                        "length": spec.length,
                        "stride": spec.stride,
                    },
                    "top_features": top,
                    "top_steps": [
                        {"index": t, "error": e}
                        for t, e in zip(steps[j], step_errors[j], strict=True)
                    ],
                }
            )
        return details

    @property
    def alarm_features(self) -> tuple[str, ...]:
        return tuple(self.spec.features)

    def alarm_errors(self, scored: Scores) -> np.ndarray:
        return scored.per_feature

    def mismatch(self, candidate: InputSpec) -> tuple[str, str] | None:
        old, new = self.spec, candidate
        if tuple(old.features) != tuple(new.features):
            return "features", f"features {list(new.features)}, serving {list(old.features)}"
        if (old.window.length, old.window.stride) != (new.window.length, new.window.stride):
            return (
                "window",
                f"window {new.window.length}/{new.window.stride}, "
                f"serving {old.window.length}/{old.window.stride}",
            )
        return None

    def score_rows(self, detector: Detector, rows: pd.DataFrame) -> pd.DataFrame:
        """One output row per input reading: the score of the window ending at it."""
        from pipeline.batch import score_readings

        return score_readings(detector, rows)

    def version_tags(self) -> dict[str, str]:
        window = self.spec.window
        return {
            "window": f"{window.length}/{window.stride}",
            "features": ",".join(self.spec.features),
        }

    def example_rows(self, sample: np.ndarray) -> pd.DataFrame:
        """A window as the pyfunc takes it: one reading per row, with a key and a time."""
        import pandas as pd

        names = list(self.spec.data_features)  # calendar inputs come from the times
        frame = pd.DataFrame(sample[:, : len(names)], columns=names)
        times = pd.date_range("2026-01-01", periods=len(frame), freq="s").astype(str)
        frame.insert(0, "ts", times)
        frame.insert(0, "key", "example")
        return frame

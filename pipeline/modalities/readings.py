"""Decoding input records: sensor readings and pre-cut windows, or a reason to reject them.

Readings: `{"key": "pump-7", "ts": "2026-01-01T00:00:00Z" | 1767225600000, "values": {"s1": 0.3}}`
with the Kafka message key equal to the entity key (the JSON `key` may be left out then).
Windows: `{"key": ..., "ts_start": ..., "ts_end": ..., "values": [[...], ...]}`, rows in time order
and columns in the model's feature order (or named by an optional `"features": [...]`).

Batched readings of one key (columnar JSON, Arrow IPC) decode to a `ReadingBatch`, see
`pipeline.modalities.batches`.

Features are matched by name; extra ones are ignored; a missing or non-finite one rejects the
record. Rejections carry one of the documented DLQ reasons.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter
from typing import NamedTuple

import msgspec
import numpy as np
import orjson

from pipeline.modalities.batches import (
    ARROW_MAGIC,
    ArrowBatches,
    ReadingBatch,
    checked_batch,
    columnar_batch,
)
from pipeline.modalities.times import (
    BEYOND_YEARS,
    MS_RANGE,
    SECONDS,
    parse_timestamp_ms,
    seconds_like,
)

__all__ = [
    "MS_RANGE",
    "REASONS",
    "Decoded",
    "Rejection",
    "RecordDecoder",
    "finite_rows",
    "parse_timestamp_ms",
    "unforeseen",
]

log = logging.getLogger(__name__)

REASONS = (
    "decode_error",  # not UTF-8 JSON
    "schema_mismatch",  # JSON, but not the shape of a reading or window
    "missing_feature",  # a feature the model needs is absent
    "non_finite",  # NaN, infinity, or beyond float32 range
    "bad_timestamp",  # missing, unparseable, outside the years 1 to 9999, or in the future
    "oversize",  # record larger than max_record_bytes
    "window_shape",  # a pre-cut window of the wrong length or width
    "out_of_order",  # older than the key's latest reading
    "duplicate_timestamp",  # same timestamp as the key's latest reading
)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_FUTURE_S = 86_400.0  # how far ahead of the worker's clock a reading may be stamped, by default
# Failed typed decodes in a poll after which, if they outnumber the readings decoded, the rest
# of the poll is decoded one by one without a typed try (a stream of bad records).
MOSTLY_OTHERS = 16
# How a typed decode fails: a record of another shape, or one nested deeper than the decoder
# recurses (an ignored field of a few KB can be; orjson refuses it as "depth limit exceeded").
_TYPED_FAILS = (msgspec.DecodeError, RecursionError)


def finite_rows(values: np.ndarray) -> np.ndarray:
    """Rows of a [n, F] float64 array whose values are finite and within float32 range."""
    return (np.abs(values) <= _FLOAT32_MAX).all(axis=1)  # NaN compares False


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str
    detail: str


_SECONDS = Rejection(*SECONDS)
_BEYOND_YEARS = Rejection(*BEYOND_YEARS)


def unforeseen(exc: Exception) -> Rejection:
    """The rejection of a record whose decoding raised what no rule foresaw (logged with its
    traceback): a dead letter, where an exception would stop the worker and a restart would
    read the same record again."""
    log.warning("decoding a record raised %r; it goes to the DLQ", exc, exc_info=True)
    return Rejection("decode_error", f"{type(exc).__name__}: {exc}"[:200])


class Decoded(NamedTuple):
    """A reading (values is one row) or a pre-cut window (values has W rows). A named tuple:
    one is built per record on the hot path."""

    key: str
    ts_ms: int
    values: list
    is_window: bool = False
    ts_start_ms: int = 0


_KEY, _TS, _VALUES = attrgetter("key"), attrgetter("ts"), attrgetter("values")
_ROWS = list[list[float]]  # a window's rows: numbers only (not booleans or numeric strings)
_FIELDS = msgspec.structs.astuple
# A record whose "ts" is a list: a columnar batch, or one the full parse gives its reason.
_TS_LIST = re.compile(rb'"ts"\s*:\s*\[').search


def _reading_decoder(features: tuple[str, ...]) -> msgspec.json.Decoder:
    """A decoder of the common reading, `{"key": str, "ts": int, "values": {feature: number}}`
    (other fields and features ignored), typed: one C-level pass checks and converts it, and
    refuses anything else (a boolean or string where a number belongs, a missing feature).
    Its structs hold numbers and a string only, so they stay out of the garbage collector: a
    poll of 10,000 readings would otherwise set off its collections over and over."""
    fields = [(f"f{i}", float) for i in range(len(features))]
    names = {f"f{i}": name for i, name in enumerate(features)}
    values = msgspec.defstruct("Values", fields, rename=names, gc=False)
    reading = msgspec.defstruct(
        "Reading", [("key", str), ("ts", int), ("values", values)], gc=False
    )
    return msgspec.json.Decoder(reading)


def _columnar_decoder(features: tuple[str, ...]) -> msgspec.json.Decoder:
    """A decoder of the common columnar batch, `{"key": str (or left out), "ts": [int, ...],
    "values": {feature: [number, ...]}}` (other fields and features ignored): typed like
    `_reading_decoder`, so one C-level pass checks the types and builds the lists."""
    fields = [(f"f{i}", list[float]) for i in range(len(features))]
    names = {f"f{i}": name for i, name in enumerate(features)}
    columns = msgspec.defstruct("Columns", fields, rename=names, gc=False)
    batch = msgspec.defstruct(
        "Batch", [("ts", list[int]), ("values", columns), ("key", str | None, None)], gc=False
    )
    return msgspec.json.Decoder(batch)


class RecordDecoder:
    def __init__(
        self,
        features: tuple[str, ...],
        window: int,
        max_bytes: int,
        reading_features: tuple[str, ...] | None = None,
    ) -> None:
        """`features`: the columns of a pre-cut window; `reading_features` those a reading
        carries (default the same; fewer when calendar inputs are made from its timestamp)."""
        self.features = features
        self.reading_features = features if reading_features is None else reading_features
        self.window = window
        self.max_bytes = max_bytes
        self._decode_reading = _reading_decoder(self.reading_features).decode
        self._decode_columnar = _columnar_decoder(self.reading_features).decode
        self._arrow = ArrowBatches(self.reading_features)

    def decode_many(self, message_keys: list, values: list):
        """The readings of the common shape among `values`, each step one C-level pass over the
        poll: (keys, ts [n] int64, values [n, F] float64, index [n] of their records, indices of
        the other records). The others (a window, a batch, another timestamp form, a key only in
        the message, a bad record) the caller decodes one by one, which gives each its reason.
        None when the whole poll should go record by record (a record without a value or a
        message key, or a key that is not UTF-8; a timestamp beyond int64). Finiteness is
        checked by the caller, as for single readings."""
        try:
            expected = list(map(bytes.decode, message_keys))
            oversize = max(map(len, values)) > self.max_bytes
        except (TypeError, ValueError):  # (ValueError: also a message key that is not UTF-8)
            return None
        if oversize:  # refused one by one, with their size
            values = [value if len(value) <= self.max_bytes else b"" for value in values]
        data: list = []
        others: list[int] = []
        remaining = iter(values)
        while True:  # the typed decoder stops at a record of another kind; go on past it
            try:
                data.extend(map(self._decode_reading, remaining))
                break
            except _TYPED_FAILS:
                others.append(len(data) + len(others))
                if len(others) > MOSTLY_OTHERS and len(others) > len(data):
                    others.extend(range(len(data) + len(others), len(values)))
                    break  # mostly other records: the rest one by one, without a typed try
        keys = list(map(_KEY, data))
        n = len(values)
        if not others and keys == expected:
            at = np.arange(n)
        else:
            decoded = np.ones(n, bool)
            decoded[others] = False
            at = np.flatnonzero(decoded)
            differ = np.asarray(keys, object) != np.asarray(expected, object)[at]
            if differ.any():  # a JSON key other than the message key: refused one by one
                others = sorted(others + at[differ].tolist())
                keep = np.flatnonzero(~differ).tolist()
                data, keys, at = [data[i] for i in keep], [keys[i] for i in keep], at[keep]
        try:
            ts = np.fromiter(map(_TS, data), np.int64, count=len(data))
        except OverflowError:  # integers beyond int64
            return None
        seconds = seconds_like(ts)
        if seconds.any():  # refused one by one, with the reason
            others = sorted(others + at[seconds].tolist())
            keep = np.flatnonzero(~seconds).tolist()
            data, keys, at, ts = (
                [data[i] for i in keep],
                [keys[i] for i in keep],
                at[keep],
                ts[keep],
            )
        width = len(self.reading_features)
        flat = chain.from_iterable(map(_FIELDS, map(_VALUES, data)))  # each reading's in order
        values = np.fromiter(flat, np.float64, count=len(data) * width).reshape(len(data), width)
        return keys, ts, values, at, others

    def decode_arrow_many(self, message_keys: list, values: list, indices) -> tuple:
        """The Arrow records among `indices` decoded together (`ArrowBatches.many`): (keys, ts,
        values, record index) of their readings or None, and the indices left to `decode`."""
        return self._arrow.many(message_keys, values, indices, self.max_bytes)

    def decode(
        self, message_key: bytes | None, value: bytes | None
    ) -> Decoded | ReadingBatch | Rejection:
        if value is None:
            return Rejection("schema_mismatch", "empty record (tombstone)")
        if len(value) > self.max_bytes:
            return Rejection("oversize", f"{len(value)} bytes > {self.max_bytes}")
        if value.startswith(ARROW_MAGIC):
            return _batch(self._arrow(message_key, value))
        batch = self._columnar(message_key, value)
        if batch is not None:
            return batch
        common = self._common(message_key, value)
        if common is not None:
            return common
        try:
            data = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            return Rejection("decode_error", str(exc)[:200])
        if data.__class__ is not dict:
            return Rejection("schema_mismatch", "not a JSON object")
        # the common reading ({"key": str, "ts": epoch ms, "values": {...}}) passes each check
        # with one class comparison; anything else is looked at more closely
        key = data.get("key")
        if key.__class__ is not str:
            key = self._entity_key(key, message_key)
            if key.__class__ is Rejection:
                return key
        if message_key is not None and message_key != key.encode():
            return Rejection("schema_mismatch", "JSON 'key' differs from the message key")
        values = data.get("values")
        if values.__class__ is dict:
            return self._reading(key, data, values)
        if values.__class__ is list:
            return self._window(key, data, values)
        return Rejection("schema_mismatch", "'values' must be an object or a list of rows")

    def _common(self, message_key: bytes | None, value: bytes) -> Decoded | None:
        """A reading of the common shape, decoded as `decode_many` decodes a poll's (what it
        ignores is not looked at either way: a record is taken or refused whatever else its poll
        holds); None for any other record."""
        try:
            reading = self._decode_reading(value)
        except _TYPED_FAILS:
            return None
        if message_key is not None:
            try:
                if message_key.decode() != reading.key:
                    return None
            except UnicodeDecodeError:
                return None
        if seconds_like(reading.ts) or not MS_RANGE[0] <= reading.ts < MS_RANGE[1]:
            return None
        return Decoded(reading.key, reading.ts, list(_FIELDS(reading.values)))

    def _columnar(self, message_key: bytes | None, value: bytes) -> ReadingBatch | Rejection | None:
        """A columnar batch of the common shape, decoded and checked (`checked_batch`); None
        for any other record, which is then parsed in full and looked at closely (the same
        answer, by the longer way: a reason for each way a batch can be wrong)."""
        if _TS_LIST(value) is None:  # a single reading or a window: not worth a typed attempt
            return None
        try:
            batch = self._decode_columnar(value)
        except _TYPED_FAILS:
            return None
        key = batch.key
        if key is None:
            key = self._entity_key(None, message_key)
            if key.__class__ is Rejection:
                return None
        elif message_key is not None and message_key != key.encode():
            return None
        n = len(batch.ts)
        columns = _FIELDS(batch.values)
        if n == 0 or any(len(column) != n for column in columns):
            return None
        try:
            ts = np.array(batch.ts, np.int64)
        except OverflowError:
            return None
        if seconds_like(ts).any():
            return None
        values = np.empty((n, len(columns)))
        for j, column in enumerate(columns):
            values[:, j] = column
        return _batch(checked_batch(key, ts, values))

    @staticmethod
    def _entity_key(key, message_key: bytes | None) -> str | Rejection:
        """A JSON key that is not a string: absent (the message key stands in) or a number."""
        if key is None:
            if not message_key:
                return Rejection("schema_mismatch", "no entity key (JSON 'key' or message key)")
            try:
                return message_key.decode()
            except UnicodeDecodeError:
                return Rejection("schema_mismatch", "message key is not UTF-8")
        if not isinstance(key, int) or isinstance(key, bool):
            return Rejection("schema_mismatch", "'key' must be a string")
        return str(key)

    def _reading(self, key: str, data: dict, values: dict) -> Decoded | ReadingBatch | Rejection:
        ts = data.get("ts")
        if ts.__class__ is not int:  # epoch ms is the common case; anything else is parsed
            if ts.__class__ is list:
                return _batch(columnar_batch(self.reading_features, key, ts, values))
            if ts is None:
                return Rejection("bad_timestamp", "no 'ts'")
            try:
                number = ts.__class__ is not str
                ts = parse_timestamp_ms(ts)
            except (ValueError, OverflowError, OSError) as exc:
                return Rejection("bad_timestamp", str(exc)[:200])
        elif not MS_RANGE[0] <= ts < MS_RANGE[1]:  # (beyond int64 too: JSON reads up to 2**64)
            return _BEYOND_YEARS
        else:
            number = True
        if number and seconds_like(ts):
            return _SECONDS
        try:
            row = [values[name] for name in self.reading_features]
        except KeyError as exc:
            return Rejection("missing_feature", f"missing feature {exc.args[0]!r}")
        for number in row:
            kind = number.__class__
            if kind is not float and kind is not int:  # bool is neither
                return Rejection("schema_mismatch", f"a feature value is {kind.__name__}")
        # finiteness and float32 range are checked per batch (see `finite_rows`)
        return Decoded(key, ts, row)

    def _window(self, key: str, data: dict, rows: list) -> Decoded | Rejection:
        try:
            ts_end = parse_timestamp_ms(data["ts_end"])
            ts_start = parse_timestamp_ms(data["ts_start"])
        except KeyError:
            return Rejection("bad_timestamp", "a window needs 'ts_start' and 'ts_end'")
        except (ValueError, OverflowError, OSError) as exc:
            return Rejection("bad_timestamp", str(exc)[:200])
        if ts_start > ts_end:
            return Rejection("bad_timestamp", "'ts_start' is after 'ts_end'")
        names = data.get("features")
        try:
            array = np.asarray(rows, dtype=np.float64)
            msgspec.convert(rows, _ROWS)
        except (TypeError, ValueError, OverflowError, msgspec.ValidationError) as exc:
            detail = "rows must be lists of numbers of equal length"
            if isinstance(exc, msgspec.ValidationError):
                detail = f"{detail} ({exc})"
            return Rejection("window_shape", detail[:200])
        if names is not None:
            if not isinstance(names, list) or array.ndim != 2 or len(names) != array.shape[1]:
                return Rejection("window_shape", "'features' must name every column")
            index = {name: i for i, name in enumerate(names)}
            missing = [f for f in self.features if f not in index]
            if missing:
                return Rejection("missing_feature", f"missing feature {missing[0]!r}")
            array = array[:, [index[f] for f in self.features]]
        if array.shape != (self.window, len(self.features)):
            return Rejection(
                "window_shape",
                f"shape {list(array.shape)}, expected [{self.window}, {len(self.features)}]",
            )
        if not (np.isfinite(array).all() and np.abs(array).max() <= _FLOAT32_MAX):
            return Rejection("non_finite", "window holds NaN, infinity or out-of-range values")
        return Decoded(key, ts_end, array.tolist(), is_window=True, ts_start_ms=ts_start)


def _batch(decoded) -> ReadingBatch | Rejection:
    return decoded if decoded.__class__ is ReadingBatch else Rejection(*decoded)

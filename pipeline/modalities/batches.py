"""Batched readings: many readings of one key in one record, decoded column-wise.

Two forms (see the README's schema section):

- columnar JSON: `{"key": "pump-7", "ts": [t0, t1, ...], "values": {"s1": [...], "s2": [...]}}`,
  one list per feature, as long as `ts` (the JSON key may be left out: the message key stands in);
- Apache Arrow IPC (stream format, starting with the continuation marker `FF FF FF FF`): a record
  batch with a `ts` column (integer epoch ms, or a timestamp type) and one numeric column per
  feature; the entity key is the message key, or a string `key` column holding one key.

The Arrow records of a poll that share a schema are decoded together (`ArrowBatches.many`); the
others, and any such record that fails a check, one by one, which gives each its reason.

A batch is accepted or rejected as a whole, with the reasons of single readings: its timestamps
must increase within the record (`out_of_order` otherwise), every feature must be present
(`missing_feature`) and numeric (`schema_mismatch`), every value finite (`non_finite`).
"""

from __future__ import annotations

from itertools import chain, repeat
from typing import NamedTuple

import numpy as np

from pipeline.modalities.times import BEYOND_YEARS, SECONDS, parse_timestamp_ms, seconds_like

__all__ = [
    "ARROW_MAGIC",
    "ArrowBatches",
    "ReadingBatch",
    "arrow_record",
    "checked_batch",
    "columnar_batch",
]

ARROW_MAGIC = b"\xff\xff\xff\xff"  # an Arrow IPC stream message starts with it; JSON never does
_ARROW_END = ARROW_MAGIC + b"\x00\x00\x00\x00"  # the end-of-stream marker
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class ReadingBatch(NamedTuple):
    """Readings of one key: `ts` [n] int64 epoch ms, increasing; `values` [n, F] float64."""

    key: str
    ts: np.ndarray
    values: np.ndarray


def checked_batch(key: str, ts: np.ndarray, values: np.ndarray):
    """The batch, or (reason, detail) of why it is refused."""
    if len(ts) and (np.diff(ts) <= 0).any():
        return "out_of_order", "timestamps within the batch must increase"
    if not (np.abs(values) <= _FLOAT32_MAX).all():  # NaN compares False
        return "non_finite", "a value is NaN, infinite or beyond float32"
    return ReadingBatch(key, ts, values)


def _timestamps(items: list):
    """Epoch ms of a list of timestamps (int64 array), or the reason it is not one."""
    if bool in set(map(type, items)):  # numpy would take True beside numbers as 1
        return ("bad_timestamp", "a boolean is not a timestamp")
    try:
        array = np.asarray(items) if items else np.zeros(0, np.int64)
    except ValueError:  # lists of unequal shapes inside
        return ("bad_timestamp", "each timestamp must be a number or a string")
    if array.ndim == 1 and array.dtype.kind == "i":
        return SECONDS if seconds_like(array).any() else array.astype(np.int64, copy=False)
    try:
        stamps = np.array([parse_timestamp_ms(item) for item in items], np.int64)
    except (ValueError, OverflowError, OSError, TypeError) as exc:
        return ("bad_timestamp", str(exc)[:200])
    numeric = np.fromiter((item.__class__ is not str for item in items), bool, len(items))
    return SECONDS if (seconds_like(stamps) & numeric).any() else stamps


def _column(items, n: int):
    """A feature's list as float64 [n], or the reason it is not one."""
    if items.__class__ is not list or len(items) != n:
        return "schema_mismatch", "each feature needs a list as long as 'ts'"
    if bool in set(map(type, items)):  # numpy would take True beside numbers as 1.0
        return "schema_mismatch", "a feature value is bool"
    try:
        array = np.asarray(items)
    except ValueError:  # lists of unequal shapes inside
        return "schema_mismatch", "feature values must be numbers"
    if array.ndim != 1 or array.dtype.kind not in "iuf":  # u: integers beyond int64 alone
        if array.dtype.kind == "O" and all(
            x.__class__ is int or x.__class__ is float for x in items
        ):  # integers beyond int64 beside floats: they are numbers, if not float32 ones
            return np.array([float(x) if abs(x) < 1e308 else np.inf for x in items])
        return "schema_mismatch", "feature values must be numbers"
    return array.astype(np.float64, copy=False)


def columnar_batch(features: tuple[str, ...], key: str, ts: list, values: dict):
    """A columnar JSON batch (its `ts` and `values` already parsed), or (reason, detail)."""
    stamps = _timestamps(ts)
    if stamps.__class__ is tuple:
        return stamps
    if not len(stamps):
        return "schema_mismatch", "an empty batch"
    columns = []
    for name in features:
        if name not in values:  # a null column is there, and refused by `_column`
            return "missing_feature", f"missing feature {name!r}"
        column = _column(values[name], len(stamps))
        if column.__class__ is tuple:
            return column
        columns.append(column)
    return checked_batch(key, stamps, np.stack(columns, axis=1))


class _ArrowPlan(NamedTuple):
    """What an Arrow schema says about its records, worked out once per schema: where `ts`, the
    `key` column and each feature are (None: absent) and whether their types can hold readings."""

    duplicate: str | None  # a name the batch needs that more than one column carries
    ts: int | None
    ts_timestamp: bool
    ts_integer: bool
    key: int | None
    features: tuple[tuple[str, int | None, bool], ...]  # (name, index, numeric)

    @property
    def common(self) -> bool:
        """Whether every record of the schema is read the common way: a `ts` of integers or
        timestamps, every feature numeric, no `key` column (the message key names the key)."""
        return (
            self.duplicate is None
            and (self.ts_timestamp or self.ts_integer)
            and self.key is None
            and all(numeric for _, _, numeric in self.features)
        )


def _plan(schema, features: tuple[str, ...]) -> _ArrowPlan:
    import pyarrow as pa

    names = schema.names
    index = {name: i for i, name in enumerate(names)}
    needed = ("ts", "key", *features)
    duplicate = next((n for n in needed if n in index and names.count(n) > 1), None)
    ts = index.get("ts")
    kind = None if ts is None else schema.types[ts]
    numeric = (pa.types.is_integer, pa.types.is_floating)
    columns = []
    for name in features:
        i = index.get(name)
        columns.append((name, i, i is not None and any(t(schema.types[i]) for t in numeric)))
    return _ArrowPlan(
        duplicate,
        ts,
        kind is not None and pa.types.is_timestamp(kind),
        kind is not None and pa.types.is_integer(kind),
        index.get("key"),
        tuple(columns),
    )


class ArrowBatches:
    """Decodes Arrow IPC records for `features`. The records of a stream share a few schemas;
    what a schema allows is worked out once (`_ArrowPlan`), so a record costs its columns only."""

    KEEP = 8  # schemas remembered

    def __init__(self, features: tuple[str, ...]) -> None:
        self.features = features
        self._plans: list[tuple[object, _ArrowPlan]] = []
        self._schemas: dict[bytes, tuple | None] = {}  # schema message -> (schema, plan) or None

    def plan(self, schema) -> _ArrowPlan:
        for known, plan in self._plans:
            if known.equals(schema):
                return plan
        plan = _plan(schema, self.features)
        self._plans = [(schema, plan), *self._plans[: self.KEEP - 1]]
        return plan

    def __call__(self, message_key: bytes | None, value: bytes):
        """An Arrow IPC stream record, or (reason, detail)."""
        import pyarrow as pa

        try:
            table = pa.ipc.open_stream(value).read_all()
            table.validate(full=True)
        except (pa.ArrowException, ValueError, OSError) as exc:
            return "decode_error", f"not an Arrow IPC stream: {exc}"[:200]
        plan = self.plan(table.schema)
        if plan.duplicate is not None:
            return "schema_mismatch", f"more than one column is named {plan.duplicate!r}"
        if plan.ts is None:
            return "bad_timestamp", "no 'ts' column"
        if table.num_rows == 0:
            return "schema_mismatch", "an empty batch"
        key = _arrow_key(table, plan.key, message_key)
        if key.__class__ is tuple:
            return key
        ts = table.column(plan.ts)
        if not (plan.ts_timestamp or plan.ts_integer):
            return "bad_timestamp", f"'ts' must be integer epoch ms or a timestamp, not {ts.type}"
        if ts.null_count:
            return "bad_timestamp", "'ts' holds a null"
        ts = _epoch_ms(ts, plan)
        if ts.__class__ is tuple:
            return ts
        if plan.ts_integer and seconds_like(ts).any():
            return SECONDS
        columns = []
        for name, index, numeric in plan.features:
            if index is None:
                return "missing_feature", f"missing feature {name!r}"
            column = table.column(index)
            if not numeric or column.null_count:
                return "schema_mismatch", f"feature {name!r} must be numbers without nulls"
            columns.append(column.to_numpy().astype(np.float64, copy=False))
        return checked_batch(key, ts, np.stack(columns, axis=1))

    def many(
        self, message_keys: list, values: list, indices, max_bytes: int
    ) -> tuple[tuple | None, list[int]]:
        """The Arrow records among `indices` in the common form, decoded together: each a
        stream of one schema message, one record batch and the end marker, of a schema read the
        common way (`_ArrowPlan.common`), keyed by its message key. Returns (keys, ts, values,
        record index) of their readings, or None, and the indices left to decode one by one
        (`__call__`): the other records, and every record this way would not take whole (a bad
        one among them gets its reason there). A record's readings here are those `__call__`
        gives it. Records over `max_bytes` are left for one by one, which refuses them."""
        groups: dict[bytes, tuple] = {}  # schema message -> ((schema, plan), [(index, batch)])
        rest: list[int] = []
        for i in indices:
            value = values[i]
            fits = value.__class__ is bytes and len(value) <= max_bytes
            batch = self._one_batch(value) if fits else None
            if batch is None or not message_keys[i]:
                rest.append(i)
            else:
                groups.setdefault(batch[0], (batch[1], []))[1].append((i, batch[2]))
        parts = []
        for known, taken in groups.values():
            part = self._together(known, message_keys, taken)
            if part is None:
                rest.extend(i for i, _ in taken)
                continue
            parts.append(part[0])
            rest.extend(part[1])
        rest.sort()
        if not parts:
            return None, rest
        if len(parts) == 1:
            return parts[0], rest
        keys = list(chain.from_iterable(part[0] for part in parts))
        ts, rows, at = (np.concatenate([part[j] for part in parts]) for j in (1, 2, 3))
        if (at[1:] < at[:-1]).any():  # schemas interleaved: back in record order, for windowing
            order = np.argsort(at, kind="stable")
            keys = np.asarray(keys, object)[order].tolist()
            ts, rows, at = ts[order], rows[order], at[order]
        return (keys, ts, rows, at), rest

    def _one_batch(self, value: bytes):
        """(schema message, (schema, plan), record batch) of a record that holds a schema message
        of a schema read the common way, one record batch and the end marker; else None."""
        import pyarrow as pa

        if not value.startswith(ARROW_MAGIC) or not value.endswith(_ARROW_END):
            return None
        head = 8 + int.from_bytes(value[4:8], "little")
        if head > len(value) - len(_ARROW_END):
            return None
        known = self._schemas.get(schema := value[:head], False)
        if known is False:
            known = self._schema(schema)
        if known is None:
            return None
        try:
            body = pa.py_buffer(value).slice(head, len(value) - head - len(_ARROW_END))
            message = pa.ipc.read_message(body)
            if (
                message.type != "record batch"
                or 8 + message.metadata.size + message.body.size != body.size
            ):
                return None
            batch = pa.ipc.read_record_batch(message, known[0])
        except (pa.ArrowException, ValueError, OSError, EOFError):
            return None
        return (schema, known, batch) if batch.num_rows else None

    def _schema(self, message: bytes):
        """(schema, plan) of a schema message read the common way, else None; remembered."""
        import pyarrow as pa

        try:
            schema = pa.ipc.read_schema(pa.py_buffer(message))
            plan = _plan(schema, self.features)  # (a name that is not UTF-8: ValueError)
        except (pa.ArrowException, ValueError, OSError):
            known = None
        else:
            known = (schema, plan) if plan.common else None
        if len(self._schemas) >= self.KEEP:
            del self._schemas[next(iter(self._schemas))]
        self._schemas[message] = known
        return known

    @staticmethod
    def _together(known, message_keys: list, taken: list):
        """((keys, ts, values, record index), refused record indices) of records of one schema,
        checked as `checked_batch` checks each; None when they must go one by one."""
        import pyarrow as pa

        schema, plan = known
        indices = [i for i, _ in taken]
        try:
            keys = [message_keys[i].decode() for i in indices]
            table = pa.Table.from_batches([batch for _, batch in taken], schema)
            table.validate(full=True)
        except (pa.ArrowException, ValueError, UnicodeDecodeError):
            return None
        ts = table.column(plan.ts)
        columns = [table.column(index) for _, index, _ in plan.features]
        if ts.null_count or any(column.null_count for column in columns):
            return None
        ts = _epoch_ms(ts, plan)
        if ts.__class__ is tuple:
            return None
        values = np.stack([c.to_numpy().astype(np.float64, copy=False) for c in columns], axis=1)
        lengths = np.array([batch.num_rows for _, batch in taken])
        record = np.repeat(np.arange(len(taken)), lengths)
        bad = np.zeros(len(taken), bool)
        bad[record[1:][(np.diff(ts) <= 0) & (record[1:] == record[:-1])]] = True
        bad[record[~(np.abs(values) <= _FLOAT32_MAX).all(axis=1)]] = True  # NaN compares False
        if plan.ts_integer:
            bad[record[seconds_like(ts)]] = True
        if bad.any():
            keep = ~bad[record]
            ts, values, record = ts[keep], values[keep], record[keep]
            lengths = lengths[~bad]
            keys = [key for key, refused in zip(keys, bad.tolist(), strict=True) if not refused]
        names = list(chain.from_iterable(map(repeat, keys, lengths.tolist())))
        at = np.asarray(indices, np.int64)[record]
        return (names, ts, values, at), [indices[j] for j in np.flatnonzero(bad).tolist()]


def _epoch_ms(ts, plan: _ArrowPlan):
    """A `ts` column of integers or timestamps as int64 epoch ms, or (reason, detail) when a
    value is beyond int64 milliseconds. Finer timestamps are cut to the millisecond toward
    zero, as a fractional epoch ms is."""
    import pyarrow as pa

    try:
        if plan.ts_timestamp:
            ts = ts.cast(pa.timestamp("ms"), safe=ts.type.unit == "s")
        return ts.cast(pa.int64()).to_numpy().astype(np.int64)
    except pa.ArrowInvalid:
        return BEYOND_YEARS


def _holds_strings(kind) -> bool:
    """Whether an Arrow type holds strings: (large) strings, or a dictionary of them."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _arrow_key(table, index: int | None, message_key: bytes | None):
    if index is not None:
        column = table.column(index)
        if not _holds_strings(column.type):  # (a list or struct of strings has no `unique`)
            return "schema_mismatch", "the 'key' column must hold one string key"
        keys = column.unique().to_pylist()
        if len(keys) != 1 or keys[0].__class__ is not str:
            return "schema_mismatch", "the 'key' column must hold one string key"
        key = keys[0]
        if message_key is not None and message_key != key.encode():
            return "schema_mismatch", "'key' column differs from the message key"
        return key
    if not message_key:
        return "schema_mismatch", "no entity key (a 'key' column or the message key)"
    try:
        return message_key.decode()
    except UnicodeDecodeError:
        return "schema_mismatch", "message key is not UTF-8"


def arrow_record(ts: np.ndarray, values: np.ndarray, features) -> bytes:
    """An Arrow IPC stream of one record batch: `ts` and one float64 column per feature."""
    import pyarrow as pa

    columns = {"ts": pa.array(np.asarray(ts, np.int64))}
    for i, name in enumerate(features):
        columns[name] = pa.array(np.asarray(values[:, i], np.float64))
    batch = pa.RecordBatch.from_pydict(columns)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()

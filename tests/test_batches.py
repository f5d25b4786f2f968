"""Batched readings (columnar JSON and Arrow IPC records of many readings of one key): scored
exactly like the same readings one per record, across a restart in the middle of a record too;
malformed batches, generated with hypothesis, dead-lettered with their exact reason; and
`aewatch simulate --batch` through the real broker."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.events import event_id
from pipeline.modalities.batches import arrow_record
from pipeline.worker.state import MemoryStateStore
from tests.worker_support import (
    FEATURES,
    FakeSource,
    Record,
    checkpointed,
    dead_letters,
    flags_by_window,
    fleet,
    run_in_memory,
    train_fleet_detector,
)
from tests.worker_support import FLEET_MODEL as MODEL

NAMES = tuple(f"sensor_{i}" for i in range(FEATURES))
FORMS = ("json", "arrow")


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return train_fleet_detector(tmp_path_factory.mktemp("fleet")).detector


def batched(stream, size: int, form: str, partitions: int = 2) -> dict:
    """Batched records per partition, keys spread as `partitioned` spreads them."""
    out: dict = {("readings", p): [] for p in range(partitions)}
    names = sorted(set(stream.keys.tolist()))
    for key, value in stream.batches(size, form):
        p = names.index(key) % partitions
        records = out[("readings", p)]
        records.append(Record("readings", p, len(records), key.encode(), value))
    return out


@pytest.mark.parametrize("form", FORMS)
def test_batched_records_are_scored_like_the_same_readings(detector, form):
    stream = fleet(seed=1, readings_per_key=900)
    _, sink, stats = run_in_memory(detector, FakeSource(batched(stream, 50, form), chunk=7))
    windows, scores, flags = flags_by_window(stream, detector)
    assert stats.windows_scored == len(windows)
    expected = {
        event_id(MODEL, str(k), int(e)): s
        for k, e, s, f in zip(windows.keys, windows.end_times, scores, flags, strict=True)
        if f
    }
    events = [orjson.loads(v) for v in sink.values("events")]
    assert expected
    assert {e["id"]: e["data"]["score"] for e in events} == pytest.approx(expected, rel=1e-6)
    assert sink.values("dlq") == []


def test_a_poll_of_batched_json_records_is_parsed_once(detector, monkeypatch):
    import pipeline.modalities.readings as readings

    parsed = []

    class CountingJson:
        JSONDecodeError = orjson.JSONDecodeError

        @staticmethod
        def loads(value):
            parsed.append(value)
            return orjson.loads(value)

    monkeypatch.setattr(readings, "orjson", CountingJson)
    records = batched(fleet(seed=2, readings_per_key=200), 50, "json")
    _, sink, stats = run_in_memory(detector, FakeSource(records, chunk=100))
    n = sum(map(len, records.values()))
    assert stats.windows_scored > 0 and sink.values("dlq") == []
    assert len(parsed) <= n + len(records)  # each record once, and a first look per poll


@pytest.mark.parametrize("form", FORMS)
def test_a_restart_in_the_middle_of_a_batch_gives_the_same_event_ids(detector, form):
    stream = fleet(seed=4, readings_per_key=900)
    records = batched(stream, 7, form)  # 7 readings a record: windows end inside records
    _, clean_sink, _ = run_in_memory(detector, FakeSource(records, chunk=5))
    clean_ids = {orjson.loads(v)["id"] for v in clean_sink.values("events")}
    state = MemoryStateStore()
    source = FakeSource({p: r[: len(r) * 2 // 5] for p, r in records.items()}, chunk=5)
    first = checkpointed(detector, source, state)
    before = {orjson.loads(v)["id"] for v in first.sink.values("events")}
    committed = source.latest_commits()
    assert any(0 < c < len(records[p]) * 2 // 5 for p, c in committed.items())
    _, second_sink, _ = run_in_memory(
        detector, FakeSource(records, chunk=5, committed=committed), state
    )
    after = [orjson.loads(v)["id"] for v in second_sink.values("events")]
    assert len(after) == len(set(after)) and not before & set(after), "no event twice"
    assert before | set(after) == clean_ids
    assert second_sink.values("dlq") == []


def _json(ts, values, **extra) -> bytes:
    return orjson.dumps({"ts": ts, "values": values, **extra})


def _good_columns(n: int) -> dict:
    return {name: [0.5] * n for name in NAMES}


def _columns(n: int, name: str, column) -> dict:
    """Good columns but `name`'s (left out when `column` is None)."""
    columns = {**_good_columns(n), name: column}
    return {k: v for k, v in columns.items() if v is not None}


def bad_batches() -> st.SearchStrategy[tuple[bytes, str]]:
    """(record, the reason it must be refused with), one family per strategy."""
    n = st.integers(min_value=1, max_value=20)
    ts = n.map(lambda k: list(range(1, k + 1)))
    shuffled = st.integers(min_value=2, max_value=20).flatmap(
        lambda k: st.permutations(list(range(k))).filter(lambda p: p != sorted(p))
    )
    return st.one_of(
        shuffled.map(lambda t: (_json(t, _good_columns(len(t))), "out_of_order")),
        ts.map(
            lambda t: (
                _json(t, _columns(len(t), NAMES[1], [0.5] * (len(t) + 1))),
                "schema_mismatch",
            )
        ),
        ts.map(lambda t: (_json(t, _columns(len(t), NAMES[2], None)), "missing_feature")),
        ts.map(lambda t: (_json(t, _columns(len(t), NAMES[0], ["x"] * len(t))), "schema_mismatch")),
        ts.map(
            lambda t: (_json(t, _columns(len(t), NAMES[0], [True] * len(t))), "schema_mismatch")
        ),
        ts.map(lambda t: (_json(t, _columns(len(t), NAMES[3], [1e39] * len(t))), "non_finite")),
        ts.map(lambda t: (_json(["x"] * len(t), _good_columns(len(t))), "bad_timestamp")),
        st.just((_json([], {}), "schema_mismatch")),
        st.binary(max_size=64).map(lambda raw: (b"\xff\xff\xff\xff" + raw, "decode_error")),
        # lists of unequal shapes inside, a null column: refused, not raised out of the intake
        ts.map(lambda t: (_json([*t[:-1], [t[-1]]], _good_columns(len(t))), "bad_timestamp")),
        ts.map(
            lambda t: (
                _json(t, _columns(len(t), NAMES[1], [0.5] * (len(t) - 1) + [[0.5]])),
                "schema_mismatch",
            )
        ),
        ts.map(lambda t: (_json(t, {**_good_columns(len(t)), NAMES[2]: None}), "schema_mismatch")),
        # a single reading stamped beyond int64 ms (JSON integers reach 2**64)
        st.integers(2**63, 2**64 - 1).map(
            lambda big: (_json(big, {n: 0.5 for n in NAMES}), "bad_timestamp")
        ),
        ts.map(lambda t: (_arrow(t, drop=NAMES[1]), "missing_feature")),
        ts.map(lambda t: (_arrow_table(_with_key_column(t, [["k"]] * len(t))), "schema_mismatch")),
        ts.map(lambda t: (_arrow_table(_with_null_time(t)), "bad_timestamp")),
        ts.map(lambda t: (_arrow(t, value=np.inf), "non_finite")),
        shuffled.map(lambda t: (_arrow(t), "out_of_order")),
    )


def _with_key_column(ts, keys):
    """A good batch of times `ts` with a `key` column of `keys` (a list column: not strings)."""
    import pyarrow as pa

    columns = {"ts": pa.array(ts, pa.int64()), "key": pa.array(keys)}
    return pa.table({**columns, **{n: pa.array([0.5] * len(ts)) for n in NAMES}})


def _with_null_time(ts):
    import pyarrow as pa

    times = pa.array([*ts[:-1], None], pa.int64())
    return pa.table({"ts": times, **{n: pa.array([0.5] * len(ts)) for n in NAMES}})


def _arrow(ts, drop: str | None = None, value: float = 0.5) -> bytes:
    names = tuple(n for n in NAMES if n != drop)
    return arrow_record(np.asarray(ts), np.full((len(ts), len(names)), value), names)


@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(bad=st.lists(bad_batches(), min_size=60, max_size=60))
def test_fuzzed_batches_go_to_the_dlq_with_their_reason(detector, bad):
    stream = fleet(seed=61, keys=2, readings_per_key=300, anomalies=())
    forms = [batched(stream, 10, form, 1)[("readings", 0)] for form in FORMS]
    good = [forms[i % 2][i] for i in range(len(forms[0]))]  # both forms, alternating
    mixed, expected = [], {}
    for i, record in enumerate(good):
        mixed.append(Record("readings", 0, 0, record.key, record.value))
        for value, reason in bad[i * len(bad) // len(good) : (i + 1) * len(bad) // len(good)]:
            expected[len(mixed)] = reason
            # a key of its own: an out-of-order batch must be refused for itself, not its key
            mixed.append(Record("readings", 0, 0, f"bad-{len(mixed)}".encode(), value))
    for offset, record in enumerate(mixed):
        record.offset = offset
    _, sink, stats = run_in_memory(detector, FakeSource({("readings", 0): mixed}, chunk=13))
    dead = {}
    for topic, _key, _value, headers in sink.sent:
        if topic == "dlq":
            h = dict(headers)
            dead[int(h["aewatch.source.offset"])] = h["aewatch.dlq.reason"].decode()
    assert dead == expected
    windows, _, _ = flags_by_window(stream, detector)
    assert stats.windows_scored == len(windows)


@pytest.mark.kafka
def test_simulate_batches_through_the_broker(kafka_bootstrap, create_topic, tmp_path):
    from pipeline.cli import main
    from pipeline.tools.simulate import simulate_fleet
    from tests.kafka_support import names, run_worker, worker_settings
    from tests.worker_support import FLEET_KEYS, HISTORY

    trained = train_fleet_detector(tmp_path)
    expected = 0
    for form in FORMS:
        topics = names(f"batch-{form}")
        create_topic(topics["input"], partitions=2)
        command = ["simulate", "--bootstrap-servers", kafka_bootstrap, "--topic", topics["input"]]
        command += ["--keys", str(FLEET_KEYS), "--readings", "500", "--features", str(FEATURES)]
        command += ["--anomalies", "", "--skip", str(HISTORY), "--batch", "100", "--format", form]
        assert main(command) == 0
        _, stats = run_worker(worker_settings(kafka_bootstrap, topics, trained.artifact_dir))
        stream = simulate_fleet(
            keys=FLEET_KEYS,
            readings_per_key=500,
            features=FEATURES,
            anomalies=(),
            seed=0,
            skip=HISTORY,
        )
        expected = len(flags_by_window(stream, trained.detector)[0])
        assert stats.records_in == FLEET_KEYS * 5
        assert stats.windows_scored == expected > 0


# -- decoding a batched record: the typed first look and the full parse agree ------------------
def _number() -> st.SearchStrategy:
    return st.one_of(
        st.floats(allow_nan=False, allow_infinity=False, width=64),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.booleans(),
        st.just("0.5"),
        st.none(),
    )


@st.composite
def columnar_records(draw) -> tuple[bytes | None, bytes]:
    """Columnar JSON records, most of them well formed, each with a chance of one flaw."""
    n = draw(st.integers(min_value=0, max_value=6))
    start = draw(st.integers(min_value=-(2**40), max_value=2**40))
    ts: list = [start + i * draw(st.integers(min_value=-1, max_value=3)) for i in range(n)]
    if n and draw(st.booleans()):
        ts[draw(st.integers(0, n - 1))] = draw(
            st.one_of(_number(), st.integers(min_value=2**63 - 2, max_value=2**64))
        )
    values: dict = {}
    for name in NAMES:
        column = draw(st.lists(st.floats(-1e3, 1e3) | st.integers(-9, 9), min_size=n, max_size=n))
        flaw = draw(st.integers(0, 9))
        if flaw == 0 and n:
            column[draw(st.integers(0, n - 1))] = draw(_number())
        elif flaw == 1:
            column = column + [0.5]
        elif flaw == 2:
            continue
        elif flaw == 3:
            column = 0.5
        values[name] = column
    data: dict = {"ts": ts, "values": values, "extra": draw(st.sampled_from([1, "x", [None]]))}
    key = draw(st.sampled_from(["pump-1", "pump-2", None, 7]))
    if key is not None:
        data["key"] = key
    message = draw(st.sampled_from([b"pump-1", None, b"\xff"]))
    return message, json.dumps(data).encode()  # (integers beyond 64 bits too)


def _same(a, b) -> bool:
    if a.__class__ is not b.__class__:
        return False
    if hasattr(a, "ts"):
        return (
            a.key == b.key
            and a.ts.dtype == b.ts.dtype
            and np.array_equal(a.ts, b.ts)
            and a.values.dtype == b.values.dtype
            and np.array_equal(a.values, b.values)
        )
    return a == b


@settings(max_examples=400, deadline=None, derandomize=True)
@given(record=columnar_records())
def test_a_columnar_record_decodes_as_its_full_parse_does(record):
    from pipeline.modalities.readings import RecordDecoder

    decoder = RecordDecoder(NAMES, 16, 1 << 20)
    fast = decoder.decode(*record)
    decoder._columnar = lambda message_key, value: None  # the full parse only
    assert _same(fast, decoder.decode(*record)), record


def test_common_columnar_records_are_not_parsed_into_python_objects(detector, monkeypatch):
    import pipeline.modalities.readings as readings

    def refuse(value):
        raise AssertionError(f"parsed in full: {value[:60]!r}")

    monkeypatch.setattr(readings.orjson, "loads", refuse)
    stream = fleet(seed=2, readings_per_key=300)
    _, sink, stats = run_in_memory(detector, FakeSource(batched(stream, 50, "json"), chunk=100))
    assert stats.windows_scored == len(flags_by_window(stream, detector)[0]) > 0
    assert sink.values("dlq") == []


def _arrow_table(table) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def test_arrow_records_of_different_schemas_each_decode_by_their_own():
    import pyarrow as pa

    from pipeline.modalities.readings import RecordDecoder, Rejection

    decoder = RecordDecoder(("a", "b"), 16, 1 << 20)
    ts = pa.array([1, 2], pa.int64())
    a, b = pa.array([0.5, 0.25]), pa.array([3, 4], pa.int32())
    first = decoder.decode(b"k", _arrow_table(pa.table([ts, a, b], names=["ts", "a", "b"])))
    swapped = decoder.decode(b"k", _arrow_table(pa.table([b, a, ts], names=["b", "a", "ts"])))
    for batch in (first, swapped):
        assert batch.values.tolist() == [[0.5, 3.0], [0.25, 4.0]] and batch.ts.tolist() == [1, 2]
    text = pa.array(["x", "y"])
    assert decoder.decode(
        b"k", _arrow_table(pa.table([ts, a, text], names=["ts", "a", "b"]))
    ) == Rejection("schema_mismatch", "feature 'b' must be numbers without nulls")
    stamps = pa.array([1, 2], pa.timestamp("s"))
    later = decoder.decode(b"k", _arrow_table(pa.table([stamps, a, b], names=["ts", "a", "b"])))
    assert later.ts.tolist() == [1000, 2000]


def test_an_arrow_record_with_two_columns_of_one_name_is_refused():
    import pyarrow as pa

    from pipeline.modalities.readings import RecordDecoder, Rejection

    decoder = RecordDecoder(("a",), 16, 1 << 20)
    columns = [pa.array([1, 2]), pa.array([0.5, 0.6]), pa.array([0.1, 0.2])]
    value = _arrow_table(pa.table(columns, names=["ts", "a", "a"]))
    assert decoder.decode(b"k", value) == Rejection(
        "schema_mismatch", "more than one column is named 'a'"
    )


# -- Arrow records of a poll decoded together: the same readings as one by one ----------------
_UNITS = ("s", "ms", "us", "ns")


@st.composite
def arrow_records(draw) -> tuple[bytes | None, bytes | None]:
    """Arrow IPC records, most of them in the common form, each with a chance of one flaw: a
    column order, an integer, float or timestamp type of its own, a missing, null, text or
    non-finite value, timestamps out of order or beyond int64 milliseconds, no readings, a
    `key` column, two batches, a message key that is absent or not UTF-8, bytes cut short or
    flipped."""
    import pyarrow as pa

    n = draw(st.integers(min_value=0, max_value=5))
    start = draw(st.integers(min_value=-(2**40), max_value=2**40))
    ts = [start + i * draw(st.integers(min_value=-1, max_value=1500)) for i in range(n)]
    flaw = draw(st.integers(0, 15))
    kind = draw(st.sampled_from(("int64", "int32", "uint64", *_UNITS)))
    if flaw == 0 and n:
        ts[draw(st.integers(0, n - 1))] = draw(st.sampled_from([2**62, -(2**62), None]))
    stamps = pa.array(ts, pa.int64())
    stamps = stamps.cast(kind if "int" in kind else pa.timestamp(kind), safe="int" not in kind)
    columns = {"ts": stamps}
    for name in NAMES:
        column = draw(st.lists(st.floats(-1e3, 1e3), min_size=n, max_size=n))
        if flaw == 1 and n:
            column[draw(st.integers(0, n - 1))] = draw(st.sampled_from([np.nan, np.inf, None]))
        array = pa.array(column, draw(st.sampled_from([pa.float64(), pa.float32()])))
        if flaw == 2 and name == NAMES[1]:
            continue
        if flaw == 3 and name == NAMES[2]:
            array = pa.array([str(x) for x in column], pa.string())
        columns[name] = array
    if flaw == 4:
        columns["key"] = pa.array([draw(st.sampled_from(["pump-1", "pump-2"]))] * n)
    order = draw(st.permutations(list(columns)))
    table = pa.table({name: columns[name] for name in order})
    if flaw == 5 and n > 1:
        table = pa.concat_tables([table.slice(0, 1), table.slice(1)])
        value = _arrow_batches(table.to_batches())
    else:
        value = _arrow_table(table)
    if flaw == 6:
        value = value[: draw(st.integers(0, len(value) - 1))]
    if flaw == 7:  # bytes flipped anywhere: in the schema's names, the metadata, the body
        flipped = bytearray(value)
        for _ in range(draw(st.integers(1, 3))):
            flipped[draw(st.integers(0, len(value) - 1))] = draw(st.integers(0, 255))
        value = bytes(flipped)
    message = draw(st.sampled_from([b"pump-1", b"pump-1", b"pump-2", None, b"", b"\xff"]))
    return message, value


def _arrow_batches(batches) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batches[0].schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


@settings(max_examples=150, deadline=None, derandomize=True)
@given(records=st.lists(arrow_records(), min_size=1, max_size=12))
def test_arrow_records_decoded_together_give_each_record_its_own_readings(records):
    from pipeline.modalities.batches import ReadingBatch
    from pipeline.modalities.readings import RecordDecoder

    decoder = RecordDecoder(NAMES, 16, 1 << 20)
    keys, values = [k for k, _ in records], [v for _, v in records]
    together, rest = decoder.decode_arrow_many(keys, values, range(len(records)))
    alone = [RecordDecoder(NAMES, 16, 1 << 20).decode(k, v) for k, v in records]
    assert rest == sorted(set(rest))
    taken = [] if together is None else sorted(set(together[3].tolist()))
    assert not set(taken) & set(rest) and sorted(taken + rest) == list(range(len(records)))
    for i in taken:
        mine = np.flatnonzero(together[3] == i)
        got = ReadingBatch(together[0][mine[0]], together[1][mine], together[2][mine])
        assert {together[0][j] for j in mine} == {got.key}
        assert _same(got, alone[i]), records[i]


def test_an_arrow_record_whose_schema_names_are_not_utf8_is_refused_not_raised():
    import pyarrow as pa

    from pipeline.modalities.readings import RecordDecoder

    n = 3
    columns = [pa.array(np.arange(n) + 1_767_225_600_000)]
    columns += [pa.array(np.full(n, 0.5)) for _ in NAMES]
    good = _arrow_table(pa.table([*columns, pa.array(np.zeros(n))], names=["ts", *NAMES, "zz"]))
    bad = good.replace(b"zz", b"\xff\xfe")
    decoder = RecordDecoder(NAMES, 16, 1 << 20)
    together, rest = decoder.decode_arrow_many([b"k", b"k"], [good, bad], range(2))
    assert together[3].tolist() == [0] * n and rest == [1]
    assert decoder.decode(b"k", bad).reason == "decode_error"


def test_finer_arrow_timestamps_are_cut_to_the_millisecond_and_times_beyond_are_refused():
    import pyarrow as pa

    from pipeline.modalities.readings import RecordDecoder, Rejection

    decoder = RecordDecoder(("a",), 16, 1 << 20)
    a = pa.array([0.5, 0.25, 0.125])
    micro = pa.array([1_001_500, 1_002_999, -1_500], pa.timestamp("us"))
    value = _arrow_table(pa.table([micro, a], names=["ts", "a"]))
    assert decoder.decode(b"k", value) == Rejection(
        "out_of_order", "timestamps within the batch must increase"
    )
    micro = pa.array([-1_500, 1_001_500, 1_002_999], pa.timestamp("us"))
    got = decoder.decode(b"k", _arrow_table(pa.table([micro, a], names=["ts", "a"])))
    assert got.ts.tolist() == [-1, 1001, 1002]  # toward zero, as int() of an epoch ms float
    beyond = Rejection("bad_timestamp", "'ts' in epoch ms is outside the years 1 to 9999")
    for far in (
        pa.array([1, 2, 2**62], pa.timestamp("s")),
        pa.array([1, 2, 2**64 - 1], pa.uint64()),
    ):
        assert decoder.decode(b"k", _arrow_table(pa.table([far, a], names=["ts", "a"]))) == beyond


def test_a_poll_of_common_arrow_records_is_not_decoded_one_by_one(detector, monkeypatch):
    from pipeline.modalities.batches import ArrowBatches

    def refuse(self, message_key, value):
        raise AssertionError("decoded one by one")

    stream = fleet(seed=2, readings_per_key=300)
    monkeypatch.setattr(ArrowBatches, "__call__", refuse)
    _, sink, stats = run_in_memory(detector, FakeSource(batched(stream, 50, "arrow"), chunk=100))
    assert stats.windows_scored == len(flags_by_window(stream, detector)[0]) > 0
    assert sink.values("dlq") == []


def test_a_worker_scores_microsecond_arrow_times_and_dead_letters_unreadable_ones(detector):
    import pyarrow as pa

    values = [pa.array(np.full(40, 0.5)) for _ in NAMES]
    micro = pa.array(np.arange(40, dtype=np.int64) * 1_000_500 + 10**15, pa.timestamp("us"))
    far = pa.array(np.arange(40, dtype=np.int64) + 2**62, pa.timestamp("s"))
    records = [
        Record("readings", 0, offset, key, _arrow_table(pa.table([ts, *values], ["ts", *NAMES])))
        for offset, (key, ts) in enumerate([(b"pump-1", micro), (b"pump-2", far)])
    ]
    _, sink, stats = run_in_memory(detector, FakeSource({("readings", 0): records}))
    assert stats.windows_scored == (40 - 16) // 4 + 1  # window 16, stride 4
    dead = [dict(h) for topic, _, _, h in sink.sent if topic == "dlq"]
    assert [(d["aewatch.source.offset"], d["aewatch.dlq.reason"]) for d in dead] == [
        (b"1", b"bad_timestamp")
    ]
    # a schema that names a column in bytes that are not UTF-8, among good records
    unnamed = records[0].value.replace(NAMES[0].encode(), b"\xff" * len(NAMES[0]))
    records[1] = Record("readings", 0, 1, b"pump-2", unnamed)
    _, sink, stats = run_in_memory(detector, FakeSource({("readings", 0): records}))
    assert stats.windows_scored == (40 - 16) // 4 + 1
    assert list(dead_letters(sink).values()) == ["decode_error"]


def test_a_poll_of_arrow_records_of_alternating_schemas_is_windowed_in_record_order(detector):
    """Arrow records of one key whose schemas alternate (float64 and float32 columns: a producer
    that changed its schema, or types inferred from each batch's values) were read together per
    schema and windowed schema by schema: a record of the first schema after one of the second
    was refused as out_of_order, its readings lost."""
    import pyarrow as pa

    stream = fleet(seed=5, keys=1, readings_per_key=240, anomalies=())
    key = stream.keys[0]
    records = []
    for i, start in enumerate(range(0, len(stream.keys), 20)):
        part = slice(start, start + 20)
        kind = pa.float64() if i % 2 == 0 else pa.float32()
        columns = [pa.array(stream.ts_ms[part], pa.int64())]
        columns += [pa.array(stream.values[part, j], kind) for j in range(len(NAMES))]
        value = _arrow_table(pa.table(columns, names=["ts", *NAMES]))
        records.append(Record("readings", 0, i, key.encode(), value))
    expected = len(flags_by_window(stream, detector)[0])
    for chunk in (len(records), 1):
        _, sink, stats = run_in_memory(detector, FakeSource({("readings", 0): records}, chunk))
        assert dead_letters(sink) == {}
        assert stats.windows_scored == expected == (240 - 16) // 4 + 1


@pytest.mark.parametrize(
    ("ts", "column", "reason"),
    [
        ([True, 1_767_225_600_000], [0.5, 0.6], ("bad_timestamp", "a boolean is not a timestamp")),
        (
            [1_767_225_600_000, 1_767_225_600_001],
            [True, 0.6],
            ("schema_mismatch", "a feature value is bool"),
        ),
    ],
)
def test_a_boolean_among_numbers_in_a_columnar_batch_is_refused_as_in_a_reading(ts, column, reason):
    """numpy takes [true, 1767225600000] as integers and [true, 0.6] as floats: the batch was
    taken with a reading at 1970's first millisecond or a value of 1.0, where the same reading
    in a record of its own is refused."""
    from pipeline.modalities.readings import RecordDecoder, Rejection

    decoder = RecordDecoder(NAMES, 16, 1 << 20)
    values = {name: column if j == 0 else [0.5, 0.5] for j, name in enumerate(NAMES)}
    batch = orjson.dumps({"key": "k", "ts": ts, "values": values})
    first = {name: column[0] if j == 0 else 0.5 for j, name in enumerate(NAMES)}
    alone = orjson.dumps({"key": "k", "ts": ts[0], "values": first})
    assert decoder.decode(b"k", batch) == Rejection(*reason) == decoder.decode(b"k", alone)


def test_integers_beyond_int64_are_numbers_in_a_batch_whatever_form_its_times_take():
    """A column of integers from 2**63 (numpy reads them as uint64) was refused as "not numbers"
    beside ISO times and taken beside epoch-ms times; they are numbers either way, as in a
    single reading."""
    from pipeline.modalities.batches import ReadingBatch
    from pipeline.modalities.readings import RecordDecoder

    decoder = RecordDecoder(NAMES, 4, 1 << 20)
    big = {name: [2**63, 2**64 - 1] for name in NAMES}
    epoch = decoder.decode(b"k", _json([1767225600000, 1767225600001], big))
    iso = decoder.decode(b"k", _json(["2026-01-01T00:00:00Z", "2026-01-01T00:00:00.001Z"], big))
    assert epoch.__class__ is iso.__class__ is ReadingBatch, (epoch, iso)
    assert np.array_equal(epoch.ts, iso.ts) and np.array_equal(epoch.values, iso.values)
    assert epoch.values[0, 0] == float(2**63)


def test_a_record_whose_decoding_raises_is_dead_lettered_and_the_rest_scored(detector, monkeypatch):
    """Whatever a decoder raises on one record, that record goes to the DLQ with the error and
    the poll's other records are windowed and scored (it stopped the worker, and a restart read
    the same record again)."""
    from pipeline.modalities.readings import RecordDecoder

    stream = fleet(seed=7, keys=2, readings_per_key=300, anomalies=())
    records = batched(stream, 10, "json", 1)[("readings", 0)]
    poison = records[5].value
    decode = RecordDecoder.decode

    def failing(self, key, value):
        if value == poison:
            raise RuntimeError("no rule foresaw this record")
        return decode(self, key, value)

    monkeypatch.setattr(RecordDecoder, "decode", failing)
    _, sink, stats = run_in_memory(detector, FakeSource({("readings", 0): records}, chunk=500))
    dead = dead_letters(sink)
    assert list(dead) == [(0, 5)], dead
    assert dead[(0, 5)] == "decode_error"
    assert stats.windows_scored > 0

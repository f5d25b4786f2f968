"""Malformed input, generated with hypothesis, interleaved with a good stream: every bad record
lands in the dead-letter topic with a reason, every good reading is still windowed and scored, and
the worker never stops."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.modalities.images import encode_image_record
from pipeline.modalities.readings import REASONS
from pipeline.worker.loop import Worker
from pipeline.worker.state import MemoryStateStore
from tests.worker_support import (
    FEATURES,
    FakeSink,
    FakeSource,
    Record,
    flags_by_window,
    fleet,
    partitioned,
    run_in_memory,
    train_fleet_detector,
)
from tests.worker_support import FLEET_MODEL as MODEL
from tests.worker_support import (
    settings as worker_settings,
)

NAMES = tuple(f"sensor_{i}" for i in range(FEATURES))
MAX_BYTES = 4096
KEY = "machine-000"
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


def _values(**changes) -> dict:
    return {**{name: 0.5 for name in NAMES}, **changes}


def bad_records() -> st.SearchStrategy[bytes]:
    """Records a worker must refuse, one family per strategy."""
    not_utf8 = st.binary(min_size=1, max_size=64).filter(_not_utf8)
    not_json = st.text(min_size=1, max_size=64).filter(_not_json).map(str.encode)
    not_object = st.one_of(
        st.lists(finite, max_size=5), st.integers(), st.text(max_size=10), st.none()
    ).map(_json)
    wrong_value_type = st.sampled_from(NAMES).flatmap(
        lambda name: st.one_of(st.text(max_size=5), st.none(), st.lists(finite, max_size=2)).map(
            lambda bad, name=name: orjson.dumps({"ts": 1, "values": _values(**{name: bad})})
        )
    )
    huge = st.sampled_from(NAMES).flatmap(
        lambda name: st.floats(min_value=1e39, max_value=1e300).map(
            lambda v, name=name: orjson.dumps({"ts": 1, "values": _values(**{name: v})})
        )
    )
    non_finite_literal = st.sampled_from([b"NaN", b"Infinity", b"-Infinity"]).map(
        lambda token: b'{"ts": 1, "values": {"sensor_0": ' + token + b"}}"
    )
    missing = st.sampled_from(NAMES).map(
        lambda name: orjson.dumps(
            {"ts": 1, "values": {k: v for k, v in _values().items() if k != name}}
        )
    )
    bad_ts = st.one_of(st.text(max_size=8).filter(_not_a_time), st.lists(st.integers())).map(
        lambda ts: _json({"ts": ts, "values": _values()})
    )
    no_ts = st.just(orjson.dumps({"values": _values()}))
    wrong_shape = (
        st.integers(min_value=1, max_value=40)
        .filter(lambda n: n != 16)
        .map(
            lambda rows: orjson.dumps(
                {"ts_start": 0, "ts_end": 1, "values": [[0.5] * FEATURES for _ in range(rows)]}
            )
        )
    )
    ragged = st.just(orjson.dumps({"ts_start": 0, "ts_end": 1, "values": [[0.5], [0.5, 0.5]]}))
    oversize = st.integers(min_value=MAX_BYTES + 1, max_value=3 * MAX_BYTES).map(
        lambda n: orjson.dumps({"ts": 1, "values": _values(), "pad": "x" * n})
    )
    image = st.just(encode_image_record(np.zeros((1, 8, 8), np.float32)))
    return st.one_of(
        not_utf8,
        not_json,
        not_object,
        wrong_value_type,
        huge,
        non_finite_literal,
        missing,
        bad_ts,
        no_ts,
        wrong_shape,
        ragged,
        oversize,
        image,
    )


def _json(obj) -> bytes:
    return json.dumps(obj).encode()  # integers of any size


def _not_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _not_json(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return True
    return False


def _not_a_time(text: str) -> bool:
    from pipeline.modalities.readings import parse_timestamp_ms

    try:
        parse_timestamp_ms(text)
    except (ValueError, TypeError, OverflowError):
        return True
    return False


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return train_fleet_detector(tmp_path_factory.mktemp("fleet")).detector


@pytest.fixture(scope="module")
def good():
    stream = fleet(seed=61, keys=2, readings_per_key=300, anomalies=())
    return stream, partitioned(stream, "readings", 1)[("readings", 0)]


@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(bad=st.lists(bad_records(), min_size=500, max_size=500))
def test_fuzzed_records_go_to_the_dlq_and_the_good_stream_is_scored(detector, good, bad):
    stream, records = good
    mixed, bad_offsets = [], set()
    for i, record in enumerate(records):
        mixed.append(Record("readings", 0, 0, record.key, record.value))
        for value in bad[i * len(bad) // len(records) : (i + 1) * len(bad) // len(records)]:
            bad_offsets.add(len(mixed))
            mixed.append(Record("readings", 0, 0, KEY.encode(), value))
    for offset, record in enumerate(mixed):
        record.offset = offset
    source = FakeSource({("readings", 0): mixed}, chunk=257)
    worker = Worker(
        worker_settings(max_record_bytes=MAX_BYTES),
        detector,
        MODEL,
        FakeSink(),
        MemoryStateStore(),
    )
    worker.attach(source)
    worker.on_assigned({("readings", 0)})
    stats = worker.run()  # returns only when the input is exhausted: it never stopped early

    dead = {}
    for topic, _key, _value, headers in worker.sink.sent:
        if topic == "dlq":
            h = dict(headers)
            dead[int(h["aewatch.source.offset"])] = h["aewatch.dlq.reason"].decode()
    assert set(dead) == bad_offsets, "every bad record, and only those, in the DLQ"
    assert set(dead.values()) <= set(REASONS)
    windows, _, _ = flags_by_window(stream, detector)
    assert stats.windows_scored == len(windows), "every good reading still windowed and scored"
    assert stats.records_in == len(mixed)


@pytest.mark.kafka
@settings(
    max_examples=1,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
@given(bad=st.lists(bad_records(), min_size=500, max_size=500))
def test_fuzzed_records_through_the_real_broker(kafka_bootstrap, create_topic, good, tmp_path, bad):
    from tests.kafka_support import consume, names, produce, run_worker, worker_settings
    from tests.worker_support import train_fleet_detector as train

    stream, records = good
    topics = names("fuzz")
    create_topic(topics["input"], partitions=1)
    items, bad_offsets = [], set()
    for i, record in enumerate(records):
        items.append((record.key, record.value))
        for value in bad[i * len(bad) // len(records) : (i + 1) * len(bad) // len(records)]:
            bad_offsets.add(len(items))
            items.append((KEY.encode(), value))
    produce(kafka_bootstrap, topics["input"], items)
    trained = train(tmp_path)
    _, stats = run_worker(
        worker_settings(kafka_bootstrap, topics, trained.artifact_dir, max_record_bytes=MAX_BYTES)
    )
    dead = consume(kafka_bootstrap, topics["dlq"])
    offsets = {int(dict(r.headers)["aewatch.source.offset"]) for r in dead}
    assert offsets == bad_offsets and len(dead) == len(bad)
    for record in dead:  # the original value is kept as it was
        assert record.value == items[int(dict(record.headers)["aewatch.source.offset"])][1]
    windows, _, _ = flags_by_window(stream, trained.detector)
    assert stats.windows_scored == len(windows)


def _with(records: list, extra: dict) -> list:
    """`records` (of one partition) with `extra` {position: (key, value)} put in, renumbered."""
    out = list(records)
    for at in sorted(extra, reverse=True):
        out.insert(at, Record("readings", 0, 0, *extra[at]))
    return [Record("readings", 0, offset, r.key, r.value) for offset, r in enumerate(out)]


def _dead_headers(sink) -> list[dict]:
    return [dict(h) for topic, _, _, h in sink.sent if topic == "dlq"]


def _stream_of_one_key():
    stream = fleet(seed=11, keys=1, readings_per_key=400, anomalies=())
    return stream, partitioned(stream, "readings", 1)[("readings", 0)]


def test_a_deeply_nested_record_is_dead_lettered_not_raised(detector):
    """An ignored field nested 1,500 deep (3 KB) made the typed decoder raise RecursionError out
    of the loop: the member ended, and its restart read the same record again."""
    stream, records = _stream_of_one_key()
    deep = b"[" * 1500 + b"]" * 1500
    single = b'{"key":"%s","ts":1,"values":%s,"x":%s}' % (
        KEY.encode(),
        orjson.dumps(_values()),
        deep,
    )
    columnar = b'{"key":"%s","ts":[1],"values":%s,"x":%s}' % (
        KEY.encode(),
        orjson.dumps({name: [0.5] for name in NAMES}),
        deep,
    )
    polled = _with(records, {100: (KEY.encode(), single), 200: (KEY.encode(), columnar)})
    for chunk in (len(polled), 1):
        _, sink, stats = run_in_memory(detector, FakeSource({("readings", 0): polled}, chunk))
        dead = _dead_headers(sink)
        assert [(d["aewatch.source.offset"], d["aewatch.dlq.reason"]) for d in dead] == [
            (b"100", b"decode_error"),
            (b"201", b"decode_error"),
        ]
        assert stats.windows_scored == len(flags_by_window(stream, detector)[0])


def test_a_record_is_taken_or_refused_whatever_else_its_poll_holds(detector):
    """What a reading carries besides its key, time and features is not looked at: a reading
    with a field that is not UTF-8 or a number beyond float64 there was taken in a poll decoded
    together and refused as decode_error in a poll that went one by one (one record without a
    message key, or a tombstone, sends a poll that way)."""
    _, records = _stream_of_one_key()
    end = len(records)
    last = int(orjson.loads(records[-1].value)["ts"])
    odd = [
        b'{"key":"%s","ts":%d,"values":%s,%s}'
        % (KEY.encode(), last + 1000 * (i + 1), orjson.dumps(_values()), field)
        for i, field in enumerate((b'"note":"caf\xe9"', b'"x":1e999'))
    ]
    answers = []
    for neighbour in (None, (b"other", None), (None, b"{}")):
        extra = {end: (KEY.encode(), odd[0]), end + 1: (KEY.encode(), odd[1])}
        if neighbour is not None:
            extra[10] = neighbour
        source = FakeSource({("readings", 0): _with(records, extra)}, chunk=10_000)
        _, sink, stats = run_in_memory(detector, source)
        dead = _dead_headers(sink)
        answers.append(
            (stats.records_in, stats.windows_scored, [d["aewatch.source.offset"] for d in dead])
        )
    n, windows = end + 2, answers[0][1]
    assert answers == [(n, windows, []), (n + 1, windows, [b"10"]), (n + 1, windows, [b"10"])]


def test_iso_times_are_read_to_the_exact_millisecond():
    """`int(datetime.timestamp() * 1000)` went through float seconds: about 1 in 160 times of
    1970-2005 and after 2038 came out a millisecond early (1987-02-01T19:42:15.333Z as ...332),
    and their windows' event ids differed from `aewatch score`'s."""
    from pipeline.events import iso_ms
    from pipeline.modalities.readings import parse_timestamp_ms

    rng = np.random.default_rng(0)
    stamps = rng.integers(-2_208_988_800_000, 4_102_444_800_000, size=20_000)  # 1900 to 2100
    assert [parse_timestamp_ms(iso_ms(t)) for t in stamps.tolist()] == stamps.tolist()
    assert parse_timestamp_ms("1987-02-01T19:42:15.333Z") == 539_206_935_333
    assert parse_timestamp_ms("1987-02-01T21:42:15.333+02:00") == 539_206_935_333
    assert parse_timestamp_ms("2026-01-01T00:00:00.0009Z") == 1_767_225_600_000  # cut, not rounded

"""The worker loop in memory: fake source and sink, the real detector and windowing."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from jsonschema import Draft202012Validator

from pipeline.events import event_id, event_schema, iso_ms
from pipeline.modalities.windowing import ReadyWindows
from pipeline.worker.loop import Worker
from pipeline.worker.scorer import SMALL_BATCH
from pipeline.worker.state import KafkaStateStore, MemoryStateStore, decode_state
from tests.worker_support import FLEET_MODEL as MODEL
from tests.worker_support import (
    FakeSink,
    FakeSource,
    Record,
    checkpointed,
    dead_letters,
    flags_by_window,
    fleet,
    in_memory_worker,
    partitioned,
    run_in_memory,
    settings,
    train_fleet_detector,
)


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return train_fleet_detector(tmp_path_factory.mktemp("fleet")).detector


class Watched:
    """The detector, with `before(windows)` called on the scoring thread before each pass."""

    def __init__(self, inner, before) -> None:
        self.inner, self.before = inner, before

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score(self, windows, **kwargs):
        self.before(windows)
        return self.inner.score(windows, **kwargs)


def test_every_window_is_scored_and_events_match_batch_scoring(detector):
    stream = fleet(seed=1)
    source = FakeSource(partitioned(stream, "readings", 2), chunk=333)
    _, sink, stats = run_in_memory(detector, source)
    windows, scores, flags = flags_by_window(stream, detector)
    assert stats.windows_scored == len(windows)
    events = [orjson.loads(v) for v in sink.values("events")]
    expected = {
        event_id(MODEL, str(k), int(e)): s
        for k, e, s, f in zip(windows.keys, windows.end_times, scores, flags, strict=True)
        if f
    }
    assert {e["id"]: e["data"]["score"] for e in events} == pytest.approx(expected, rel=1e-6)
    validator = Draft202012Validator(event_schema())
    for event in events:
        validator.validate(event)
    assert sink.values("dlq") == []


def test_malformed_records_go_to_the_dlq_with_their_reason(detector):
    stream = fleet(seed=2, readings_per_key=600, anomalies=())
    records = partitioned(stream, "readings", 1)[("readings", 0)]
    good = len(records)
    names = detector.input.features
    values = {n: 1.0 for n in names}

    def window(ts_start=0, ts_end=1, row=None) -> bytes:
        rows = [row or [1.0] * len(names)] * detector.input.window.length
        return orjson.dumps(
            {"key": "machine-000", "ts_start": ts_start, "ts_end": ts_end, "values": rows}
        )

    bad = [
        (b"not json", "decode_error"),
        (b"\xff\xfe", "decode_error"),
        (b"[1, 2]", "schema_mismatch"),
        (
            orjson.dumps({"key": "machine-000", "ts": 1, "values": {names[0]: 1.0}}),
            "missing_feature",
        ),
        (b'{"key": "machine-000", "ts": 1, "values": {"sensor_0": NaN}}', "decode_error"),
        (
            orjson.dumps({"key": "machine-000", "ts": 1, "values": {**values, names[1]: 1e39}}),
            "non_finite",
        ),
        (orjson.dumps({"key": "machine-000", "values": values}), "bad_timestamp"),
        (
            orjson.dumps({"key": "machine-000", "ts": "yesterday", "values": values}),
            "bad_timestamp",
        ),
        (orjson.dumps({"key": "machine-000", "ts": 5, "values": values}), "out_of_order"),
        (
            orjson.dumps({"key": "machine-000", "ts_start": 0, "values": [[1.0] * 3]}),
            "bad_timestamp",
        ),
        (
            orjson.dumps({"key": "machine-000", "ts_start": 0, "ts_end": 1, "values": [[1.0] * 3]}),
            "window_shape",
        ),
        (window(ts_start=9, ts_end=1), "bad_timestamp"),  # a window that ends before it starts
        (window(row=[True] * len(names)), "window_shape"),  # booleans are not numbers
        (window(row=["0.5"] * len(names)), "window_shape"),  # nor are numeric strings
        (b"x" * 2_000_000, "oversize"),
    ]
    mixed, expected = [], {}
    for i, record in enumerate(records):
        mixed.append(record)
        if i % 40 == 20 and bad:
            payload, reason = bad.pop(0)
            expected[len(mixed)] = reason
            mixed.append(Record("readings", 0, 0, b"machine-000", payload))
    for offset, record in enumerate(mixed):
        record.offset = offset
    source = FakeSource({("readings", 0): mixed}, chunk=97)
    _, sink, stats = run_in_memory(detector, source)
    dead = {}
    for topic, _key, _value, headers in sink.sent:
        if topic == "dlq":
            h = dict(headers)
            dead[int(h["aewatch.source.offset"])] = h["aewatch.dlq.reason"].decode()
    assert dead == expected
    windows, _, _ = flags_by_window(stream, detector)
    assert stats.windows_scored == len(windows), "every good reading still windowed"
    assert stats.records_in == good + len(expected)


class OnePartitionAPoll(FakeSource):
    """Serves the same records one partition at a time."""

    def poll(self, timeout_ms: int) -> dict:
        polled = super().poll(timeout_ms)
        for later in list(polled)[1:]:
            self.position[later] -= len(polled.pop(later))
        return polled


def test_a_poll_of_many_partitions_is_decoded_once_and_taken_as_partition_by_partition(
    detector, monkeypatch
):
    from pipeline.modalities.readings import RecordDecoder

    stream = fleet(seed=5, readings_per_key=400)
    records = partitioned(stream, "readings", 4)
    values = {n: 1.0 for n in detector.input.features}
    bad = {  # readings of the common shape that are refused after decoding
        ("readings", 1): orjson.dumps({"key": "machine-001", "ts": 5, "values": values}),
        ("readings", 2): orjson.dumps(
            {"key": "machine-002", "ts": 1_700_000_000, "values": values}  # epoch seconds
        ),
        ("readings", 3): orjson.dumps(
            {"key": "machine-003", "ts": 10**13, "values": {**values, "sensor_1": 1e39}}
        ),
    }
    for partition, value in bad.items():
        key = orjson.loads(value)["key"].encode()
        assert records[partition][0].key == key, "the bad reading's key lives in its partition"
        records[partition].insert(50, Record(*partition, 0, key, value))
        for offset, record in enumerate(records[partition]):
            record.offset = offset
    calls = []
    decode_many = RecordDecoder.decode_many

    def counted(self, keys, values):
        calls.append(len(keys))
        return decode_many(self, keys, values)

    monkeypatch.setattr(RecordDecoder, "decode_many", counted)
    _, together, stats = run_in_memory(detector, FakeSource(records, chunk=10_000))
    assert len(calls) == 1 and calls[0] == sum(map(len, records.values())), "one pass a poll"
    _, apart, apart_stats = run_in_memory(detector, OnePartitionAPoll(records, chunk=10_000))
    assert len(calls) == 1 + len(records)

    assert (
        dead_letters(together)
        == dead_letters(apart)
        == {
            (1, 50): "out_of_order",
            (2, 50): "bad_timestamp",
            (3, 50): "non_finite",
        }
    )
    assert sorted(together.values("events")) == sorted(apart.values("events")) != []
    assert stats.windows_scored == apart_stats.windows_scored > 0


class OrderedSink(FakeSink):
    """Keeps the order of sends (their topic) and flushes (None)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[str | None] = []

    def send(self, topic, key=None, value=None, headers=None, partition=None) -> None:
        super().send(topic, key, value, headers, partition)
        self.log.append(topic)

    def flush(self) -> None:
        super().flush()
        self.log.append(None)


def test_a_state_record_goes_out_only_once_the_events_before_it_are_acknowledged(detector):
    stream = fleet(seed=6, readings_per_key=400)
    records = partitioned(stream, "readings", 2)
    sink = OrderedSink()
    worker = Worker(
        settings(emit_all=True),
        detector,
        MODEL,
        sink,
        KafkaStateStore(sink, lambda topic, keys: {}, "state"),
    )
    worker.attach(FakeSource(records, chunk=50))
    worker.on_assigned(set(records))
    worker.run()
    assert "state" in sink.log and "events" in sink.log
    unacknowledged = []
    for topic in sink.log:
        if topic is None:
            unacknowledged.clear()
        elif topic == "state":
            assert unacknowledged == [], "a restart would skip windows whose events were lost"
        else:
            unacknowledged.append(topic)


def test_commits_never_go_back_and_keep_what_open_windows_need(detector):
    stream = fleet(seed=3, readings_per_key=400, anomalies=())
    source = FakeSource(partitioned(stream, "readings", 1), chunk=37)
    worker, _, _ = run_in_memory(detector, source, commit_interval_ms=1)
    committed = [c[("readings", 0)] for c in source.commits if ("readings", 0) in c]
    assert committed == sorted(committed) and len(set(committed)) == len(committed)
    last = committed[-1]
    total = len(source.records[("readings", 0)])
    spec = detector.input.window
    assert total - last <= 4 * (spec.length - 1), "only readings of open windows are re-read"
    assert last == worker.intake.windows.oldest_needed(("readings", 0))


def test_restart_from_commit_and_state_gives_the_same_event_ids(detector):
    stream = fleet(seed=4)
    records = partitioned(stream, "readings", 2)
    _, clean_sink, _ = run_in_memory(detector, FakeSource(records, chunk=250))
    clean_ids = {orjson.loads(v)["id"] for v in clean_sink.values("events")}
    assert clean_ids

    state = MemoryStateStore()
    # First life: process part of the stream, checkpoint, then "crash" before the rest.
    source = FakeSource({p: r[: len(r) * 2 // 5] for p, r in records.items()}, chunk=250)
    first = checkpointed(detector, source, state)
    sent_before = {orjson.loads(v)["id"] for v in first.sink.values("events")}
    # work done after the last checkpoint is lost with the process
    first.process(
        FakeSource({p: r[len(r) * 2 // 5 : len(r) // 2] for p, r in records.items()}).poll(0)
    )

    second_source = FakeSource(records, chunk=250, committed=source.latest_commits())
    _, second_sink, _ = run_in_memory(detector, second_source, state=state)
    after = {orjson.loads(v)["id"] for v in second_sink.values("events")}
    assert sent_before | after == clean_ids


def test_pre_cut_windows_are_scored_like_the_same_readings(detector):
    import numpy as np

    spec = detector.input.window
    window = np.random.default_rng(0).normal(size=(spec.length, len(detector.input.features)))
    window[:, 1] += 25.0  # far outside anything normal: an event is certain
    record = {
        "key": "machine-009",
        "ts_start": 1000,
        "ts_end": 1000 + spec.length - 1,
        "values": window.tolist(),
    }
    source = FakeSource(
        {("readings", 0): [Record("readings", 0, 0, b"machine-009", orjson.dumps(record))]}
    )
    _, sink, stats = run_in_memory(detector, source)
    assert stats.windows_scored == 1
    (event,) = [orjson.loads(v) for v in sink.values("events")]
    expected = detector.score(window[None].astype(np.float32)).scores[0]
    assert event["data"]["score"] == pytest.approx(expected, rel=1e-6)
    assert event["id"] == event_id(MODEL, "machine-009", 1000 + spec.length - 1)


def test_windows_are_scored_before_another_turn_would_take_them_past_max_wait(detector):
    """A turn of the loop (poll and decode) takes 8 ms of a fake clock here; with a 10 ms wait,
    windows that became ready must not sit through a second turn (16 ms) before they are scored."""
    stream = fleet(seed=3, readings_per_key=1500, anomalies=())
    clock = [0.0]

    class SlowTurns(FakeSource):
        def poll(self, timeout_ms):
            clock[0] += 0.008
            return super().poll(timeout_ms)

    inner = SlowTurns(partitioned(stream, "readings", 2), chunk=40)

    worker = Worker(
        settings(max_wait_ms=10, commit_interval_ms=10**6, stop_after_idle_s=0.05),
        detector,
        MODEL,
        FakeSink(),
        MemoryStateStore(),
        clock=lambda: clock[0],
    )
    waited = []
    score = worker.score_pending

    def timed_score(**kwargs):
        if worker.pending_since is not None:
            waited.append(clock[0] - worker.pending_since)
        score(**kwargs)

    worker.score_pending = timed_score
    worker.attach(inner)
    worker.on_assigned(set(inner.records))
    stats = worker.run()
    assert stats.windows_scored == len(flags_by_window(stream, detector)[0])
    settled = waited[10:]  # once the loop has measured its turns
    assert len(settled) > 20
    assert max(settled) <= 0.010 + 1e-9, f"windows waited {max(settled) * 1000:.1f} ms"


def test_the_next_poll_is_taken_while_a_batch_is_scored(detector):
    """The loop does not wait for a large forward pass (a member catching up): it polls and takes
    the next records while the scoring thread works, and the events still match batch scoring,
    in order."""
    import threading

    stream = fleet(seed=1)
    polled_meanwhile = threading.Event()
    passes: list[int] = []
    overlapped: list[bool] = []

    def first_pass_waits(windows) -> None:
        """The first pass lasts until the loop has polled with it in flight (at most 5 s)."""
        passes.append(len(windows))
        if len(passes) == 1:
            overlapped.append(polled_meanwhile.wait(5.0))

    class Watching(FakeSource):
        def poll(self, timeout_ms):
            # a poll the loop takes once it has handed a batch over, whenever the scoring
            # thread gets to start its pass
            if worker.scorer.busy:
                polled_meanwhile.set()
            return super().poll(timeout_ms)

    source = Watching(partitioned(stream, "readings", 2), chunk=2500)
    # (no checkpoint of the interval in the turn that hands the first batch over: it would
    # wait for the pass, which waits for the next poll)
    worker, sink = in_memory_worker(
        Watched(detector, first_pass_waits), source, commit_interval_ms=10**6
    )
    stats = worker.run()
    assert passes[0] >= SMALL_BATCH
    assert overlapped == [True]
    windows, scores, flags = flags_by_window(stream, detector)
    assert stats.windows_scored == len(windows)
    events = [orjson.loads(v) for v in sink.values("events")]
    expected = [
        event_id(MODEL, str(k), int(e))
        for k, e, f in zip(windows.keys, windows.end_times, flags, strict=True)
        if f
    ]
    assert sorted(e["id"] for e in events) == sorted(expected)
    by_key: dict = {}
    for event in events:  # each key's events in time order
        by_key.setdefault(event["subject"], []).append(event["data"]["window"]["end"])
    assert all(ends == sorted(ends) for ends in by_key.values())


@pytest.mark.parametrize(("switch_interval_ms", "during"), [(0.5, 0.0005), (0, 0.004)])
def test_the_loop_runs_with_its_switch_interval_and_gives_the_interpreters_back(
    detector, switch_interval_ms, during
):
    """The scoring thread and the client's threads get Python back from the busy loop within
    `switch_interval_ms` (0 leaves the interpreter's own); the interpreter's is restored after."""
    import sys

    seen: dict[str, set] = {"poll": set(), "score": set()}

    class Watching(FakeSource):
        def poll(self, timeout_ms):
            seen["poll"].add(sys.getswitchinterval())
            return super().poll(timeout_ms)

    before = sys.getswitchinterval()
    sys.setswitchinterval(0.004)
    try:
        source = Watching(partitioned(fleet(seed=1), "readings", 2), chunk=2500)
        _, _, stats = run_in_memory(
            Watched(detector, lambda _: seen["score"].add(sys.getswitchinterval())),
            source,
            switch_interval_ms=switch_interval_ms,
        )
        after = sys.getswitchinterval()
    finally:
        sys.setswitchinterval(before)
    assert stats.windows_scored > 0
    assert {name: sorted(values) for name, values in seen.items()} == {
        "poll": [pytest.approx(during)],
        "score": [pytest.approx(during)],
    }
    assert after == pytest.approx(0.004)


def test_a_small_batch_runs_on_one_thread_and_a_large_one_on_the_members_threads():
    import torch

    from pipeline.worker.scorer import BatchScorer

    class ThreadCounting:
        def __init__(self) -> None:
            self.threads: list[int] = []

        def score(self, windows, *, batch_size, scaling=None, extremes=0):
            self.threads.append(torch.get_num_threads())
            return windows.sum(axis=(1, 2))

    before = torch.get_num_threads()
    try:
        detector = ThreadCounting()
        scorer = BatchScorer(8192, 60.0, keepalive=lambda: None, threads=2)
        for n in (SMALL_BATCH - 1, SMALL_BATCH, 3):
            list(scorer.score(_pending(n), detector))
        assert list(scorer.score(_pending(SMALL_BATCH), detector, wait=False)) == []  # beside
        assert len(list(scorer.score(_pending(3), detector, wait=False))) == 2  # a small one waits
        scorer.close()
        assert detector.threads == [1, 2, 1, 1, 1]
    finally:
        torch.set_num_threads(before)


def test_a_pass_in_flight_is_finished_with_keepalives_before_the_next_starts():
    """A slow pass left in flight: the next batch first waits for it, keeping the membership
    alive meanwhile (a slow device must not get the member evicted), and starts only then."""
    import time

    from pipeline.worker.scorer import BatchScorer

    class Slow:
        def __init__(self) -> None:
            self.passes: list[int] = []

        def score(self, windows, *, batch_size, scaling=None, extremes=0):
            time.sleep(0.5)
            self.passes.append(len(windows))
            return windows.sum(axis=(1, 2))

    keepalives: list[list[int]] = []
    detector = Slow()
    scorer = BatchScorer(8192, 0.05, keepalive=lambda: keepalives.append(list(detector.passes)))
    assert list(scorer.score(_pending(SMALL_BATCH), detector, wait=False)) == []
    first = list(scorer.score(_pending(SMALL_BATCH + 1), detector, wait=False))
    scorer.close()
    assert [len(batch) for batch in first] == [SMALL_BATCH]
    assert keepalives and all(done == [] for done in keepalives)  # while the first pass ran


def _pending(n: int) -> ReadyWindows:
    """`n` ready windows of one key, [4, 2] each."""
    ready = ReadyWindows()
    for i in range(n):
        ready.add(np.zeros((4, 2), np.float32), "k", i, i + 1, ("t", 0), i)
    return ready


def test_times_beyond_the_year_9999_are_refused_and_the_worker_keeps_serving(detector):
    """An event cannot carry a time past the year 9999 (nor can Python's datetime): a reading,
    batch or pre-cut window with one is dead-lettered as bad_timestamp, whichever decoding path
    it takes, instead of reaching the event writer and ending the worker."""
    names = detector.input.features
    length = detector.input.window.length
    far = 10**15  # epoch ms in the year 33658
    values = {n: 1.0 for n in names}
    wrong = [
        {"key": "far", "ts": far, "values": values},  # decoded with the whole poll
        {"key": "far", "ts": float(far), "values": values},  # decoded record by record
        {"key": "far", "ts": [far, far + 1], "values": {n: [1.0, 2.0] for n in names}},
        {"key": "far", "ts_start": far, "ts_end": far + 1, "values": [[1.0] * len(names)] * length},
    ]
    records = []
    for i in range(length * 4):
        value = {"key": "near", "ts": 1_767_225_600_000 + 1000 * i, "values": values}
        records.append(Record("readings", 0, len(records), b"near", orjson.dumps(value)))
        if i % length == 1 and wrong:  # each in a poll of its own
            records.append(Record("readings", 0, len(records), b"far", orjson.dumps(wrong.pop())))
    stride = detector.input.window.stride
    for chunk in (len(records), length):  # one poll (the typed path first), many polls
        source = FakeSource({("readings", 0): records}, chunk=chunk)
        _, sink, stats = run_in_memory(detector, source, emit_all=True)
        assert stats.dead_letters == {"bad_timestamp": 4}
        assert [key for topic, key, _, _ in sink.sent if topic == "dlq"] == [b"far"] * 4
        assert stats.windows_scored == (length * 4 - length) // stride + 1
        assert len(sink.values("events")) == stats.windows_scored


def test_a_poll_with_records_of_other_kinds_decodes_the_rest_together(detector, monkeypatch):
    """Records that are not readings of the common shape (bad ones, windows, batches, another
    timestamp form, a key only in the message) are decoded one by one; the poll's other
    readings still go through the one-pass decoder. The answer (events, dead letters and their
    reasons) is the one a member gets reading one record at a time."""
    from pipeline.modalities.series import SeriesIntake

    stream = fleet(seed=6, readings_per_key=300)
    records = partitioned(stream, "readings", 3)
    names = detector.input.features
    length = detector.input.window.length
    values = {n: 1.0 for n in names}
    others = [
        (b"not json", "decode_error"),
        (orjson.dumps({"key": "KEY", "ts": 1, "values": {}}), "missing_feature"),
        (b"x" * 2_000_000, "oversize"),
        (orjson.dumps({"key": "someone-else", "ts": 1, "values": values}), "schema_mismatch"),
        (orjson.dumps({"ts": "yesterday", "values": values}), "bad_timestamp"),
        (orjson.dumps({"key": "KEY", "ts": 1e15, "values": values}), "bad_timestamp"),
        (None, "schema_mismatch"),  # a tombstone: the whole poll record by record
    ]
    window = {"ts_start": 1, "ts_end": 2, "values": [[0.5] * len(names)] * length}
    # a pre-cut window, a columnar batch and a reading with an ISO time, all of a key of their own
    fine = [
        orjson.dumps({"key": "solo-w", **window}),
        orjson.dumps({"key": "solo-b", "ts": [1, 2], "values": {n: [1.0, 2.0] for n in names}}),
        orjson.dumps({"key": "solo-t", "ts": "2026-01-01T00:00:00Z", "values": values}),
    ]
    iso = 0
    for p, partition in enumerate(sorted(records)):
        rs = records[partition]
        key = rs[0].key
        for j, (value, _reason) in enumerate(others[p::3]):
            if value is not None:  # the readings that are not refused for their key
                value = value.replace(b'"KEY"', b'"' + key + b'"')
            rs.insert(40 + 60 * j, Record(*partition, 0, key, value))
        rs.insert(20, Record(*partition, 0, f"solo-{'wbt'[p]}".encode(), fine[p]))
        iso += len(rs[100:400:50])
        for r in rs[100:400:50]:  # readings of the stream's keys with ISO times: one by one too
            reading = orjson.loads(r.value)
            reading["ts"] = iso_ms(reading["ts"])
            r.value = orjson.dumps(reading)
        for offset, record in enumerate(rs):
            record.offset = offset
    taken_one_by_one: list[int] = []
    one_by_one = SeriesIntake._one_by_one

    def counted(self, records, partitions, keys, values, offsets, indices, *rest):
        taken_one_by_one.append(len(indices))
        return one_by_one(self, records, partitions, keys, values, offsets, indices, *rest)

    monkeypatch.setattr(SeriesIntake, "_one_by_one", counted)
    _, together, stats = run_in_memory(detector, FakeSource(records, chunk=10_000), emit_all=True)
    total = sum(map(len, records.values()))
    assert taken_one_by_one == [total]  # a record without a value: the poll one by one
    taken_one_by_one.clear()
    no_tombstone = {p: [r for r in rs if r.value is not None] for p, rs in records.items()}
    for rs in no_tombstone.values():
        for offset, record in enumerate(rs):
            record.offset = offset
    _, together, stats = run_in_memory(
        detector, FakeSource(no_tombstone, chunk=10_000), emit_all=True
    )
    assert taken_one_by_one == [len(others) - 1 + len(fine) + iso]
    _, apart, apart_stats = run_in_memory(
        detector, OnePartitionAPoll(no_tombstone, chunk=1), emit_all=True
    )

    expected = sorted(reason for _, reason in others[:-1])
    assert sorted(dead_letters(together).values()) == expected
    assert dead_letters(together) == dead_letters(apart)
    assert sorted(together.values("events")) == sorted(apart.values("events")) != []
    assert stats.windows_scored == apart_stats.windows_scored > 0


def test_the_one_pass_decoder_gives_up_on_a_poll_of_mostly_other_records():
    """A few records of another kind leave the rest of the poll to the one-pass decoder; once
    failed tries outnumber the readings decoded (past `MOSTLY_OTHERS`), the rest of the poll
    is left to be decoded one by one."""
    from pipeline.modalities.readings import MOSTLY_OTHERS, RecordDecoder

    decoder = RecordDecoder(("s0", "s1"), 4, 1 << 20)

    def reading(ts: int) -> bytes:
        return orjson.dumps({"key": "a", "ts": ts, "values": {"s0": 1.0, "s1": 2.0}})

    values = [reading(i) for i in range(30)] + [b"bad"] * 3 + [reading(30)]
    keys, ts, rows, at, others = decoder.decode_many([b"a"] * len(values), values)
    assert at.tolist() == [*range(30), 33] and others == [30, 31, 32]
    assert ts.tolist() == list(range(31)) and rows.shape == (31, 2) and keys == ["a"] * 31
    values = [reading(0), reading(1)] + [b"bad"] * (MOSTLY_OTHERS + 5) + [reading(2)]
    keys, ts, rows, at, others = decoder.decode_many([b"a"] * len(values), values)
    assert at.tolist() == [0, 1] and others == list(range(2, len(values)))


def test_a_pre_cut_window_among_its_keys_readings_keeps_its_place_in_the_stream(detector):
    """A key's pre-cut windows and the windows made from its readings reach the adaptive stage
    in record order, whether a poll holds one record or many: the same events either way."""
    stream = fleet(seed=7, readings_per_key=400)
    records = partitioned(stream, "readings", 2)
    length = detector.input.window.length
    for rs in records.values():
        key = rs[0].key
        mine = [orjson.loads(r.value) for r in rs if r.key == key]
        names = list(mine[0]["values"])
        for at in (150, 260):  # a copy of the key's readings as one window, twice
            cut = mine[at - length : at]
            window = {
                "key": key.decode(),
                "ts_start": cut[0]["ts"],
                "ts_end": cut[-1]["ts"],
                "values": [[r["values"][n] * 3.0 for n in names] for r in cut],
            }
            rs.insert(
                rs.index(next(r for r in rs if orjson.loads(r.value) == mine[at])),
                Record(rs[0].topic, rs[0].partition, 0, key, orjson.dumps(window)),
            )
        for offset, record in enumerate(rs):
            record.offset = offset
    _, together, stats = run_in_memory(detector, FakeSource(records, chunk=10_000), emit_all=True)
    _, apart, apart_stats = run_in_memory(
        detector, OnePartitionAPoll(records, chunk=1), emit_all=True
    )
    assert stats.windows_scored == apart_stats.windows_scored > 0
    assert dead_letters(together) == dead_letters(apart) == {}
    assert sorted(together.values("events")) == sorted(apart.values("events"))


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda saved: b"not json",
        lambda saved: orjson.dumps([saved]),
        lambda saved: orjson.dumps({**saved, "resume": {k: "12" for k in saved["resume"]}}),
        lambda saved: orjson.dumps(
            {**saved, "resume": {k: [2**63 - 1, 0] for k in saved["resume"]}}
        ),
        lambda saved: orjson.dumps({**saved, "adaptive": {**saved["adaptive"], "keys": [1]}}),
    ],
    ids=["not-json", "not-an-object", "resume-text", "resume-beyond", "adaptive-keys"],
)
def test_an_unreadable_state_record_is_refused_for_its_partition_alone(detector, corrupt, caplog):
    stream = fleet(seed=4)
    records = partitioned(stream, "readings", 2)
    keys_of = {p: {r.key.decode() for r in rs} for p, rs in records.items()}
    settings_ = dict(emit_all=True)
    _, clean_sink, _ = run_in_memory(detector, FakeSource(records, chunk=250), **settings_)
    clean = [orjson.loads(v) for v in clean_sink.values("events")]

    state = MemoryStateStore()
    source = FakeSource({p: r[: len(r) // 2] for p, r in records.items()}, chunk=250)
    first = checkpointed(detector, source, state, **settings_)
    before = [orjson.loads(v) for v in first.sink.values("events")]
    bad = ("readings", 1)
    state.records[bad] = corrupt(orjson.loads(state.records[bad]))

    second_source = FakeSource(records, chunk=250, committed=source.latest_commits())
    worker, second_sink, _ = run_in_memory(detector, second_source, state=state, **settings_)
    after = [orjson.loads(v) for v in second_sink.values("events")]

    def ids(events, partition):
        return {e["id"] for e in events if e["subject"] in keys_of[partition]}

    good = ("readings", 0)  # restores as usual: the same windows, no event twice
    assert ids(before, good) | ids(after, good) == ids(clean, good)
    assert not ids(before, good) & ids(after, good)
    # the refused partition's keys start afresh from the commit: every key scored again
    assert {e["subject"] for e in after} >= keys_of[bad]
    assert worker.metrics.state_refused._value.get() == 1
    assert (
        [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        == [r.getMessage() for r in caplog.records if "readings:1 refused" in r.getMessage()]
        != []
    )
    decode_state(state.records[bad])  # the next checkpoint wrote a good record over it


def _with_quiet_key(stream, before: int, after: int) -> list:
    """One partition's records: key "quiet" sends `before` readings, then the fleet's keys all
    theirs, then "quiet" `after` more (its windows span the gap)."""
    fleet_records = partitioned(stream, "readings", 1)[("readings", 0)]
    values = [orjson.loads(r.value)["values"] for r in fleet_records[: before + after]]
    first, last = int(stream.ts_ms.min()), int(stream.ts_ms.max())
    ts = [first - 1000 * (before - i) for i in range(before)]
    ts += [last + 1000 * (i + 1) for i in range(after)]
    quiet = [
        orjson.dumps({"key": "quiet", "ts": t, "values": v})
        for t, v in zip(ts, values, strict=True)
    ]
    values_in_order = quiet[:before] + [r.value for r in fleet_records] + quiet[before:]
    keys = [b"quiet"] * before + [r.key for r in fleet_records] + [b"quiet"] * after
    return [
        Record("readings", 0, offset, key, value)
        for offset, (key, value) in enumerate(zip(keys, values_in_order, strict=True))
    ]


def test_a_silent_key_does_not_hold_the_commit_back(detector):
    """A key that goes quiet keeps its unfinished window's readings in the state record once
    they lie more than `reread_max` records back, and the commit moves on past them."""
    stream = fleet(seed=5, readings_per_key=1500, anomalies=())
    records = _with_quiet_key(stream, before=20, after=0)
    source = FakeSource({("readings", 0): records}, chunk=200)
    state = MemoryStateStore()
    worker, _, _ = run_in_memory(detector, source, state, commit_interval_ms=1, reread_max=1000)
    committed = source.latest_commits()[("readings", 0)]
    exposed = worker.metrics.exposition().decode()
    assert 'aewatch_parked_keys{partition="0",topic="readings"} 1.0' in exposed
    reread = f'aewatch_reread_records{{partition="0",topic="readings"}} {len(records) - committed}'
    assert reread in exposed
    size = len(state.records[("readings", 0)])
    assert f'aewatch_state_record_bytes{{partition="0",topic="readings"}} {float(size)}' in exposed
    assert f'aewatch_keys{{partition="0",topic="readings"}} {float(1 + 4)}' in exposed
    # only the fleet's open windows are read again (the quiet key's 20 readings held it at 0)
    assert committed >= len(records) - 4 * detector.input.window.length
    parked = decode_state(state.records[("readings", 0)])["parked"]
    assert list(parked["keys"]) == ["quiet"]
    assert parked["keys"]["quiet"]["offsets"] == list(range(8, 20))  # its next window's


def test_with_default_settings_a_quiet_key_holds_the_commit_back_at_most_reread_max(detector):
    """The same with `--reread-max` at its default (100,000): 104,020 records after the quiet
    key's 20; the commit ends within 100,000 records of the end (before parking: at 8, the
    quiet key's oldest needed reading)."""
    stream = fleet(seed=5, readings_per_key=26_000, anomalies=())
    records = _with_quiet_key(stream, before=20, after=0)
    source = FakeSource({("readings", 0): records}, chunk=5000)
    run_in_memory(detector, source, max_poll_records=5000)
    assert len(records) - source.latest_commits()[("readings", 0)] <= 100_000


def test_a_parked_key_continues_its_windows_after_a_restart(detector):
    """A restart from the commit and the state record gives the quiet key the same windows,
    scores and event ids as an uninterrupted run, though its first readings are not read
    again."""
    stream = fleet(seed=5, readings_per_key=1500, anomalies=())
    records = {("readings", 0): _with_quiet_key(stream, before=20, after=30)}
    options = dict(emit_all=True, reread_max=1000)
    _, clean_sink, _ = run_in_memory(detector, FakeSource(records, chunk=200), **options)
    clean = {e["id"]: e for e in map(orjson.loads, clean_sink.values("events"))}

    state = MemoryStateStore()
    half = {p: r[: len(r) // 2] for p, r in records.items()}
    source = FakeSource(half, chunk=200)
    first = checkpointed(detector, source, state, commit_interval_ms=1, **options)
    before = {e["id"]: e for e in map(orjson.loads, first.sink.values("events"))}
    committed = source.latest_commits()
    assert committed[("readings", 0)] > 20  # the quiet key's readings are not read again

    second = FakeSource(records, chunk=200, committed=committed)
    _, second_sink, _ = run_in_memory(detector, second, state=state, **options)
    after = {e["id"]: e for e in map(orjson.loads, second_sink.values("events"))}
    assert before.keys() | after.keys() == clean.keys()
    quiet = {i: e["data"]["score"] for i, e in clean.items() if e["subject"] == "quiet"}
    assert len(quiet) == 9  # windows ending at positions 15, 19, .., 47
    assert {i: {**before, **after}[i]["data"]["score"] for i in quiet} == quiet
    spanning = [i for i, e in after.items() if e["subject"] == "quiet"]
    assert len(spanning) == 7  # those ending at 23 .. 47 take parked readings


def _one_key(seed: int = 3) -> list:
    stream = fleet(seed=seed, readings_per_key=500, anomalies=(), keys=1)
    return partitioned(stream, "readings", 1)[("readings", 0)]


def _restamped(record: Record, ahead_ms: int) -> Record:
    data = orjson.loads(record.value)
    data["ts"] = data["ts"] + ahead_ms
    return Record(record.topic, record.partition, record.offset, record.key, orjson.dumps(data))


TEN_YEARS_MS = 10 * 365 * 86_400_000


def test_a_reading_stamped_years_ahead_is_refused_and_its_key_keeps_going(detector):
    """One reading from a clock ten years ahead goes to the DLQ as bad_timestamp, and the key's
    later readings are windowed as if that record had been unreadable; without the limit
    (--max-future-s 0) it becomes the key's latest and every later reading is out of order."""
    records = _one_key()
    future = records[:100] + [_restamped(records[100], TEN_YEARS_MS)] + records[101:]
    broken = [*records[:100], Record("readings", 0, 100, records[100].key, b"{"), *records[101:]]

    def run(rs, **extra):
        source = FakeSource({("readings", 0): rs}, chunk=50)
        _, sink, _ = run_in_memory(detector, source, emit_all=True, **extra)
        return sink.values("events"), dead_letters(sink)

    (events, letters), (broken_events, broken_letters) = run(future), run(broken)
    assert letters == {(0, 100): "bad_timestamp"}
    assert broken_letters == {(0, 100): "decode_error"}
    assert events == broken_events != []
    _, unlimited = run(future, max_future_s=0)
    assert set(unlimited.values()) == {"out_of_order"}
    assert len(unlimited) == len(records) - 101


def test_windows_and_batches_stamped_in_the_future_are_refused_whole(detector):
    """A pre-cut window ending years ahead, and a columnar batch holding one reading years
    ahead, are each dead-lettered once as bad_timestamp; the key's other records are taken."""
    records = _one_key(seed=4)
    length = detector.input.window.length
    rows = [orjson.loads(r.value) for r in records[:length]]
    names = list(rows[0]["values"])
    key = records[0].key
    window = {
        "key": key.decode(),
        "ts_start": rows[0]["ts"] + TEN_YEARS_MS,
        "ts_end": rows[-1]["ts"] + TEN_YEARS_MS,
        "values": [[r["values"][n] for n in names] for r in rows],
    }
    later = [orjson.loads(r.value) for r in records[200:210]]
    batch = {
        "key": key.decode(),
        "ts": [r["ts"] for r in later[:-1]] + [later[-1]["ts"] + TEN_YEARS_MS],
        "values": {n: [r["values"][n] for r in later] for n in names},
    }
    rs = [*records[:150], Record("readings", 0, 0, key, orjson.dumps(window)), *records[150:200]]
    rs += [Record("readings", 0, 0, key, orjson.dumps(batch)), *records[210:]]
    for offset, record in enumerate(rs):
        record.offset = offset
    _, sink, stats = run_in_memory(detector, FakeSource({("readings", 0): rs}, chunk=37))
    assert dead_letters(sink) == {(0, 150): "bad_timestamp", (0, 201): "bad_timestamp"}
    assert stats.records_in == len(rs)


def test_a_key_that_moved_partition_starts_afresh_on_its_new_one(detector):
    """The input topic grows from one partition to two and machine-001 now lands on the new
    one, whose offsets start again from 0. Its state, restored from the old partition's
    record, names offsets of that partition and must not skip its readings on the new one (all
    1,000 were skipped): it starts a fresh series there, while machine-000 continues."""
    stream = fleet(seed=3, readings_per_key=3000, anomalies=(), keys=2)
    records = partitioned(stream, "readings", 1)[("readings", 0)]
    first, rest = records[:4000], records[4000:]
    state = MemoryStateStore()
    source = FakeSource({("readings", 0): first}, chunk=200)
    _, first_sink, _ = run_in_memory(detector, source, state, emit_all=True)

    def moved(rs, partition, start):
        return [Record("readings", partition, start + i, r.key, r.value) for i, r in enumerate(rs)]

    stays = moved([r for r in rest if r.key == b"machine-000"], 0, 4000)
    goes = moved([r for r in rest if r.key == b"machine-001"], 1, 0)
    grown = {("readings", 0): first + stays, ("readings", 1): goes}
    committed = {**source.latest_commits(), ("readings", 1): 0}
    _, sink, _ = run_in_memory(detector, FakeSource(grown, 200, committed), state, emit_all=True)

    def ids(sink, key):
        return {e["id"] for e in map(orjson.loads, sink.values("events")) if e["subject"] == key}

    whole = {("readings", 0): first + stays}
    _, uninterrupted, _ = run_in_memory(detector, FakeSource(whole, 200), emit_all=True)
    _, alone, _ = run_in_memory(detector, FakeSource({("readings", 1): goes}, 200), emit_all=True)
    continued = ids(uninterrupted, "machine-000") - ids(first_sink, "machine-000")
    assert ids(sink, "machine-000") == continued != set()
    # none of its windows on the new partition is lost; the others end before the first of
    # them (they span the move: its readings after the commit on the old partition, read again)
    fresh = ids(alone, "machine-001")
    assert fresh <= ids(sink, "machine-001")
    ends = {e["id"]: e["data"]["window"]["end"] for e in map(orjson.loads, sink.values("events"))}
    first_fresh = min(ends[i] for i in fresh)
    assert all(ends[i] < first_fresh for i in ids(sink, "machine-001") - fresh)


def test_a_moved_key_read_again_on_its_old_partition_first_keeps_its_new_readings(detector):
    """As above, but the old partition's records read again come in polls before any of the
    new one's: the key continues its series there, and its readings on the new partition,
    whose offsets lie below its resume offset on the old one, are not skipped."""
    stream = fleet(seed=3, readings_per_key=3000, anomalies=(), keys=2)
    records = partitioned(stream, "readings", 1)[("readings", 0)]
    first, rest = records[:4000], records[4000:]
    state = MemoryStateStore()
    source = FakeSource({("readings", 0): first}, chunk=200)
    run_in_memory(detector, source, state)
    goes = [r for r in rest if r.key == b"machine-001"]
    goes = [Record("readings", 1, i, r.key, r.value) for i, r in enumerate(goes)]

    worker = Worker(settings(emit_all=True), detector, MODEL, FakeSink(), state)
    old = FakeSource({("readings", 0): first}, chunk=200, committed=source.latest_commits())
    worker.attach(old)
    worker.on_assigned({("readings", 0), ("readings", 1)})
    for polls in (old, FakeSource({("readings", 1): goes}, chunk=200)):
        while polled := polls.poll(0):
            worker.process(polled)
    worker.checkpoint()
    start = iso_ms(orjson.loads(goes[0].value)["ts"])
    new = [
        e
        for e in map(orjson.loads, worker.sink.values("events"))
        if e["subject"] == "machine-001" and e["data"]["window"]["end"] >= start
    ]
    assert len(new) == len(goes) // 4  # stride 4: every window ending at its new readings


class _Joining(FakeSource):
    """A group member whose join takes `join_s` of a fake clock: its polls bring nothing until
    the group's rebalance hands it every partition (never, for None). Each poll takes 0.5 s."""

    def __init__(self, records, clock, join_s):
        super().__init__(records, chunk=500)
        self.clock, self.join_s, self.worker = clock, join_s, None

    def poll(self, timeout_ms):
        self.clock[0] += 0.5
        if not self.worker.joined:
            if self.join_s is None or self.clock[0] < self.join_s:
                return {}
            self.worker.on_assigned(set(self.records))
        return super().poll(timeout_ms)


def _joining_worker(detector, stream, join_s):
    clock = [0.0]
    worker = Worker(
        settings(stop_after_idle_s=1.0),
        detector,
        MODEL,
        FakeSink(),
        MemoryStateStore(),
        clock=lambda: clock[0],
    )
    source = _Joining(partitioned(stream, "readings", 2), clock, join_s)
    source.worker = worker
    worker.attach(source)
    return worker, source, clock


def test_waiting_to_be_taken_into_the_group_is_not_idleness(detector):
    """`stop_after_idle_s` counts once the group has taken the member in: a join slower than it
    (a broker's first join waits group.initial.rebalance.delay.ms, 3 s by default) does not end
    the worker before it has read anything."""
    stream = fleet(seed=4, readings_per_key=200, anomalies=())
    worker, source, clock = _joining_worker(detector, stream, join_s=4.0)
    stats = worker.run()
    assert stats.records_in == sum(map(len, source.records.values())) > 0
    assert stats.windows_scored == len(flags_by_window(stream, detector)[0])


def test_a_member_never_taken_into_the_group_stops_past_the_join_wait(detector, caplog):
    """A member with `stop_after_idle_s` that no group takes in still ends: after the idle time
    plus the longest a join may take (max.poll.interval.ms), with a warning naming the group."""
    stream = fleet(seed=4, readings_per_key=200, anomalies=())
    worker, _, clock = _joining_worker(detector, stream, join_s=None)
    stats = worker.run()
    wait_s = 1.0 + worker.settings.kafka.max_poll_interval_ms / 1000.0
    assert stats.records_in == 0
    assert wait_s <= clock[0] <= wait_s + 0.5
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert (
        line == f"not taken into group {worker.settings.kafka.group_id} in {wait_s:.1f}s; stopping"
    )

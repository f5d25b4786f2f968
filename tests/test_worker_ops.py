"""Worker operations in memory: alarm episodes, metrics, model swaps between batches, health."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from jsonschema import Draft202012Validator

from pipeline.events import ALARM_SCHEMA, event_schema
from pipeline.kafka_io.transactions import Transactions
from pipeline.registry.client import ModelRef
from pipeline.worker.loop import Worker
from pipeline.worker.state import MemoryStateStore
from tests.helpers import metric_values
from tests.worker_support import FLEET_MODEL as MODEL
from tests.worker_support import (
    FakeSink,
    FakeSource,
    Record,
    flags_by_window,
    fleet,
    partitioned,
    settings,
    train_fleet_detector,
)


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return train_fleet_detector(tmp_path_factory.mktemp("fleet")).detector


def _worker(detector, source, *, follower=None, state=None, **overrides) -> Worker:
    worker = Worker(
        settings(**overrides),
        detector,
        MODEL,
        FakeSink(),
        state or MemoryStateStore(),
        follower=follower,
    )
    worker.attach(source)
    worker.on_assigned(set(source.records))
    return worker


def long_anomaly_stream(seed: int = 7):
    """Four machines; one has a level shift long enough for about 30 windows."""
    return fleet(
        seed=seed,
        keys=4,
        readings_per_key=1500,
        anomalies=("level_shift",),
        anomalous_keys=1,
        anomaly_length=120,
        magnitude=3.0,
    )


def test_a_long_anomaly_is_one_alarm_episode_not_a_stream_of_alerts(detector):
    stream = long_anomaly_stream()
    source = FakeSource(partitioned(stream, "readings", 2), chunk=211)
    worker = _worker(detector, source, events="both")
    worker.run()
    sent = [orjson.loads(v) for v in worker.sink.values("events")]
    alarms = [e for e in sent if e["type"].startswith("aewatch.alarm.")]
    windows = [e for e in sent if e["type"] == "aewatch.anomaly.v1"]
    (bad_key,) = {t.key for t in stream.truth}
    assert len([e for e in windows if e["subject"] == bad_key]) >= 20, "many anomalous windows"
    assert [(e["type"], e["subject"]) for e in alarms] == [
        ("aewatch.alarm.opened", bad_key),
        ("aewatch.alarm.resolved", bad_key),
    ]
    opened, resolved = alarms
    assert opened["data"]["episode_id"] == resolved["data"]["episode_id"]
    truth = stream.truth[0]
    start, end = (np.datetime64(resolved["data"][k].rstrip("Z")) for k in ("start", "end"))
    truth_start = np.datetime64(truth.start_ms, "ms")
    truth_end = np.datetime64(truth.end_ms, "ms")
    assert start <= truth_end and end >= truth_start, "the episode covers the injected anomaly"
    assert resolved["data"]["anomalous_windows"] >= 20
    assert resolved["data"]["top_features"], "the sensors that contributed are named"
    validator = Draft202012Validator(event_schema(ALARM_SCHEMA))
    for event in alarms:
        validator.validate(event)
    assert worker.metrics.alarms_open._value.get() == 0


def test_alarm_state_survives_a_restart_without_repeating_the_episode(detector):
    stream = long_anomaly_stream(seed=8)
    records = partitioned(stream, "readings", 1)
    clean = _worker(detector, FakeSource(records, chunk=150), events="alarms")
    clean.run()
    clean_ids = [orjson.loads(v)["id"] for v in clean.sink.values("events")]
    assert len(clean_ids) == 2

    state = MemoryStateStore()
    (part,) = records
    truth = stream.truth[0]
    # cut in the middle of the anomaly: the alarm is open at the checkpoint
    cut = next(
        i
        for i, r in enumerate(records[part])
        if orjson.loads(r.value)["ts"] > truth.start_ms + 60_000
    )
    first = _worker(
        detector, FakeSource({part: records[part][:cut]}, chunk=150), state=state, events="alarms"
    )
    first.run()
    first_ids = [orjson.loads(v)["id"] for v in first.sink.values("events")]
    assert len(first_ids) == 1 and first.alarms.open_count == 1
    restart = FakeSource(records, chunk=150, committed=first.checkpoints.committed)
    second = _worker(detector, restart, state=state, events="alarms")
    second.run()
    second_ids = [orjson.loads(v)["id"] for v in second.sink.values("events")]
    assert first_ids + second_ids == clean_ids, "the episode resolves once, with the same ids"


def test_metrics_count_records_windows_and_dead_letters(detector):
    stream = fleet(seed=9, readings_per_key=500, anomalies=())
    records = partitioned(stream, "readings", 1)[("readings", 0)]
    bad = [b"not json", b"[1]", orjson.dumps({"key": "machine-000", "ts": 1, "values": {}})]
    bad += [b"{not json either", b"\xff"]  # a reason's count goes on past its first
    mixed = (
        records[:100] + [Record("readings", 0, 0, b"machine-000", v) for v in bad] + records[100:]
    )
    for offset, record in enumerate(mixed):
        record.offset = offset
    worker = _worker(detector, FakeSource({("readings", 0): mixed}, chunk=64))
    stats = worker.run()
    values = metric_values(worker.metrics.exposition().decode())
    assert values[("aewatch_records_total", (("topic", "readings"),))] == len(mixed)
    assert values[("aewatch_windows_scored_total", ())] == stats.windows_scored > 0
    assert values[("aewatch_dead_letters_total", (("reason", "decode_error"),))] == 3
    assert values[("aewatch_dead_letters_total", (("reason", "schema_mismatch"),))] == 1
    assert values[("aewatch_dead_letters_total", (("reason", "missing_feature"),))] == 1
    assert values[("aewatch_end_to_end_latency_seconds_count", ())] == stats.windows_scored
    assert values[("aewatch_batch_windows_count", ())] == stats.batches
    assert (
        values[("aewatch_model_info", (("alias", "champion"), ("name", "fleet"), ("version", "1")))]
        == 1
    )


def test_the_drop_order_policy_counts_late_and_repeated_readings_without_dead_letters(detector):
    stream = fleet(seed=9, readings_per_key=300, anomalies=())
    records = partitioned(stream, "readings", 1)[("readings", 0)]
    again = records[150:153]  # the same readings once more, right after them (3 keys' latest)
    late = []
    for r in records[200:202]:  # readings stamped before their key's latest
        reading = orjson.loads(r.value)
        reading["ts"] -= 30_000
        late.append(Record("readings", 0, 0, r.key, orjson.dumps(reading)))
    mixed = records[:153] + [Record(*r.__dict__.values()) for r in again] + records[153:210]
    mixed += late + records[210:]
    for offset, record in enumerate(mixed):
        record.offset = offset
    worker = _worker(detector, FakeSource({("readings", 0): mixed}, chunk=64), order_policy="drop")
    stats = worker.run()
    assert worker.sink.values("dlq") == []
    assert dict(stats.dropped) == {"duplicate_timestamp": 3, "out_of_order": 2}
    values = metric_values(worker.metrics.exposition().decode())
    assert values[("aewatch_dropped_total", (("reason", "duplicate_timestamp"),))] == 3
    assert values[("aewatch_dropped_total", (("reason", "out_of_order"),))] == 2
    assert stats.windows_scored > 0


class ScriptedFollower:
    """Hands over a new version after a number of polls, like a follower whose check passed."""

    def __init__(self, detector, after_takes: int) -> None:
        self.detector, self.after, self.calls, self.sample = detector, after_takes, 0, None

    def take(self):
        self.calls += 1
        if self.calls == self.after:
            ref = ModelRef("models:/fleet@champion", None, "fleet", "2", "champion", "x")
            return self.detector, ref
        return None


def test_a_new_version_swaps_in_between_batches_and_no_window_is_lost(detector):
    stream = fleet(seed=10, readings_per_key=800)
    records = partitioned(stream, "readings", 2)
    follower = ScriptedFollower(detector, after_takes=6)
    worker = _worker(detector, FakeSource(records, chunk=120), follower=follower, emit_all=True)
    worker.run()
    windows, _, _ = flags_by_window(stream, detector)
    events = [orjson.loads(v) for v in worker.sink.values("events")]
    assert len(events) == len(windows), "every window scored exactly once"
    versions = [e["data"]["model"]["version"] for e in events]
    assert "1" in versions and "2" in versions
    first_new = versions.index("2")
    assert set(versions[first_new:]) == {"2"}, "no old-version event after the swap"
    assert worker.stats.reloads == 1
    assert follower.sample is not None and follower.sample.shape[1:] == (16, 4)


def test_readiness_follows_the_group_membership(detector):
    source = FakeSource({("readings", 0): []})
    worker = Worker(settings(), detector, MODEL, FakeSink(), MemoryStateStore())
    worker.attach(source)
    assert worker.liveness()[0]
    assert not worker.readiness()[0], "not ready before joining the group"
    worker.on_assigned({("readings", 0)})
    ready, detail = worker.readiness()
    assert ready and detail["partitions"] == 1 and detail["model"]["version"] == "1"
    worker.stop()
    assert not worker.readiness()[0], "a stopping worker takes itself out of rotation"


class RetainingSource(FakeSource):
    """Like the Kafka client under eager rebalancing: a partition revoked and handed straight
    back keeps its fetch position unless the member seeks."""

    def seek(self, offsets: dict) -> None:
        self.position.update(offsets)


def test_a_partition_handed_straight_back_is_read_again_from_the_commit(detector):
    clean_ids, ids = _with_rebalances(detector, RetainingSource, 11, (3, 9, 15))
    assert sorted(set(ids)) == sorted(clean_ids), "no window lost or invented"


def test_a_partition_back_from_another_owner_is_read_from_its_state_not_an_old_commit(detector):
    """Member A owns a partition, B takes it over and moves it on, A gets it back: A read again
    from its own old commit, everything B had read (dead letters sent again among it)."""
    part = ("readings", 0)
    records = partitioned(fleet(seed=3, keys=4, readings_per_key=300), "readings", 1)[part]
    for offset in (100, 500, 900):
        records[offset].value = b"{not json"
    store = MemoryStateStore()
    members = [Worker(settings(emit_all=True), detector, MODEL, FakeSink(), store) for _ in "ab"]

    def own(worker, upto: int, committed: int) -> tuple[int, int, list[int]]:
        source = FakeSource({part: records[:upto]}, committed={part: committed})
        worker.sink = worker.writer.sink = worker.checkpoints.sink = sink = FakeSink()
        worker.attach(source)
        worker.on_assigned({part})
        first = source.position[part]
        while polled := source.poll(0):
            worker.process(polled)
        worker.checkpoint()
        worker.on_revoked({part})
        dead = [dict(h)["aewatch.source.offset"] for t, _, _, h in sink.sent if t == "dlq"]
        return first, source.latest_commits()[part], sorted(int(o) for o in dead)

    _, a_commit, _ = own(members[0], 400, 0)
    _, b_commit, b_dead = own(members[1], 1000, a_commit)
    assert b_dead == [500, 900] and b_commit > 900
    first, _, again = own(members[0], 1100, b_commit)
    assert first > 900, f"read again from {first}, before what B had read"
    assert again == []


class _TransactionSink(Transactions, FakeSink):
    """What each committed transaction held, and how many were aborted."""

    def __init__(self) -> None:
        super().__init__()
        self.committed: list[tuple[list, dict]] = []
        self.aborted, self._sent, self._offsets = 0, [], {}
        self.dropped: list = []  # what the aborted transactions held

    def send(self, topic, key=None, value=None, headers=None, partition=None) -> None:
        self._begin()
        self._sent.append((topic, value))

    def _begin_transaction(self) -> None:
        self._sent, self._offsets = [], {}

    def _send_offsets(self, offsets, group_metadata) -> None:
        self._offsets = dict(offsets)

    def _commit_transaction(self) -> None:
        self.committed.append((self._sent, self._offsets))

    def _abort_transaction(self) -> None:
        self.aborted += 1
        self.dropped += self._sent

    def _raise_undelivered(self) -> None:
        pass


def _partition_of(value: bytes) -> int:
    return orjson.loads(value)["data"]["source"]["partition"]


@pytest.mark.parametrize("keeps", [False, True])
def test_events_of_lost_partitions_are_not_committed_with_exactly_once(detector, keeps):
    """An evicted member loses its partitions with their events in the open transaction: the
    next checkpoint committed them, and their new owner, reading from the last commit, emitted
    them again."""
    records = partitioned(fleet(seed=3, keys=4, readings_per_key=300), "readings", 2)
    source = FakeSource({p: r[:200] for p, r in records.items()})
    sink = _TransactionSink()
    overrides = dict(emit_all=True, exactly_once=True, commit_interval_ms=60_000)
    worker = Worker(settings(**overrides), detector, MODEL, sink, MemoryStateStore())
    worker.attach(source)
    worker.on_assigned(set(records))
    while polled := source.poll(0):
        worker.process(polled)
    worker.score_pending()  # its events are in the open transaction
    lost = {("readings", 1)} if keeps else set(records)
    worker.on_revoked(lost, lost=True)
    assert sink.aborted == 1
    while polled := source.poll(0):  # what is still owned is read again
        worker.process(polled)
    worker.checkpoint()
    events = [v for sent, _ in sink.committed for t, v in sent if t == "events"]
    assert not [v for v in events if ("readings", _partition_of(v)) in lost]
    if keeps:  # what the aborted transaction held of partition 0 is emitted again
        dropped = [v for t, v in sink.dropped if t == "events" and _partition_of(v) == 0]
        ids = {orjson.loads(v)["id"] for v in events}
        assert dropped and ids >= {orjson.loads(v)["id"] for v in dropped}


def test_windows_pending_for_lost_partitions_are_not_emitted(detector):
    """Windows of a partition still waiting for their batch when it was lost were scored and
    emitted after it was forgotten, and its keys came back to the stages."""
    records = partitioned(fleet(seed=3, keys=4, readings_per_key=300), "readings", 2)
    source = FakeSource({p: r[:200] for p, r in records.items()})
    worker = _worker(detector, source, emit_all=True, max_wait_ms=10**6, events="both")
    while polled := source.poll(0):
        worker.process(polled)
    assert len(worker.pending)
    sent = len(worker.sink.sent)
    worker.on_revoked({("readings", 1)}, lost=True)
    worker.checkpoint()
    after = [v for t, _, v, _ in worker.sink.sent[sent:] if t == "events"]
    assert after and all(_partition_of(v) == 0 for v in after)
    assert worker.checkpoints.stages["alarms"].state(("readings", 1)) == {}


def _with_rebalances(detector, source_type, seed: int, at: tuple, before_revoke=None):
    """Event ids of a clean run and of a run whose member has everything revoked and given
    back (an eager rebalance) after the polls numbered `at`."""
    records = partitioned(fleet(seed=seed, readings_per_key=600), "readings", 2)
    clean = _worker(detector, FakeSource(records, chunk=101), emit_all=True)
    clean.run()
    source = source_type(records, chunk=101)
    worker = _worker(detector, source, emit_all=True, commit_interval_ms=10**6)
    for step in range(40):
        polled = source.poll(0)
        if polled:
            worker.process(polled)
        if step in at:
            if before_revoke is not None:
                before_revoke(source)
            worker.on_revoked(set(records))  # the client would end the member if this raised
            assert worker.assigned == set()
            worker.on_assigned(set(records))
    worker.checkpoint()
    return [[orjson.loads(v)["id"] for v in w.sink.values("events")] for w in (clean, worker)]


class TimingOutSource(RetainingSource):
    """A group whose commit times out once, as a loaded broker's can inside a rebalance."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fail_next = False

    def commit(self, offsets: dict, *, wait: bool = True) -> None:
        if self.fail_next:
            self.fail_next = False
            raise TimeoutError("commit timed out")
        super().commit(offsets, wait=wait)


class RefusingSource(FakeSource):
    """Records whether each commit was waited for; `refuse` is handed out once as refused."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.waited: list[bool] = []
        self.refuse: set = set()

    def commit(self, offsets: dict, *, wait: bool = True) -> None:
        self.waited.append(wait)
        super().commit(offsets, wait=wait)

    def refused_commits(self) -> set:
        refused, self.refuse = self.refuse, set()
        return refused


def test_interval_commits_are_not_waited_for_and_a_refused_one_is_sent_again(detector):
    """A checkpoint of the interval sends its commit and goes on (the group's answer is a round
    trip); one on revoke or at shutdown waits for it. A commit refused after the checkpoint went
    on is sent again by the next checkpoint, though its partition took nothing since."""
    records = partitioned(fleet(seed=2, readings_per_key=300, anomalies=()), "readings", 2)
    source = RefusingSource(records, chunk=400)
    worker = Worker(settings(), detector, MODEL, FakeSink(), MemoryStateStore())
    worker.attach(source)
    worker.on_assigned(set(records))
    worker.process(source.poll(0))
    worker.checkpoint()
    first = source.commits[-1]
    assert source.waited == [False] and set(first) == set(records)

    source.refuse = {("readings", 0)}  # the group refused it meanwhile
    worker.checkpoint()
    assert source.commits[-1] == {("readings", 0): first[("readings", 0)]}
    worker.checkpoint()  # mended: nothing more to commit
    assert len(source.commits) == 2 and source.waited == [False, False]

    worker.process(source.poll(0))
    worker.on_revoked({("readings", 1)})
    assert ("readings", 1) in source.commits[-1] and source.waited[-1] is True
    worker.process(source.poll(0))
    worker.stop()
    worker.run()  # its last checkpoint
    assert ("readings", 0) in source.commits[-1] and source.waited[-1] is True
    assert source.waited.count(False) == 2


def test_a_checkpoint_failing_on_revoke_keeps_the_member_and_loses_nothing(detector):
    def time_out_next_commit(source):
        source.fail_next = True

    clean_ids, ids = _with_rebalances(detector, TimingOutSource, 12, (3, 9), time_out_next_commit)
    assert sorted(set(ids)) == sorted(clean_ids), "no window lost or invented"

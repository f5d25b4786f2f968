"""The Kafka client contract, against the real broker, for every client aewatch ships: consumer
groups and the hand-over of partitions, manual commits, seeks (inside the assignment callback
too), the state topic's latest values, dead-letter headers, transactions, the keep-alive poll
while busy, a backlog read without the fetcher pausing, and logging in over SASL_SSL. The worker
on either client writes the same events."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections import defaultdict

import numpy as np
import orjson
import pytest
from confluent_kafka import KafkaException, Producer
from kafka import KafkaAdminClient as Admin
from kafka.errors import KafkaError

from pipeline.errors import ConfigError
from pipeline.kafka_io import open_client
from pipeline.kafka_io.errors import KafkaConnectError
from pipeline.kafka_io.settings import CLIENTS, KafkaConnection, KafkaSettings
from tests.kafka_support import consume, names, run_worker, topic_settings, worker_settings
from tests.tls_support import PASSWORD, USER, secure_broker
from tests.worker_support import train_fleet_detector

pytestmark = pytest.mark.kafka


@pytest.fixture(params=CLIENTS)
def kafka_client(request) -> str:
    return request.param


def _client(bootstrap: str, kafka_client: str, **settings):
    connection = {k: settings.pop(k) for k in list(settings) if k in CONNECTION_FIELDS}
    return open_client(
        KafkaSettings(
            connection=KafkaConnection(bootstrap, kafka_client=kafka_client, **connection),
            **settings,
        )
    )


CONNECTION_FIELDS = set(KafkaConnection.__dataclass_fields__)


def _topic(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Member:
    """A group member as the worker is one: it keeps what the group gives and takes away."""

    def __init__(self, client, topic: str) -> None:
        self.assigned: set = set()
        self.events: list = []
        self.seeks: dict = {}
        self.source = client.source([topic], None, self)

    def on_assigned(self, partitions) -> None:
        if not partitions:  # a join that gave nothing (kafka-python says so, librdkafka not)
            return
        self.assigned |= partitions
        self.events.append(("assigned", partitions))
        wanted = {p: o for p, o in self.seeks.items() if p in partitions}
        if wanted:
            self.source.seek(wanted)

    def on_revoked(self, partitions, *, lost: bool = False) -> None:
        if not partitions:
            return
        self.assigned -= partitions
        self.events.append(("lost" if lost else "revoked", partitions))

    def poll(self, timeout_ms: int = 200) -> list:
        """(partition, offset, value) of one poll's records, in order."""
        out = []
        for partition, records in self.source.poll(timeout_ms).items():
            out.extend((partition, r.offset, r.value) for r in records)
        return out

    def read(self, count: int, timeout_s: float = 30) -> list:
        out, deadline = [], time.monotonic() + timeout_s
        while len(out) < count and time.monotonic() < deadline:
            out.extend(self.poll())
        return out


def _produce(client, topic: str, count: int, partitions: int) -> None:
    sink = client.sink()
    for i in range(count):
        sink.send(topic, f"k{i % 8}".encode(), str(i).encode(), partition=i % partitions)
    sink.flush()
    sink.close()


def _next_offsets(read: list) -> dict:
    out: dict = {}
    for partition, offset, _ in read:
        out[partition] = max(out.get(partition, 0), offset + 1)
    return out


def test_group_members_share_partitions_and_hand_over_from_the_commit(
    kafka_bootstrap, kafka_client
):
    topic, group = _topic("hand"), _topic("g")
    client = _client(kafka_bootstrap, kafka_client, group_id=group, session_timeout_ms=6000)
    client.ensure_topics({topic: {"num_partitions": 4}})
    _produce(client, topic, 400, 4)

    first = Member(client, topic)
    read = first.read(400)
    assert len(read) == 400 and len({(p, o) for p, o, _ in read}) == 400
    assert first.assigned == {(topic, p) for p in range(4)}
    assert first.source.highwaters(first.assigned) == {(topic, p): 100 for p in range(4)}
    committed = _next_offsets(read)
    committed[(topic, 0)] = 10  # partition 0 is committed only up to its 10th record
    first.source.commit(committed)

    second = Member(client, topic)
    kept, late = [], []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        kept += first.poll(100)
        late += second.poll(100)
        both = first.assigned and second.assigned  # each member's new share has arrived
        if both and (late or first.assigned | second.assigned == committed.keys()):
            break
    assert first.assigned and second.assigned and not first.assigned & second.assigned
    assert ("revoked", {(topic, p) for p in range(4)} - first.assigned) in first.events or any(
        kind == "revoked" for kind, _ in first.events
    )
    if (topic, 0) in second.assigned:  # handed over: its new owner reads on from the commit
        late += second.read(90 - len(late), timeout_s=10)
        assert kept == [], "records after the commit belong to the new owner only"
        assert sorted(o for p, o, _ in late if p == (topic, 0)) == list(range(10, 100))
    else:  # kept: a client keeps its position (kafka-python) or restarts at the commit (librdkafka)
        kept += first.read(90 - len(kept), timeout_s=10)
        assert sorted(o for p, o, _ in kept) in ([], list(range(10, 100)))
    assert all(p == (topic, 0) for p, _, _ in kept + late), "only partition 0 is read again"
    second.source.close()
    first.source.close()

    third = Member(_client(kafka_bootstrap, kafka_client, group_id=group), topic)
    again = third.read(91, timeout_s=10)
    third.source.close()
    assert sorted(o for _, o, _ in again) == list(range(10, 100)), "no commit past partition 0's"


def test_a_commit_not_waited_for_lands_by_a_later_poll(kafka_bootstrap, kafka_client):
    """The worker's interval checkpoints send their commit and go on: it lands all the same,
    and the group's next member reads on from it; one the broker refuses is handed out once."""
    topic, group = _topic("async"), _topic("g")
    client = _client(kafka_bootstrap, kafka_client, group_id=group)
    client.ensure_topics({topic: {"num_partitions": 2}})
    _produce(client, topic, 40, 2)
    first = Member(client, topic)
    assert len(first.read(40)) == 40
    first.source.commit({(topic, 0): 20, (topic, 1): 10}, wait=False)
    first.source.commit({(topic, 5): 3}, wait=False)  # a partition the topic does not have
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # the outcomes come back in polls
        assert first.poll(100) == []
    assert first.source.refused_commits() == {(topic, 5)}
    assert first.source.refused_commits() == set()
    first.source.close()

    second = Member(_client(kafka_bootstrap, kafka_client, group_id=group), topic)
    again = second.read(10, timeout_s=15)
    assert second.poll(500) == []
    second.source.close()
    assert sorted((p, o) for p, o, _ in again) == [((topic, 1), o) for o in range(10, 20)]


def test_seeks_inside_the_assignment_and_after_it(kafka_bootstrap, kafka_client):
    topic = _topic("seek")
    client = _client(kafka_bootstrap, kafka_client, group_id=_topic("g"))
    client.ensure_topics({topic: {"num_partitions": 2}})
    _produce(client, topic, 40, 2)
    member = Member(client, topic)
    member.seeks = {(topic, 0): 15}  # the worker's rewind to its last commit, asked in the callback
    read = member.read(25)
    assert sorted(o for p, o, _ in read if p == (topic, 0)) == list(range(15, 20))
    assert sorted(o for p, o, _ in read if p == (topic, 1)) == list(range(20))
    member.source.seek({(topic, 1): 18})
    assert sorted(o for _, o, _ in member.read(2)) == [18, 19]
    member.source.close()


def test_a_poll_hands_over_records_once_they_are_there_not_at_its_timeout(
    kafka_bootstrap, kafka_client
):
    topic = _topic("soon")
    client = _client(kafka_bootstrap, kafka_client, group_id=_topic("g"))
    client.ensure_topics({topic: {"num_partitions": 1}})
    member = Member(client, topic)
    deadline = time.monotonic() + 30
    while not member.assigned and time.monotonic() < deadline:
        assert member.poll(100) == []
    assert member.assigned
    _produce(client, topic, 5, 1)
    started = time.monotonic()
    read = member.poll(20_000)
    waited = time.monotonic() - started
    member.source.close()
    assert [o for _, o, _ in read] == list(range(5))
    assert waited < 10, f"5 records waited {waited:.1f} s of the poll's 20 s"


def test_a_backlog_is_read_without_the_fetcher_pausing(kafka_bootstrap, kafka_client):
    """A member catching up reads faster than it hands over: what it has fetched ahead piles
    up. A client that then stops fetching for long (librdkafka by default: 1 s each time 100,000
    messages wait) leaves the member idle, its backlog growing."""
    topic, count = _topic("backlog"), 200_000
    client = _client(kafka_bootstrap, kafka_client, group_id=_topic("g"), max_poll_records=10_000)
    client.ensure_topics({topic: {"num_partitions": 4}})
    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap, "linger.ms": 20, "compression.type": "lz4"}
    )
    noise = np.random.default_rng(0).normal(size=(count, 8))
    for i in range(count):
        value = orjson.dumps({"key": f"m{i % 100}", "ts": i, "values": noise[i].tolist()})
        while True:
            try:
                producer.produce(topic, value, partition=i % 4)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush()
    source = Member(client, topic).source
    # time spent in empty polls between two that brought records: waiting with nothing handed
    # over (the time a poll takes to decode what it brings is the machine's, not a pause)
    read, waits, waiting = 0, [0.0], 0.0
    deadline = time.monotonic() + 60
    try:
        while read < count and time.monotonic() < deadline:
            started = time.monotonic()
            polled = sum(map(len, source.poll(200).values()))
            if not polled:
                waiting += time.monotonic() - started
                continue
            if read:
                waits.append(waiting)
            read, waiting = read + polled, 0.0
    finally:
        source.close()
    assert read == count
    assert max(waits) < 0.5, f"the member waited {max(waits):.2f} s for records already there"


def test_a_created_topic_has_the_settings_its_spec_asks_for(kafka_bootstrap, kafka_client):
    compacted, plain = _topic("made-compact"), _topic("made-plain")
    client = _client(kafka_bootstrap, kafka_client)
    client.ensure_topics(
        {
            compacted: {
                "num_partitions": 3,
                "topic_configs": {"cleanup.policy": "compact", "max.message.bytes": 2_097_152},
            },
            plain: {},
        }
    )
    made = topic_settings(kafka_bootstrap, compacted, "cleanup.policy", "max.message.bytes")
    assert made == {
        "partitions": 3,
        "replication_factor": 1,
        "cleanup.policy": ("compact", "DYNAMIC_TOPIC_CONFIG"),
        "max.message.bytes": ("2097152", "DYNAMIC_TOPIC_CONFIG"),
    }
    default = topic_settings(kafka_bootstrap, plain, "cleanup.policy")  # the broker's defaults
    assert default == {
        "partitions": 1,
        "replication_factor": 1,
        "cleanup.policy": ("delete", "DEFAULT_CONFIG"),
    }


def test_an_existing_topic_is_given_the_settings_it_lacks_and_keeps_its_own(
    kafka_bootstrap, kafka_client, caplog
):
    """A topic made without its settings (by hand, or by a version that did not ask for them)
    gets them when aewatch starts; one the operator set on the topic is left as it is."""
    topic = _topic("existing")
    Admin(bootstrap_servers=kafka_bootstrap).create_topics(
        {
            topic: {
                "num_partitions": 2,
                "replication_factor": 1,
                "configs": {"segment.bytes": "1048576"},
            }
        }
    )
    spec = {"topic_configs": {"cleanup.policy": "compact", "segment.bytes": 1 << 26}}
    with caplog.at_level(logging.WARNING, logger="pipeline.kafka_io.topics"):
        _client(kafka_bootstrap, kafka_client).ensure_topics({topic: spec})
    after = topic_settings(kafka_bootstrap, topic, "cleanup.policy", "segment.bytes")
    assert after == {
        "partitions": 2,
        "replication_factor": 1,
        "cleanup.policy": ("compact", "DYNAMIC_TOPIC_CONFIG"),
        "segment.bytes": ("1048576", "DYNAMIC_TOPIC_CONFIG"),
    }
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        f"topic {topic} keeps its own segment.bytes=1048576 (aewatch creates it with 67108864)",
        f"topic {topic} lacked settings aewatch needs; set cleanup.policy=compact",
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.kafka_io.topics"):
        _client(kafka_bootstrap, kafka_client).ensure_topics(
            {topic: {"topic_configs": {"cleanup.policy": "compact"}}}
        )
    assert caplog.records == []  # nothing lacking: nothing set, nothing said


def test_the_state_topic_gives_the_latest_value_of_each_key(kafka_bootstrap, kafka_client):
    topic = _topic("state")
    client = _client(kafka_bootstrap, kafka_client)
    client.ensure_topics(
        {topic: {"num_partitions": 3, "topic_configs": {"cleanup.policy": "compact"}}}
    )
    client.ensure_topics({topic: {"num_partitions": 3}})  # already there: nothing happens
    sink = client.sink()
    for key, value, partition in [
        (b"a", b"1", 0),
        (b"b", b"2", 1),
        (b"a", b"3", 0),
        (b"c", b"4", 2),
        (b"c", None, 2),  # a tombstone deletes the key
    ]:
        sink.send(topic, key, value, partition=partition)
    sink.flush()
    sink.close()
    assert client.read_latest(topic) == {b"a": b"3", b"b": b"2"}
    assert client.read_latest(topic, keys=[b"b", b"c"]) == {b"b": b"2"}
    assert client.read_latest(_topic("absent")) == {}
    every = client.read_all(topic)  # every record, tombstones too, in each partition's order
    assert sorted((r.partition, r.offset, r.key, r.value) for r in every) == [
        (0, 0, b"a", b"1"),
        (0, 1, b"a", b"3"),
        (1, 0, b"b", b"2"),
        (2, 0, b"c", b"4"),
        (2, 1, b"c", None),
    ]
    assert client.read_all(_topic("absent")) == []


def test_dead_letter_headers_arrive_as_sent(kafka_bootstrap, kafka_client):
    topic = _topic("dlq")
    client = _client(kafka_bootstrap, kafka_client, group_id=_topic("g"))
    client.ensure_topics({topic: {"num_partitions": 1}})
    headers = [("aewatch.reason", b"decode_error"), ("aewatch.detail", "bad ü".encode())]
    headers += [("aewatch.source.offset", b"17"), ("empty", b"")]
    sink = client.sink()
    sink.send(topic, b"pump-7", b"{not json", headers=headers)
    sink.send(topic, None, b"no headers")
    sink.flush()
    sink.close()
    tail = client.tail([topic], from_beginning=True)
    records, deadline = [], time.monotonic() + 20
    while len(records) < 2 and time.monotonic() < deadline:
        for batch in tail.poll(200).values():
            records.extend(batch)
    tail.close()
    assert [(r.key, r.value) for r in records] == [(b"pump-7", b"{not json"), (None, b"no headers")]
    assert list(records[0].headers) == headers
    assert not records[1].headers
    assert records[0].topic == topic and records[0].partition == 0 and records[0].offset == 0
    assert abs(records[0].timestamp / 1000 - time.time()) < 120
    member = Member(client, topic)
    polled, deadline = [], time.monotonic() + 20
    while not polled and time.monotonic() < deadline:
        polled = [r for batch in member.source.poll(200).values() for r in batch]
    member.source.close()
    assert list(polled[0].headers) == headers


def test_a_tail_knows_when_it_has_read_to_the_end(kafka_bootstrap, kafka_client):
    topic = _topic("end")
    client = _client(kafka_bootstrap, kafka_client)
    client.ensure_topics({topic: {"num_partitions": 3}})
    sink = client.sink()
    for i in range(30):
        sink.send(topic, f"k{i}".encode(), b"x", partition=i % 3)
    sink.flush()
    sink.close()
    tail = client.tail([topic, _topic("absent")], from_beginning=True)
    try:
        assert not tail.reached_end(), "nothing read yet"
        read, deadline = 0, time.monotonic() + 30
        while read < 30 and time.monotonic() < deadline:
            read += sum(map(len, tail.poll(200).values()))
        assert read == 30
        tail.poll(200)  # (positions move past what was handed over)
        assert tail.reached_end()
    finally:
        tail.close()


def test_a_transaction_commits_output_and_offsets_together(kafka_bootstrap, kafka_client):
    source_topic, output, group = _topic("tx-in"), _topic("tx-out"), _topic("g")
    settings = dict(group_id=group, exactly_once=True, session_timeout_ms=6000)
    client = _client(kafka_bootstrap, kafka_client, transactional_id=_topic("tx"), **settings)
    client.ensure_topics({source_topic: {"num_partitions": 2}, output: {"num_partitions": 1}})
    _produce(client, source_topic, 20, 2)
    member = Member(client, source_topic)
    read = member.read(20)
    sink = client.sink(transaction_timeout_ms=30000)
    assert sink.transactional
    for partition, offset, value in read:
        sink.send(output, None, value, headers=[("from", f"{partition[1]}:{offset}".encode())])
    sink.commit(_next_offsets(read), member.source.group_metadata())
    sink.close()
    member.source.close()

    aborted = _client(kafka_bootstrap, kafka_client, transactional_id=_topic("tx"), **settings)
    loser = aborted.sink(transaction_timeout_ms=30000)
    for i in range(5):
        loser.send(output, None, f"aborted-{i}".encode())
    loser.flush()
    loser.close()  # open transaction: aborted

    seen = consume(kafka_bootstrap, output, idle_s=2, committed_only=True)
    assert sorted(int(r.value) for r in seen) == list(range(20))
    assert len(consume(kafka_bootstrap, output, idle_s=2)) == 25, "aborted ones were written"
    after = Member(_client(kafka_bootstrap, kafka_client, **settings), source_topic)
    assert after.read(1, timeout_s=8) == [], "the offsets were committed with the output"
    after.source.close()


def test_keepalive_keeps_the_member_while_it_is_busy(kafka_bootstrap, kafka_client):
    topic = _topic("alive")
    client = _client(
        kafka_bootstrap,
        kafka_client,
        group_id=_topic("g"),
        session_timeout_ms=6000,
        max_poll_interval_ms=6000,
        max_poll_records=10,
    )
    client.ensure_topics({topic: {"num_partitions": 1}})
    _produce(client, topic, 60, 1)
    member = Member(client, topic)
    first = member.poll(5000) or member.read(1)
    assert first
    busy_until = time.monotonic() + 9  # longer than max.poll.interval.ms without a real poll
    while time.monotonic() < busy_until:
        member.source.keepalive()
        time.sleep(0.3)
    rest = member.read(60 - len(first), timeout_s=20)
    events = [kind for kind, _ in member.events]
    member.source.close()
    assert events == ["assigned"], "never evicted nor rebalanced"
    offsets = [o for _, o, _ in first + rest]
    assert offsets == list(range(60)), "keep-alive polls hand over no records and lose none"


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    with secure_broker(tmp_path_factory.mktemp("tls")) as (address, certs):
        yield address, certs


def _sasl(cafile, password: str = PASSWORD) -> dict:
    return dict(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username=USER,
        sasl_password=password,
        ssl_cafile=str(cafile),
    )


def test_sasl_ssl_carries_records_and_refuses_wrong_credentials_at_once(secure, kafka_client):
    address, certs = secure
    topic = _topic("sasl")
    client = _client(address, kafka_client, group_id=_topic("g"), **_sasl(certs["ca"]))
    client.check()
    client.ensure_topics({topic: {"num_partitions": 2}})
    _produce(client, topic, 30, 2)
    member = Member(client, topic)
    assert sorted(int(v) for _, _, v in member.read(30)) == list(range(30))
    member.source.close()
    for wrong, reason in [
        (_sasl(certs["ca"], "not-the-password"), "Authentication"),
        (_sasl(certs["other_ca"]), "(?i)certificate"),
    ]:
        started = time.monotonic()
        with pytest.raises(KafkaConnectError, match=reason) as raised:
            _client(address, kafka_client, **wrong).check()
        assert time.monotonic() - started < 30, "an error, not a hang"
        assert PASSWORD not in str(raised.value) and address in str(raised.value)


def test_a_broker_nobody_answers_for_is_one_error_not_the_clients_retries(
    kafka_client, monkeypatch, caplog
):
    import logging

    from pipeline.kafka_io import confluent, kafka_python

    module = kafka_python if kafka_client == "kafka-python" else confluent
    monkeypatch.setattr(module._admin, "__defaults__", (2000 if module is kafka_python else 2.0,))
    with caplog.at_level(logging.WARNING), pytest.raises(KafkaConnectError, match="127.0.0.1:1"):
        _client("127.0.0.1:1", kafka_client).check()  # nothing listens on port 1
    # what the command line shows of the clients' logs (WARNING and above): each retry was a
    # line or two, about 50 in all before the error
    shown = [r for r in caplog.records if r.levelno >= logging.WARNING and "kafka" in r.name]
    assert not shown, [r.getMessage()[:80] for r in shown[:3]]


def test_an_unknown_client_is_refused_naming_the_setting(kafka_bootstrap):
    with pytest.raises(ConfigError, match="kafka_client"):
        KafkaConnection(kafka_bootstrap, kafka_client="librdkafka")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_fleet_detector(tmp_path_factory.mktemp("fleet"))


def test_the_worker_writes_the_same_events_and_dead_letters_on_every_client(
    kafka_bootstrap, create_topic, trained
):
    from tests.worker_support import fleet

    stream = fleet(seed=5, keys=4, readings_per_key=400)
    items = [(k.encode(), v) for k, v in zip(stream.keys.tolist(), stream.payloads(), strict=True)]
    items[7] = (items[7][0], b"{broken")
    items[300] = (items[300][0], orjson.dumps({"key": "x", "ts": 1, "values": {}}))
    written = {}
    for kafka_client in CLIENTS:
        topics = names(f"parity-{kafka_client}")
        create_topic(topics["input"], partitions=3)
        _produce_items(kafka_bootstrap, topics["input"], items)
        settings = worker_settings(
            kafka_bootstrap, topics, trained.artifact_dir, emit_all=True, kafka_client=kafka_client
        )
        _, stats = run_worker(settings)
        events = [orjson.loads(r.value) for r in consume(kafka_bootstrap, topics["output"])]
        letters = consume(kafka_bootstrap, topics["dlq"])
        by_reason = defaultdict(list)
        for letter in letters:
            headers = {name: value.decode() for name, value in letter.headers}
            by_reason[headers["aewatch.dlq.reason"]].append(
                (int(headers["aewatch.source.partition"]), int(headers["aewatch.source.offset"]))
            )
        written[kafka_client] = (
            stats.windows_scored,
            sorted(e["id"] for e in events),
            {reason: sorted(offsets) for reason, offsets in by_reason.items()},
        )
    assert written["kafka-python"][0] > 0
    assert set(written["kafka-python"][2]) == {"decode_error", "schema_mismatch"}
    assert written["confluent"] == written["kafka-python"]


def _produce_items(bootstrap: str, topic: str, items: list) -> None:
    sink = open_client(KafkaConnection(bootstrap)).sink()
    for key, value in items:
        sink.send(topic, key, value)
    sink.flush()
    sink.close()


def test_a_session_timeout_the_broker_refuses_is_one_line_naming_the_setting(
    kafka_bootstrap, kafka_client
):
    """Above the broker's group.max.session.timeout.ms (30 minutes by default) the join fails:
    it was a 20-line traceback out of the first poll, after "worker ready"."""
    topic = _topic("sto")
    client = _client(kafka_bootstrap, kafka_client)
    client.ensure_topics({topic: {}})
    too_long = dict(session_timeout_ms=2_000_000, max_poll_interval_ms=2_000_000)
    refused = _client(kafka_bootstrap, kafka_client, group_id=_topic("g"), **too_long)
    member = Member(refused, topic)
    with pytest.raises(ConfigError) as error:
        member.read(1, timeout_s=20)
    assert error.value.setting == "session_timeout_ms"
    assert "2000000" in str(error.value)


def test_a_transaction_timeout_the_broker_refuses_is_one_line_naming_the_setting(
    kafka_bootstrap, kafka_client
):
    """--exactly-once asks for 4 x the commit interval; over the broker's
    transaction.max.timeout.ms (15 minutes by default) it was the client's own error."""
    client = _client(kafka_bootstrap, kafka_client, group_id=_topic("g"), exactly_once=True)
    with pytest.raises(ConfigError) as error:
        client.sink(transaction_timeout_ms=1_200_000)
    assert error.value.setting == "commit_interval_ms"
    assert "1200000" in str(error.value)


def test_the_latest_values_wait_for_a_transaction_left_open(kafka_bootstrap, kafka_client):
    """A worker killed between sending its state and committing, and not back under its
    transactional id, leaves a transaction open: read_committed stops before it, and the newer
    state committed after it was not read (the worker restored the older one, and emitted again
    what it had committed)."""
    topic = _topic("settle")
    client = _client(kafka_bootstrap, kafka_client)
    client.ensure_topics({topic: {"num_partitions": 1}})
    transactional = dict(group_id=_topic("g"), exactly_once=True)

    def committed(value: bytes) -> None:
        writer = _client(
            kafka_bootstrap, kafka_client, transactional_id=_topic("tx"), **transactional
        )
        sink = writer.sink(transaction_timeout_ms=10_000)
        sink.send(topic, b"p", value)
        sink.commit({}, None)
        sink.close()

    committed(b"old")
    zombie = _client(kafka_bootstrap, kafka_client, transactional_id=_topic("tx"), **transactional)
    left_open = zombie.sink(transaction_timeout_ms=2_000)
    left_open.send(topic, b"p", b"never committed")
    left_open.flush()
    committed(b"new")
    assert client.read_latest(topic) == {b"p": b"new"}
    # the broker aborted its transaction: a producer fenced meanwhile may say so as it closes
    with contextlib.suppress(KafkaException, KafkaError):
        left_open.close()

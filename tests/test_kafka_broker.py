"""The broker the tests use is a real Kafka: partitions, idempotent producer, group commits."""

from __future__ import annotations

import time
from collections import defaultdict

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

pytestmark = pytest.mark.kafka


def _consume_all(consumer: KafkaConsumer, expected: int, timeout_s: float = 30) -> list:
    records = []
    deadline = time.monotonic() + timeout_s
    while len(records) < expected and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    return records


def test_keyed_messages_commit_and_order(kafka_bootstrap: str, create_topic, unique_topic: str):
    topic = create_topic(unique_topic, partitions=3)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True, acks="all")
    sent = defaultdict(list)
    for i in range(1000):
        key = f"machine-{i % 7}"
        sent[key].append(i)
        producer.send(topic, key=key.encode(), value=str(i).encode())
    producer.flush()
    producer.close()

    group = f"g-{unique_topic}"
    first = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    records = _consume_all(first, 1000)
    assert len(records) == 1000
    partitions_used = {r.partition for r in records}
    assert partitions_used == {0, 1, 2}, "keys should spread over all three partitions"

    received = defaultdict(list)
    last_offset: dict[TopicPartition, int] = {}
    for r in records:
        received[r.key.decode()].append(int(r.value))
        tp = TopicPartition(r.topic, r.partition)
        last_offset[tp] = max(last_offset.get(tp, -1), r.offset)
    assert dict(received) == dict(sent), "per-key order must be preserved"

    # Kafka stores the offset of the NEXT record to read, hence + 1.
    first.commit({tp: OffsetAndMetadata(off + 1, "", -1) for tp, off in last_offset.items()})
    first.close()

    second = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    again = _consume_all(second, 1, timeout_s=8)
    committed = {tp: second.committed(tp) for tp in last_offset}
    second.close()
    assert again == [], "a second member of the group must not see committed messages again"
    assert committed == {tp: off + 1 for tp, off in last_offset.items()}

"""A confluent-kafka poll's messages grouped by partition and read column-wise, checked against a
message-by-message reference on polls of many shapes."""

import logging

import numpy as np
import pytest
from confluent_kafka import KafkaError, Message

from pipeline.kafka_io.confluent_records import group


def _poll(rng: np.random.Generator, runs: int, errors: bool = False, topics: int = 2) -> list:
    """Messages in runs of one (topic, partition), a partition coming back in later runs, with
    offsets rising per partition; with `errors` some end-of-partition and other errors between."""
    offsets: dict[tuple[str, int], int] = {}
    messages = []
    for _ in range(runs):
        partition = (f"t{rng.integers(topics)}", int(rng.integers(4)))
        for _ in range(int(rng.integers(1, 6))):
            offset = offsets.get(partition, 0)
            offsets[partition] = offset + 1
            topic, number = partition
            key = f"k{offset % 3}".encode()
            value = f"{topic}-{number}-{offset}".encode()
            messages.append(
                Message(topic=topic, partition=number, offset=offset, key=key, value=value)
            )
        if errors and rng.random() < 0.3:
            code = KafkaError._PARTITION_EOF if rng.random() < 0.5 else KafkaError._TRANSPORT
            messages.append(
                Message(topic=partition[0], partition=partition[1], error=KafkaError(code))
            )
    return messages


def _reference(messages: list) -> dict:
    out: dict = {}
    for m in messages:
        if m.error() is None:
            out.setdefault((m.topic(), m.partition()), []).append((m.key(), m.value(), m.offset()))
    return out


def _columns(grouped: dict) -> dict:
    out = {}
    for partition, records in grouped.items():
        keys, values, offsets = records.columns()
        out[partition] = list(zip(keys, values, offsets, strict=True))
    return out


@pytest.mark.parametrize("errors", [False, True], ids=["clean", "with errors"])
def test_a_poll_is_grouped_by_partition_in_order(errors):
    rng = np.random.default_rng(7)
    for runs in [1, 2, 5, 40] * 10:
        messages = _poll(rng, runs, errors)
        grouped = group(messages)
        assert _columns(grouped) == _reference(messages)
        # the same messages, as records one by one
        for partition, records in grouped.items():
            assert [(r.topic, r.partition) for r in records] == [partition] * len(records)
            assert [r.offset for r in records] == [r.offset for r in records[:]]


@pytest.mark.parametrize("errors", [False, True], ids=["clean", "with errors"])
def test_a_poll_of_one_topic_is_grouped_by_partition_number(errors):
    """A member of one topic tells runs apart by partition number; the groups carry the topic."""
    rng = np.random.default_rng(11)
    for runs in [1, 2, 5, 40] * 10:
        messages = _poll(rng, runs, errors, topics=1)
        assert _columns(group(messages, "t0")) == _reference(messages) == _columns(group(messages))


def test_errors_other_than_the_end_of_a_partition_are_logged(caplog):
    messages = [
        Message(topic="t", partition=0, offset=0, key=b"k", value=b"a"),
        Message(topic="t", partition=0, error=KafkaError(KafkaError._PARTITION_EOF)),
        Message(topic="t", partition=1, error=KafkaError(KafkaError._TRANSPORT)),
        Message(topic="t", partition=0, offset=1, key=b"k", value=b"b"),
    ]
    with caplog.at_level(logging.WARNING, logger="pipeline.kafka_io.confluent_records"):
        grouped = group(messages)
    assert _columns(grouped) == {("t", 0): [(b"k", b"a", 0), (b"k", b"b", 1)]}
    assert len(caplog.records) == 1 and "_TRANSPORT" in caplog.records[0].getMessage()

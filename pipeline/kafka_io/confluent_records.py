"""What the confluent-kafka client reads: a poll's messages kept as librdkafka gives them
(`Records`, one per partition, read column-wise by the intake), records made only when asked for
(`ConfluentRecord`), and the tail that reads topics outside any group (`ConfluentTail`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from pipeline.kafka_io.confluent_sink import config
from pipeline.kafka_io.protocols import Partition
from pipeline.kafka_io.settings import KafkaConnection

__all__ = ["FETCHING", "ConfluentRecord", "ConfluentTail", "Records", "group", "take"]

log = logging.getLogger(__name__)
# How often a tail looks for partitions of its topics that it has not assigned yet.
TAIL_METADATA_S = 1.0
# How every consumer fetches. The broker answers within 10 ms when it has less than a fetch's
# minimum. When the messages fetched ahead reach `queued.min.messages` (100,000; librdkafka
# counts them over all the consumer's partitions), librdkafka fetches nothing for
# `fetch.queue.backoff.ms`, 1 s by default, however soon the application reads them: a member
# catching up on a backlog stalled for most of each second (measured on 200,000 readings: 152,000
# records/s with the default, 600,000 with 20 ms).
FETCHING = {"fetch.wait.max.ms": 10, "fetch.queue.backoff.ms": 20}
# A message's fields, called over a poll's list by `map`: no Python frame per message.
_ERROR, _TOPIC, _PARTITION = Message.error, Message.topic, Message.partition
_KEY, _VALUE, _OFFSET = Message.key, Message.value, Message.offset


class ConfluentRecord:
    """One message as the `Record` protocol describes it (made only when asked for)."""

    __slots__ = ("headers", "key", "offset", "partition", "timestamp", "topic", "value")

    def __init__(self, message) -> None:
        self.topic = message.topic()
        self.partition = message.partition()
        self.offset = message.offset()
        self.key = message.key()
        self.value = message.value()
        self.headers = message.headers()
        self.timestamp = message.timestamp()[1]

    def __repr__(self) -> str:
        return f"ConfluentRecord({self.topic}[{self.partition}]@{self.offset})"


class Records(Sequence):
    """A partition's messages of one poll, as a sequence of records; `columns()` gives their
    keys, values and offsets as lists without making a record per message."""

    __slots__ = ("messages",)

    def __init__(self, messages: list) -> None:
        self.messages = messages

    def __len__(self) -> int:
        return len(self.messages)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [ConfluentRecord(m) for m in self.messages[index]]
        return ConfluentRecord(self.messages[index])

    def columns(self) -> tuple[list, list, list]:
        messages = self.messages
        return list(map(_KEY, messages)), list(map(_VALUE, messages)), list(map(_OFFSET, messages))


def take(consumer: Consumer, most: int, timeout_ms: int) -> list:
    """Up to `most` messages: those already fetched, or else the first to arrive within
    `timeout_ms` and those fetched with it. (`Consumer.consume` alone waits for its whole
    timeout unless `most` messages come, which holds records back that are already there.)"""
    messages = consumer.consume(most, 0)
    if messages or timeout_ms <= 0:
        return messages
    first = consumer.poll(timeout_ms / 1000.0)
    if first is None:
        return []
    return [first, *consumer.consume(most - 1, 0)] if most > 1 else [first]


def group(messages: list, topic: str | None = None) -> dict[Partition, Records]:
    """Messages by partition, in order; errors (other than the end of a partition) logged.
    librdkafka hands messages over in runs of one partition (a fetch response's batch each):
    the runs are found by numpy over the messages' partition numbers and sliced at C level,
    without a step of Python per message. `topic`: the one topic every message is of (a member
    of one topic), whose runs are then told apart by partition number alone, without making
    each message's topic name."""
    if not messages:
        return {}
    if any(map(_ERROR, messages)):
        return _group_checked(messages)
    n = len(messages)
    numbers = np.fromiter(map(_PARTITION, messages), np.int64, count=n)
    change = numbers[1:] != numbers[:-1]
    if topic is None:
        topics = np.array(list(map(_TOPIC, messages)), dtype=object)
        change |= topics[1:] != topics[:-1]
    starts = [0, *(np.flatnonzero(change) + 1).tolist()]
    names = topics[starts].tolist() if topic is None else [topic] * len(starts)
    partitions = zip(names, numbers[starts].tolist(), strict=True)
    out: dict[Partition, list] = {}
    for start, end, partition in zip(starts, [*starts[1:], n], partitions, strict=True):
        batch = out.get(partition)
        if batch is None:
            out[partition] = messages[start:end]
        else:
            batch.extend(messages[start:end])
    return {p: Records(batch) for p, batch in out.items()}


# Join errors that no retry mends: raised out of the poll rather than logged at each one.
FATAL_JOIN = (KafkaError.INVALID_SESSION_TIMEOUT,)


def _group_checked(messages: list) -> dict[Partition, Records]:
    """`group` of a poll that holds errors: message by message."""
    out: dict[Partition, list] = {}
    for message in messages:
        error = message.error()
        if error is not None:
            if error.code() in FATAL_JOIN:  # it would be logged at every poll, never joining
                raise KafkaException(error)
            if error.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer: %s", error)
            continue
        partition = (message.topic(), message.partition())
        batch = out.get(partition)
        if batch is None:
            out[partition] = [message]
        else:
            batch.append(message)
    return {p: Records(batch) for p, batch in out.items()}


class ConfluentTail:
    """Reads topics outside any consumer group, from their start or their end: every partition
    of the topics is assigned, including partitions that appear later."""

    def __init__(
        self,
        connection: KafkaConnection,
        topics: Sequence[str],
        *,
        from_beginning: bool,
        read_committed: bool,
        client_id: str = "aewatch",
    ) -> None:
        conf = config(connection, client_id)
        conf.update(
            {
                "group.id": "aewatch-tail",  # librdkafka wants one; no offsets are ever committed
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "isolation.level": "read_committed" if read_committed else "read_uncommitted",
                **FETCHING,
            }
        )
        self.consumer = Consumer(conf)
        self.topics = list(topics)
        self.start = OFFSET_BEGINNING if from_beginning else OFFSET_END
        self.assigned: set[Partition] = set()
        self._looked = float("-inf")
        self._look()

    def _look(self) -> None:
        self._looked = time.monotonic()
        new = []
        for topic in self.topics:
            try:
                metadata = self.consumer.list_topics(topic, timeout=5)
            except KafkaException:
                continue
            found = metadata.topics.get(topic)
            if found is None or found.error is not None:
                continue
            for p in found.partitions:
                if (topic, p) not in self.assigned:
                    new.append(TopicPartition(topic, p, self.start))
                    self.assigned.add((topic, p))
        if new:
            self.consumer.incremental_assign(new)

    def poll(self, timeout_ms: int) -> dict[Partition, Records]:
        if time.monotonic() - self._looked > TAIL_METADATA_S:
            self._look()
        messages = take(self.consumer, 10000, timeout_ms)
        return group(messages)

    def end_offsets(self) -> dict[Partition, int]:
        """The end offset now of each assigned partition that holds records."""
        end = {}
        for partition in self.assigned:
            _, high = self.consumer.get_watermark_offsets(TopicPartition(*partition), timeout=10)
            if high > 0:
                end[partition] = high
        return end

    def drop_reached(self, end: dict[Partition, int]) -> None:
        """Forget the partitions of `end` whose position has reached their end offset (a
        position not yet known is negative)."""
        for tp in self.consumer.position([TopicPartition(*p) for p in end]) if end else ():
            if tp.offset >= end[(tp.topic, tp.partition)]:
                del end[(tp.topic, tp.partition)]

    def reached_end(self) -> bool:
        self._look()
        end = self.end_offsets()
        self.drop_reached(end)
        return not end

    def close(self) -> None:
        self.consumer.close()

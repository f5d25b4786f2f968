"""The Kafka client on confluent-kafka (librdkafka): the only module of aewatch that imports it.

`ConfluentClient(settings)` makes the same sources, sinks and tails as the kafka-python client
(`pipeline.kafka_io.kafka_python`), with the same behaviour; it is faster because librdkafka
fetches and parses records in C. Installed with the `fast` extra (`pip install 'aewatch[fast]'`)
and chosen with `--kafka-client confluent`.

What differs under the hood, and how the protocols stay the same:

- a poll's messages are kept as they come (`Records`, one per partition) and read column-wise by
  the intake (`Records.columns`); a record is wrapped in an object only when asked for;
- librdkafka assigns partitions after the rebalance callback returns, so a seek the worker asks
  for inside `on_assigned` becomes the assigned partition's start offset;
- a tail (no group) assigns every partition of its topics itself, as they appear.

The producers live in `pipeline.kafka_io.confluent_sink`, the records and the tail in
`pipeline.kafka_io.confluent_records`.

Size: over 400 lines because the group member (rebalance callbacks, seeks, commits waited for
or not) and the admin side mirror `pipeline.kafka_io.kafka_python` call for call.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable, Mapping, Sequence

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ConfigSource,
    NewTopic,
)

from pipeline.errors import CommitRejected
from pipeline.kafka_io import topics as topics_
from pipeline.kafka_io.confluent_records import FETCHING, ConfluentTail, Records, group, take
from pipeline.kafka_io.confluent_sink import (
    LOGGER,
    ConfluentSink,
    TransactionalConfluentSink,
    config,
)
from pipeline.kafka_io.errors import (
    KafkaConnectError,
    RefusedCommits,
    describe,
    most_telling,
    session_timeout_refused,
    telling,
)
from pipeline.kafka_io.protocols import Partition, Rebalance, TopicSpec
from pipeline.kafka_io.settings import KafkaConnection, KafkaSettings

__all__ = ["ConfluentClient", "ConfluentSource"]

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 15.0
CONNECT_ATTEMPT_S = 3.0
ASSIGNORS = {
    "range": "range",
    "roundrobin": "roundrobin",
    "cooperative-sticky": "cooperative-sticky",
}
# Refusals of a commit that mean "this member no longer owns what it commits".
REJECTED = {
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError.FENCED_INSTANCE_ID,
    KafkaError._ASSIGNMENT_LOST,
    KafkaError._STATE,
}


def _tps(partitions) -> set[Partition]:
    return {(tp.topic, tp.partition) for tp in partitions}


class ConfluentSource:
    """A consumer-group member with manual commits; rebalances call back into the worker."""

    def __init__(
        self,
        settings: KafkaSettings,
        topics: Sequence[str],
        pattern: str | None,
        rebalance: Rebalance,
    ) -> None:
        self.rebalance = rebalance
        self.max_records = settings.max_poll_records
        self.session_timeout_ms = settings.session_timeout_ms
        # a member of one topic groups its polls by partition number alone
        self.topic = topics[0] if len(topics) == 1 and not pattern else None
        self.cooperative = settings.assignor == "cooperative-sticky"
        self._seeks: dict[Partition, int] | None = None  # seeks asked for inside on_assigned
        self._closing = False
        self.refused = RefusedCommits()  # of commits not waited for
        conf = config(settings.connection, settings.client_id)
        conf.update(
            {
                "group.id": settings.group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": settings.session_timeout_ms,
                "heartbeat.interval.ms": max(300, settings.session_timeout_ms // 4),
                "max.poll.interval.ms": settings.max_poll_interval_ms,
                **FETCHING,
                "topic.metadata.refresh.interval.ms": 5000,
                "partition.assignment.strategy": ASSIGNORS[settings.assignor],
                "isolation.level": (
                    "read_committed" if settings.exactly_once else "read_uncommitted"
                ),
                # (librdkafka reports the commits waited for there as well)
                "on_commit": self.refused.reported,
            }
        )
        if settings.group_instance_id:
            conf["group.instance.id"] = settings.group_instance_id
        self.consumer = Consumer(conf)
        subscription = [pattern if pattern.startswith("^") else f"^{pattern}"] if pattern else []
        self.consumer.subscribe(
            subscription or list(topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    # -- rebalance callbacks (run inside poll and close) -------------------------------------------
    def _on_assign(self, consumer, partitions) -> None:
        self._seeks = {}
        try:
            if not self._closing and partitions:
                self.rebalance.on_assigned(_tps(partitions))
        finally:
            seeks, self._seeks = self._seeks, None
        for tp in partitions:
            offset = seeks.get((tp.topic, tp.partition))
            if offset is not None:
                tp.offset = offset
        if self.cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)

    def _on_revoke(self, consumer, partitions) -> None:
        try:
            if not self._closing and partitions:
                self.rebalance.on_revoked(_tps(partitions))
        finally:
            if self.cooperative:
                consumer.incremental_unassign(partitions)
            else:
                consumer.unassign()

    def _on_lost(self, consumer, partitions) -> None:
        # Evicted from the group: these partitions cannot be committed any more. Drop them; their
        # new owner re-reads from the last commit.
        try:
            if not self._closing and partitions:
                self.rebalance.on_revoked(_tps(partitions), lost=True)
        finally:
            if self.cooperative:
                consumer.incremental_unassign(partitions)
            else:
                consumer.unassign()

    # -- the Source protocol -----------------------------------------------------------------------
    def poll(self, timeout_ms: int) -> dict[Partition, Records]:
        messages = take(self.consumer, self.max_records, timeout_ms)
        try:
            return group(messages, self.topic)
        except KafkaException as exc:
            if exc.args[0].code() == KafkaError.INVALID_SESSION_TIMEOUT:
                raise session_timeout_refused(self.session_timeout_ms) from None
            raise

    def keepalive(self) -> None:
        """A poll with every partition paused: it resets the max.poll.interval.ms clock and runs
        a pending rebalance, whose callbacks reach the worker, but hands over no records (any
        that come anyway are read again by the next real poll)."""
        paused = self.consumer.assignment()
        self.consumer.pause(paused)
        try:
            polled = self.poll(0)
        finally:
            held = _tps(self.consumer.assignment())
            self.consumer.resume([tp for tp in paused if (tp.topic, tp.partition) in held])
        self.seek({p: records.messages[0].offset() for p, records in polled.items()})

    def seek(self, offsets: Mapping[Partition, int]) -> None:
        if self._seeks is not None:  # inside on_assigned: the assignment starts there
            self._seeks.update(offsets)
            return
        for (topic, partition), offset in offsets.items():
            tp = TopicPartition(topic, partition, offset)
            deadline = time.monotonic() + 5.0
            while True:
                try:
                    self.consumer.seek(tp)
                    break
                except KafkaException as exc:
                    # a partition assigned moments ago may not be fetching yet
                    if exc.args[0].code() != KafkaError._STATE or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)

    def commit(self, offsets: Mapping[Partition, int], *, wait: bool = True) -> None:
        if not offsets:
            return
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        if not wait:  # its outcome comes back to `RefusedCommits.reported` in a later poll
            try:
                self.consumer.commit(offsets=tps, asynchronous=True)
            except KafkaException as exc:  # (not even sent: no group coordinator yet)
                self.refused.add(set(offsets), exc.args[0])
            return
        try:
            results = self.consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() in REJECTED:
                raise CommitRejected(str(exc.args[0])) from exc
            raise
        for tp in results or ():
            if tp.error is not None:
                raise CommitRejected(f"{tp.topic}[{tp.partition}]: {tp.error}")

    def refused_commits(self) -> set[Partition]:
        return self.refused.take()

    def highwaters(self, partitions: Iterable[Partition]) -> dict[Partition, int]:
        """The log-end offsets last seen in fetch responses (no network call)."""
        out = {}
        for partition in partitions:
            try:
                _, high = self.consumer.get_watermark_offsets(
                    TopicPartition(*partition), cached=True
                )
            except KafkaException:
                continue
            if high >= 0:
                out[partition] = high
        return out

    def group_metadata(self) -> object:
        return self.consumer.consumer_group_metadata()

    def close(self) -> None:
        self._closing = True  # leaving the group revokes everything; the worker already left
        try:
            self.consumer.close()
        except KafkaException as exc:
            log.warning("closing the consumer: %s", exc)


def _admin(connection: KafkaConnection, timeout_s: float = CONNECT_TIMEOUT_S):
    """An admin client that has reached the cluster, or a `KafkaConnectError` that says why
    not: at once for wrong credentials or an untrusted certificate, after `timeout_s` for a
    broker that does not answer."""
    errors: list[BaseException] = []
    conf = config(connection, "aewatch-admin")
    conf["error_cb"] = lambda error: errors.append(KafkaException(error))
    if LOGGER.getEffectiveLevel() > logging.DEBUG:  # collected, not shown: the error says why
        conf["log_level"] = 0
    admin = AdminClient(conf)
    deadline = time.monotonic() + timeout_s
    while True:
        attempt = max(0.1, min(CONNECT_ATTEMPT_S, deadline - time.monotonic()))
        try:
            admin.list_topics(timeout=attempt)
            return admin
        except KafkaException as exc:
            admin.poll(0)  # serves the error callbacks: why the connections failed
            reason = most_telling(errors) or f"KafkaException: {exc.args[0]}"
            if telling(reason) < 2 or time.monotonic() >= deadline:
                del admin  # stops its threads, which would retry for ever
                raise KafkaConnectError(
                    f"cannot connect to {describe(connection)}: {reason}"
                ) from None


def _topic_settings(admin: AdminClient, topic: str, names: Iterable[str]) -> topics_.Current:
    (future,) = admin.describe_configs([ConfigResource("topic", topic)]).values()
    found = future.result(timeout=10)
    return {
        name: (found[name].value, found[name].source == ConfigSource.DYNAMIC_TOPIC_CONFIG.value)
        for name in names
        if name in found
    }


def _set_topic_settings(admin: AdminClient, topic: str, settings: Mapping[str, str]) -> None:
    entries = [
        ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)
        for name, value in settings.items()
    ]
    resource = ConfigResource("topic", topic, incremental_configs=entries)
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=10)


class ConfluentClient:
    """The `KafkaClient` of one cluster on confluent-kafka."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self.connection = settings.connection

    def check(self) -> None:
        _admin(self.connection)

    def ping(self, request_timeout_ms: int = 5000) -> None:
        admin = AdminClient(config(self.connection, "aewatch-admin"))
        admin.list_topics(timeout=request_timeout_ms / 1000.0)

    def missing_topic(self, topic: str) -> bool:
        admin = _admin(self.connection)
        metadata = admin.list_topics(timeout=10)
        if topic in metadata.topics:
            return False
        try:
            resource = ConfigResource("broker", str(next(iter(metadata.brokers))))
            (future,) = admin.describe_configs([resource]).values()
            return future.result(timeout=10)["auto.create.topics.enable"].value == "false"
        except (KafkaException, KeyError, StopIteration):  # not allowed to ask, or not told
            return False

    def ensure_topics(self, topics: Mapping[str, TopicSpec]) -> None:
        """Create topics that do not exist yet; give those that do the settings they lack."""
        admin = _admin(self.connection)
        existing = set(admin.list_topics(timeout=10).topics)
        wanted = [
            NewTopic(
                name,
                num_partitions=topics_.partitions(spec),
                replication_factor=topics_.replication(spec),
                config=topics_.configs(spec),
            )
            for name, spec in topics.items()
            if name not in existing
        ]
        for future in admin.create_topics(wanted, operation_timeout=10).values() if wanted else ():
            try:
                future.result()
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
        topics_.settle_existing(
            topics,
            existing,
            functools.partial(_topic_settings, admin),
            functools.partial(_set_topic_settings, admin),
        )

    def source(self, topics: Sequence[str], pattern: str | None, rebalance: Rebalance):
        return ConfluentSource(self.settings, topics, pattern, rebalance)

    def sink(
        self,
        *,
        max_record_bytes: int = 1_048_576,
        linger_ms: int = 1,
        transaction_timeout_ms: int | None = None,
    ):
        if transaction_timeout_ms is None:
            return ConfluentSink(
                self.settings, max_record_bytes=max_record_bytes, linger_ms=linger_ms
            )
        return TransactionalConfluentSink(
            self.settings,
            max_record_bytes=max_record_bytes,
            linger_ms=linger_ms,
            transaction_timeout_ms=transaction_timeout_ms,
        )

    def tail(self, topics: Sequence[str], *, from_beginning: bool, read_committed: bool = False):
        return ConfluentTail(
            self.connection,
            topics,
            from_beginning=from_beginning,
            read_committed=read_committed,
            client_id=self.settings.client_id,
        )

    def read_all(self, topic: str, timeout_s: float = 60.0) -> list:
        """Every record of a topic, from its start to its end when called (partition order)."""
        tail = ConfluentTail(self.connection, [topic], from_beginning=True, read_committed=True)
        consumer = tail.consumer
        try:
            end = tail.end_offsets()
            limit, out = dict(end), []
            deadline = time.monotonic() + timeout_s
            while end:
                if time.monotonic() > deadline:
                    raise KafkaException(f"reading {topic} did not finish in {timeout_s:.0f}s")
                for partition, records in tail.poll(500).items():
                    out.extend(r for r in records if r.offset < limit.get(partition, 0))
                tail.drop_reached(end)
            return out
        finally:
            consumer.close()

    def read_latest(
        self, topic: str, keys: Iterable[bytes] | None = None, timeout_s: float = 30.0
    ) -> dict[bytes, bytes]:
        """The latest value per key of a (compacted) topic, read from the beginning to its end
        (its last stable offset: what committed transactions wrote)."""
        probe = ConfluentTail(self.connection, [topic], from_beginning=True, read_committed=False)
        try:
            high = probe.end_offsets()
        finally:
            probe.consumer.close()
        tail = ConfluentTail(self.connection, [topic], from_beginning=True, read_committed=True)
        consumer = tail.consumer
        wanted = set(keys) if keys is not None else None
        try:
            end = dict(topics_.settled(tail.end_offsets, high, topic))
            latest: dict[bytes, bytes] = {}
            deadline = time.monotonic() + timeout_s
            while end:
                if time.monotonic() > deadline:
                    raise KafkaException(f"reading {topic} did not finish in {timeout_s:.0f}s")
                for records in tail.poll(500).values():
                    for message in records.messages:
                        key = message.key()
                        if wanted is None or key in wanted:
                            value = message.value()
                            if value is None:
                                latest.pop(key, None)
                            else:
                                latest[key] = value
                tail.drop_reached(end)
            return latest
        finally:
            consumer.close()

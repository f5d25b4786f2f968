"""Kafka adapters: the only module that imports kafka-python.

The worker talks to a `Source` (poll, commit, rebalance callbacks) and a `Sink` (send, flush);
tests use in-memory fakes with the same shape. Records are kafka-python's `ConsumerRecord`s or
anything with `topic, partition, offset, key, value, headers, timestamp`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from kafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    RebalanceInProgressError,
    TopicAlreadyExistsError,
)
from kafka.structs import OffsetAndMetadata

from pipeline.errors import AewatchError, CommitRejected
from pipeline.worker.settings import WorkerSettings

__all__ = [
    "DeliveryError",
    "KafkaConnectError",
    "KafkaSink",
    "KafkaSource",
    "Partition",
    "TransactionalSink",
    "Sink",
    "Source",
    "admin_client",
    "check_connection",
    "ensure_topics",
    "read_latest",
]

log = logging.getLogger(__name__)
Partition = tuple[str, int]
# Poll timeout while the member is (re)joining its group: long enough for the join to complete
# within one poll.
REBALANCE_POLL_MS = 1000
# kafka-python backs off reconnecting exponentially, by default up to 30 s: after a broker
# restart the worker would sit out most of that. Try again at least every second.
RECONNECT_BACKOFF_MAX_MS = 1000
# Producer linger: events are few and each one is awaited by someone; records that arrive while
# a request is in flight are batched anyway.
LINGER_MS = 1
# How long a first connection may take before start-up fails with the reason.
CONNECT_TIMEOUT_MS = 15_000
CONNECT_ATTEMPT_MS = 3_000
ASSIGNORS = {
    "range": RangePartitionAssignor,
    "roundrobin": RoundRobinPartitionAssignor,
    "cooperative-sticky": CooperativeStickyAssignor,
}


class DeliveryError(AewatchError):
    """The producer could not deliver a record; offsets are not committed past it."""


class Source(Protocol):
    def poll(self, timeout_ms: int) -> dict[Partition, list]: ...
    def commit(self, offsets: dict[Partition, int]) -> None: ...
    def close(self) -> None: ...


class Sink(Protocol):
    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
    ) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class _Listener(ConsumerRebalanceListener):
    def __init__(self, on_assigned, on_revoked) -> None:
        self.on_assigned, self.on_revoked = on_assigned, on_revoked

    def on_partitions_revoked(self, revoked) -> None:
        self.on_revoked({(tp.topic, tp.partition) for tp in revoked})

    def on_partitions_assigned(self, assigned) -> None:
        self.on_assigned({(tp.topic, tp.partition) for tp in assigned})

    def on_partitions_lost(self, lost) -> None:
        # Evicted from the group: these partitions cannot be committed any more (and the client
        # cannot block in this callback). Drop them; their new owner re-reads from the last commit.
        self.on_revoked({(tp.topic, tp.partition) for tp in lost}, lost=True)


class KafkaSource:
    """A consumer-group member with manual commits; rebalances call back into the worker."""

    def __init__(
        self,
        settings: WorkerSettings,
        on_assigned: Callable[[set[Partition]], None],
        on_revoked: Callable[[set[Partition]], None],
    ) -> None:
        self.consumer = KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            group_id=settings.group_id,
            client_id=settings.client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=settings.max_poll_records,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=max(300, settings.session_timeout_ms // 4),
            max_poll_interval_ms=settings.max_poll_interval_ms,
            fetch_max_wait_ms=10,
            # A member that joined before its topics' metadata arrived is assigned nothing and
            # rejoins only when refreshed metadata shows the partitions: refresh often.
            metadata_max_age_ms=5000,
            group_instance_id=settings.group_instance_id,
            partition_assignment_strategy=(ASSIGNORS[settings.assignor],),
            isolation_level="read_committed" if settings.exactly_once else "read_uncommitted",
            reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
            **settings.kafka_security(),
        )
        listener = _Listener(on_assigned, on_revoked)
        if settings.input_pattern:
            self.consumer.subscribe(pattern=settings.input_pattern, listener=listener)
        else:
            self.consumer.subscribe(topics=list(settings.input_topic), listener=listener)

    def poll(self, timeout_ms: int) -> dict[Partition, list]:
        coordinator = getattr(self.consumer, "_coordinator", None)
        if coordinator is not None and coordinator.rejoining:
            if not coordinator.need_rejoin():
                # kafka-python 3.0 drops a join that completes while no poll is waiting for it:
                # the member counts as joined, but its assignment is never applied and it would
                # sit idle. Join again; the long poll below lets this join finish inside it.
                log.warning("group join finished between polls; joining again")
                coordinator.request_rejoin()
            timeout_ms = max(timeout_ms, REBALANCE_POLL_MS)
        polled = self.consumer.poll(timeout_ms=timeout_ms)
        return {(tp.topic, tp.partition): records for tp, records in polled.items()}

    def keepalive(self) -> None:
        """Show the group this member is alive while it is busy (a long batch): a poll with every
        partition paused resets the max.poll.interval.ms clock and runs a pending rebalance,
        whose callbacks reach the worker, but hands over no records. Partitions assigned by that
        rebalance are not paused; whatever they return is read again by the next real poll."""
        paused = self.consumer.assignment()
        self.consumer.pause(*paused)
        try:
            polled = self.poll(0)
        finally:
            self.consumer.resume(*(paused & self.consumer.assignment()))
        self.seek({p: records[0].offset for p, records in polled.items() if records})

    def commit(self, offsets: dict[Partition, int]) -> None:
        if not offsets:
            return
        try:
            # Kafka stores the offset of the NEXT record to read; callers pass exactly that.
            self.consumer.commit(
                {
                    TopicPartition(t, p): OffsetAndMetadata(o, "", -1)
                    for (t, p), o in offsets.items()
                }
            )
        except (CommitFailedError, RebalanceInProgressError) as exc:
            raise CommitRejected(str(exc)) from exc

    def seek(self, offsets: dict[Partition, int]) -> None:
        """Read these partitions again from these offsets (the next poll starts there)."""
        for (topic, partition), offset in offsets.items():
            self.consumer.seek(TopicPartition(topic, partition), offset)

    def committed(self, partition: Partition) -> int | None:
        return self.consumer.committed(TopicPartition(*partition))

    def highwaters(self, partitions) -> dict[Partition, int]:
        """The log-end offsets last seen in fetch responses (no network call)."""
        out = {}
        for partition in partitions:
            try:
                highwater = self.consumer.highwater(TopicPartition(*partition))
            except IllegalStateError:  # being revoked: no longer ours to report
                continue
            if highwater is not None:
                out[partition] = highwater
        return out

    def group_metadata(self):
        return self.consumer.group_metadata()

    def close(self) -> None:
        try:
            self.consumer.close(autocommit=False)
        except KafkaError as exc:  # leaving a group we were already evicted from
            log.warning("closing the consumer: %s", exc)


class KafkaSink:
    """An idempotent producer (acks=all); `flush` raises if any record was not delivered."""

    transactional = False

    def __init__(self, settings: WorkerSettings, *, linger_ms: int = LINGER_MS, **extra) -> None:
        self.producer = KafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            client_id=settings.client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            compression_type="lz4",
            max_request_size=max(1_048_576, settings.max_record_bytes + 65536),
            reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
            **settings.kafka_security(),
            **extra,
        )
        self._pending: list = []

    def send(self, topic, key, value, headers=None, partition=None) -> None:
        self._pending.append(
            self.producer.send(
                topic, key=key, value=value, headers=headers or [], partition=partition
            )
        )

    def flush(self) -> None:
        self.producer.flush()
        pending, self._pending = self._pending, []
        for future in pending:
            if future.failed():
                raise DeliveryError(f"a record was not delivered: {future.exception!r}")

    def close(self) -> None:
        self.producer.close()


class TransactionalSink(KafkaSink):
    """Exactly-once output: everything sent between two checkpoints, and the offsets that
    checkpoint commits, form one Kafka transaction.

    The transactional id must be stable per worker: after a crash, the restarted worker's
    `init_transactions` aborts what its predecessor left open, and the consumer group metadata
    sent with the offsets fences a member that lost its partitions (KIP-447)."""

    transactional = True

    def __init__(self, settings: WorkerSettings, *, linger_ms: int = LINGER_MS) -> None:
        super().__init__(
            settings,
            linger_ms=linger_ms,
            transactional_id=settings.transactional_id_value,
            transaction_timeout_ms=max(10_000, 4 * settings.commit_interval_ms),
        )
        self.producer.init_transactions()
        self._open = False

    def send(self, topic, key, value, headers=None, partition=None) -> None:
        if not self._open:
            self.producer.begin_transaction()
            self._open = True
        super().send(topic, key, value, headers, partition)

    def commit(self, offsets: dict[Partition, int], group_metadata) -> None:
        """Commit what was sent and `offsets` (next offset to read) atomically."""
        if not self._open and not offsets:
            return
        if not self._open:
            self.producer.begin_transaction()
            self._open = True
        if offsets:
            self.producer.send_offsets_to_transaction(
                {
                    TopicPartition(t, p): OffsetAndMetadata(o, "", -1)
                    for (t, p), o in offsets.items()
                },
                group_metadata,
            )
        self.producer.commit_transaction()
        self._open = False
        pending, self._pending = self._pending, []
        for future in pending:
            if future.failed():
                raise DeliveryError(f"a record was not delivered: {future.exception!r}")

    def close(self) -> None:
        if self._open:
            with contextlib.suppress(KafkaError):
                self.producer.abort_transaction()
        super().close()


class KafkaConnectError(AewatchError):
    """The cluster cannot be reached or refused us (credentials, TLS); says why."""


class _BootstrapFailures(logging.Handler):
    """Collects why bootstrap connections failed: kafka-python logs each failure (the exception
    is the second argument) and retries until its timeout, then raises a bare timeout."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        if len(args) > 1 and isinstance(args[1], BaseException):
            self.errors.append(args[1])


class _AdminClient(KafkaAdminClient):
    """kafka-python leaves the client's IO thread running (retrying) when the first bootstrap
    fails in the constructor; stop it before passing the failure on."""

    def __init__(self, **configs) -> None:
        try:
            super().__init__(**configs)
        except BaseException:
            if hasattr(self, "_net"):
                self._closed = False
                with contextlib.suppress(Exception):
                    self.close()
            raise


def _telling(text: str) -> int:
    """0 for a refused login, 1 for a refused certificate: failures no retry will mend; 2 else."""
    if "Authentication" in text or "Authorization" in text:
        return 0
    if "CERTIFICATE" in text.upper():  # not any SSL error: a broker still starting can cut TLS
        return 1
    return 2


def _most_telling(errors: list[BaseException]) -> str | None:
    """The failure that explains the most: a refused login or certificate over a bare disconnect
    (after a failed login the broker may just close the socket); the latest among equals."""
    texts = [f"{type(e).__name__}: {e}" for e in errors]
    return min(reversed(texts), key=_telling) if texts else None


def _describe(bootstrap_servers: str, security: dict) -> str:
    protocol = security.get("security_protocol", "PLAINTEXT")
    who = ""
    if security.get("sasl_mechanism"):
        who = f", SASL {security['sasl_mechanism']} as {security.get('sasl_plain_username')!r}"
    return f"Kafka at {bootstrap_servers} ({protocol}{who})"


def admin_client(
    bootstrap_servers: str, security: dict | None = None, timeout_ms: int = CONNECT_TIMEOUT_MS
) -> KafkaAdminClient:
    """An admin client, or a `KafkaConnectError` that says why not: at once for wrong credentials
    or an untrusted certificate, after `timeout_ms` for a broker that does not answer."""
    security = security or {}
    logger = logging.getLogger("kafka.net.manager")
    failures = _BootstrapFailures()
    level, propagate = logger.level, logger.propagate
    if logger.getEffectiveLevel() > logging.WARNING:  # collect the failures without showing them
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    logger.addHandler(failures)
    deadline = time.monotonic() + timeout_ms / 1000
    try:
        while True:  # short attempts, so that a refusal no retry can mend ends the wait
            attempt_ms = max(1, min(CONNECT_ATTEMPT_MS, int((deadline - time.monotonic()) * 1000)))
            try:
                return _AdminClient(
                    bootstrap_servers=bootstrap_servers,
                    bootstrap_timeout_ms=attempt_ms,
                    reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
                    **security,
                )
            except KafkaError as exc:
                reason = _most_telling(failures.errors) or f"{type(exc).__name__}: {exc}"
                if _telling(reason) < 2 or time.monotonic() >= deadline:
                    raise KafkaConnectError(
                        f"cannot connect to {_describe(bootstrap_servers, security)}: {reason}"
                    ) from exc
    finally:
        logger.removeHandler(failures)
        logger.setLevel(level)
        logger.propagate = propagate


def check_connection(bootstrap_servers: str, security: dict | None = None) -> None:
    """Connect once, so that bad credentials or TLS fail at start-up with the reason."""
    admin_client(bootstrap_servers, security).close()


def ensure_topics(
    bootstrap_servers: str,
    topics: dict[str, dict],
    security: dict | None = None,
) -> None:
    """Create topics that do not exist yet: {name: {"num_partitions": n, "topic_configs": {}}}."""
    admin = admin_client(bootstrap_servers, security)
    try:
        existing = set(admin.list_topics())
        wanted = {
            name: {
                "num_partitions": spec.get("num_partitions", 1),
                "replication_factor": spec.get("replication_factor", 1),
                "topic_configs": spec.get("topic_configs", {}),
            }
            for name, spec in topics.items()
            if name not in existing
        }
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(wanted)
    finally:
        admin.close()


def read_latest(
    bootstrap_servers: str,
    topic: str,
    keys: Iterable[bytes] | None = None,
    security: dict | None = None,
    timeout_s: float = 30.0,
) -> dict[bytes, bytes]:
    """The latest value per key of a (compacted) topic, read from the beginning to its end."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        enable_auto_commit=False,
        group_id=None,
        isolation_level="read_committed",
        **(security or {}),
    )
    wanted = set(keys) if keys is not None else None
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return {}
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        latest: dict[bytes, bytes] = {}
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise KafkaError(f"reading {topic} did not finish in {timeout_s:.0f}s")
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    if wanted is None or record.key in wanted:
                        if record.value is None:
                            latest.pop(record.key, None)
                        else:
                            latest[record.key] = record.value
        return latest
    finally:
        consumer.close()

"""The Kafka client on kafka-python: the only module of aewatch that imports kafka-python.

`KafkaPythonClient(settings)` makes the sources, sinks and tails of `pipeline.kafka_io.protocols`
for the cluster that a `KafkaSettings` group describes, creates topics and checks the connection.
Everything kafka-python specific lives here: its configuration names, the rebalance listener, its
error types (turned into `CommitRejected`, `DeliveryError` and `KafkaConnectError`), and the
workarounds its version 3.0 needs.

Size: over 400 lines because every kafka-python call of aewatch is here, by design; the classes
(source, sinks, tail, the connection check, the client) are independent of each other.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from kafka.errors import (
    CommitFailedError,
    IllegalStateError,
    InvalidSessionTimeoutError,
    InvalidTransactionTimeoutError,
    KafkaError,
    KafkaProtocolError,
    RebalanceInProgressError,
    TopicAlreadyExistsError,
)
from kafka.net.transport import KafkaTCPTransport
from kafka.structs import OffsetAndMetadata

from pipeline.errors import CommitRejected
from pipeline.kafka_io import topics as topics_
from pipeline.kafka_io.errors import (
    DeliveryError,
    KafkaConnectError,
    RefusedCommits,
    describe,
    most_telling,
    session_timeout_refused,
    telling,
    transaction_timeout_refused,
)
from pipeline.kafka_io.protocols import Partition, Rebalance, TopicSpec
from pipeline.kafka_io.settings import KafkaConnection, KafkaSettings
from pipeline.kafka_io.transactions import Transactions

__all__ = ["KafkaPythonClient", "client_config", "security_config"]

log = logging.getLogger(__name__)
# Poll timeout while the member is (re)joining its group: long enough for the join to complete
# within one poll.
REBALANCE_POLL_MS = 1000
# kafka-python backs off reconnecting exponentially, by default up to 30 s: after a broker
# restart the worker would sit out most of that. Try again at least every second.
RECONNECT_BACKOFF_MAX_MS = 1000
# How long a first connection may take before start-up fails with the reason.
CONNECT_TIMEOUT_MS = 15_000
CONNECT_ATTEMPT_MS = 3_000
ASSIGNORS = {
    "range": RangePartitionAssignor,
    "roundrobin": RoundRobinPartitionAssignor,
    "cooperative-sticky": CooperativeStickyAssignor,
}


def client_config(connection: KafkaConnection) -> dict:
    """kafka-python keyword arguments of a connection (empty settings left out)."""
    return {"bootstrap_servers": connection.bootstrap_servers, **security_config(connection)}


def security_config(connection: KafkaConnection) -> dict:
    """kafka-python keyword arguments of how to log in (empty settings left out)."""
    config = {"security_protocol": connection.security_protocol}
    if connection.sasl_mechanism:
        config.update(
            sasl_mechanism=connection.sasl_mechanism,
            sasl_plain_username=connection.sasl_username,
            sasl_plain_password=connection.sasl_password,
        )
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password"):
        if getattr(connection, name):
            config[name] = getattr(connection, name)
    return config


def _offsets(offsets: Mapping[Partition, int]) -> dict:
    # Kafka stores the offset of the NEXT record to read; callers pass exactly that.
    return {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}


def _by_partition(polled) -> dict[Partition, list]:
    return {(tp.topic, tp.partition): records for tp, records in polled.items()}


class _Listener(ConsumerRebalanceListener):
    def __init__(self, rebalance: Rebalance) -> None:
        self.rebalance = rebalance

    def on_partitions_revoked(self, revoked) -> None:
        self.rebalance.on_revoked({(tp.topic, tp.partition) for tp in revoked})

    def on_partitions_assigned(self, assigned) -> None:
        self.rebalance.on_assigned({(tp.topic, tp.partition) for tp in assigned})

    def on_partitions_lost(self, lost) -> None:
        # Evicted from the group: these partitions cannot be committed any more (and the client
        # cannot block in this callback). Drop them; their new owner re-reads from the last commit.
        self.rebalance.on_revoked({(tp.topic, tp.partition) for tp in lost}, lost=True)


class KafkaSource:
    """A consumer-group member with manual commits; rebalances call back into the worker."""

    def __init__(
        self,
        settings: KafkaSettings,
        topics: Sequence[str],
        pattern: str | None,
        rebalance: Rebalance,
    ) -> None:
        self.refused = RefusedCommits()  # of commits not waited for
        self.session_timeout_ms = settings.session_timeout_ms
        self.consumer = KafkaConsumer(
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
            **client_config(settings.connection),
        )
        listener = _Listener(rebalance)
        if pattern:
            self.consumer.subscribe(pattern=pattern, listener=listener)
        else:
            self.consumer.subscribe(topics=list(topics), listener=listener)

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
        try:
            polled = self.consumer.poll(timeout_ms=timeout_ms)
        except InvalidSessionTimeoutError:  # the join's answer: no retry would change it
            raise session_timeout_refused(self.session_timeout_ms) from None
        return _by_partition(polled)

    def keepalive(self) -> None:
        """A poll with every partition paused: it resets the max.poll.interval.ms clock and runs
        a pending rebalance, whose callbacks reach the worker, but hands over no records.
        Partitions assigned by that rebalance are not paused; whatever they return is read
        again by the next real poll."""
        paused = self.consumer.assignment()
        self.consumer.pause(*paused)
        try:
            polled = self.poll(0)
        finally:
            self.consumer.resume(*(paused & self.consumer.assignment()))
        self.seek({p: records[0].offset for p, records in polled.items() if records})

    def seek(self, offsets: Mapping[Partition, int]) -> None:
        for (topic, partition), offset in offsets.items():
            self.consumer.seek(TopicPartition(topic, partition), offset)

    def commit(self, offsets: Mapping[Partition, int], *, wait: bool = True) -> None:
        if not offsets:
            return
        if not wait:  # its outcome comes back to `_committed`, called by a later poll
            try:
                self.consumer.commit_async(_offsets(offsets), callback=self._committed)
            except KafkaError as exc:  # (not even sent)
                self._committed(_offsets(offsets), exc)
            return
        try:
            self.consumer.commit(_offsets(offsets))
        except (CommitFailedError, RebalanceInProgressError) as exc:
            raise CommitRejected(str(exc)) from exc

    def _committed(self, offsets, outcome) -> None:
        if isinstance(outcome, Exception):
            self.refused.add({(tp.topic, tp.partition) for tp in offsets}, outcome)

    def refused_commits(self) -> set[Partition]:
        return self.refused.take()

    def highwaters(self, partitions: Iterable[Partition]) -> dict[Partition, int]:
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

    def group_metadata(self) -> object:
        return self.consumer.group_metadata()

    def close(self) -> None:
        try:
            self.consumer.close(autocommit=False)
        except KafkaError as exc:  # leaving a group we were already evicted from
            log.warning("closing the consumer: %s", exc)


class KafkaSink:
    """An idempotent producer (acks=all); `flush` raises if any record was not delivered."""

    transactional = False

    def __init__(
        self, settings: KafkaSettings, *, max_record_bytes: int, linger_ms: int, **extra
    ) -> None:
        self.producer = KafkaProducer(
            client_id=settings.client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            compression_type="lz4",
            max_request_size=max(1_048_576, max_record_bytes + 65536),
            reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
            **client_config(settings.connection),
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
        self._raise_undelivered()

    def commit(self, offsets: Mapping[Partition, int], group_metadata: object) -> None:
        raise TypeError("a plain sink commits no transaction: flush, then commit the source")

    def _raise_undelivered(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            if future.failed():
                raise DeliveryError(f"a record was not delivered: {future.exception!r}")

    def close(self) -> None:
        self.producer.close()


class TransactionalSink(Transactions, KafkaSink):
    """Exactly-once output (see `pipeline.kafka_io.transactions`) on kafka-python."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        max_record_bytes: int,
        linger_ms: int,
        transaction_timeout_ms: int,
    ) -> None:
        super().__init__(
            settings,
            max_record_bytes=max_record_bytes,
            linger_ms=linger_ms,
            transactional_id=settings.transactional_id_value,
            transaction_timeout_ms=transaction_timeout_ms,
        )
        try:
            self.producer.init_transactions()
        except KafkaError as exc:  # the client reports the coordinator's refusal as a bare one
            refused = InvalidTransactionTimeoutError.__name__
            if not (isinstance(exc, InvalidTransactionTimeoutError) or refused in str(exc)):
                raise
            self.producer.close(timeout=0)
            raise transaction_timeout_refused(transaction_timeout_ms) from None

    def _begin_transaction(self) -> None:
        self.producer.begin_transaction()

    def _send_offsets(self, offsets: Mapping[Partition, int], group_metadata: object) -> None:
        self.producer.send_offsets_to_transaction(_offsets(offsets), group_metadata)

    def _commit_transaction(self) -> None:
        self.producer.commit_transaction()

    def _abort_transaction(self) -> None:
        with contextlib.suppress(KafkaError):
            self.producer.abort_transaction()


class KafkaTail:
    """Reads topics outside any consumer group, from their start or their end."""

    def __init__(
        self,
        connection: KafkaConnection,
        topics: Sequence[str],
        *,
        from_beginning: bool,
        read_committed: bool,
    ) -> None:
        self.consumer = KafkaConsumer(
            *topics,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest" if from_beginning else "latest",
            isolation_level="read_committed" if read_committed else "read_uncommitted",
            **client_config(connection),
        )
        self.topics = list(topics)

    def poll(self, timeout_ms: int) -> dict[Partition, list]:
        return _by_partition(self.consumer.poll(timeout_ms=timeout_ms))

    def reached_end(self) -> bool:
        partitions = [
            TopicPartition(topic, p)
            for topic in self.topics
            for p in sorted(self.consumer.partitions_for_topic(topic))
        ]
        if not set(partitions) <= self.consumer.assignment():
            return False  # not all assigned yet: nothing of them was read
        end = self.consumer.end_offsets(partitions) if partitions else {}
        for tp in partitions:
            at = self.consumer.position(tp, timeout_ms=CONNECT_ATTEMPT_MS)
            if at is None or at < end[tp]:
                return False
        return True

    def close(self) -> None:
        self.consumer.close()


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


async def _read_before_the_end(transport: KafkaTCPTransport) -> None:
    """kafka-python's socket reader, except that bytes read in the same pass as the end of the
    stream reach the protocol before the connection is aborted. A broker that refuses a login
    sends the reason and closes at once; kafka-python 3.0 drops bytes read together with the
    close, so a wrong password could show as a bare "socket disconnected". Here the bytes
    are delivered and the next pass (the end of the stream is still there) aborts, after the
    protocol has had its turn."""
    while transport._read and not transport._closed:
        await transport._net.wait_read(transport._sock)
        data, error = transport._sock_recv()
        if data:
            transport.last_read = time.monotonic()
            protocol = transport._protocol
            if protocol is not None and protocol._sensors:
                protocol._sensors.bytes_received.record(len(data))
            try:
                protocol.data_received(data)
            except KafkaProtocolError as exc:
                return transport.abort(error=exc)
        elif error:
            return transport.abort(error=error)


KafkaTCPTransport._read_from_sock = _read_before_the_end  # the TLS transport inherits it


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


# kafka-python's loggers while a connection is made: the level each is held at (unless at DEBUG),
# and whether its lines say why the connection failed (collected for the error)
_WHILE_CONNECTING = {
    "manager": (logging.WARNING, True),
    "transport": (logging.WARNING, True),
    "connection": (logging.CRITICAL, False),
}


@contextlib.contextmanager
def _retries_collected(failures: logging.Handler) -> Iterator[None]:
    """While connecting, kafka-python's retry lines go to `failures`, not to the log: the client
    logs a line or two at each retry, some 50 before a refusal is final, and the error says the
    most telling one. The transport's lines count too: a refused login can reach the connection
    as a bare disconnect, while the transport's abort names the refusal. At DEBUG they are shown
    as well."""
    loggers = {
        logging.getLogger(f"kafka.net.{name}"): how for name, how in _WHILE_CONNECTING.items()
    }
    saved = {logger: (logger.level, logger.propagate) for logger in loggers}
    for logger, (level, collect) in loggers.items():
        if logger.getEffectiveLevel() > logging.DEBUG:
            logger.setLevel(level)
            logger.propagate = False
        if collect:
            logger.addHandler(failures)
    try:
        yield
    finally:
        for logger, (level, propagate) in saved.items():
            logger.removeHandler(failures)
            logger.setLevel(level)
            logger.propagate = propagate


def _admin(connection: KafkaConnection, timeout_ms: int = CONNECT_TIMEOUT_MS) -> KafkaAdminClient:
    """An admin client, or a `KafkaConnectError` that says why not: at once for wrong credentials
    or an untrusted certificate, after `timeout_ms` for a broker that does not answer."""
    failures = _BootstrapFailures()
    deadline = time.monotonic() + timeout_ms / 1000
    with _retries_collected(failures):
        while True:  # short attempts, so that a refusal no retry can mend ends the wait
            attempt_ms = max(1, min(CONNECT_ATTEMPT_MS, int((deadline - time.monotonic()) * 1000)))
            try:
                return _AdminClient(
                    bootstrap_timeout_ms=attempt_ms,
                    reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
                    **client_config(connection),
                )
            except KafkaError as exc:
                reason = most_telling(failures.errors) or f"{type(exc).__name__}: {exc}"
                if telling(reason) < 2 or time.monotonic() >= deadline:
                    raise KafkaConnectError(
                        f"cannot connect to {describe(connection)}: {reason}"
                    ) from exc


def _topic_settings(admin: KafkaAdminClient, topic: str, names: Iterable[str]) -> topics_.Current:
    resource = ConfigResource(ConfigResourceType.TOPIC, topic, configs=dict.fromkeys(names))
    found = admin.describe_configs([resource], config_filter="all")["topic"][topic]
    return {
        name: (entry["value"], entry["config_source"] == "DYNAMIC_TOPIC_CONFIG")
        for name, entry in found.items()
    }


def _set_topic_settings(admin: KafkaAdminClient, topic: str, settings: Mapping[str, str]) -> None:
    resource = ConfigResource(ConfigResourceType.TOPIC, topic, configs=dict(settings))
    outcome = admin.alter_configs([resource])["topic"][topic]  # "OK", or the error's text
    if outcome != "OK":
        raise KafkaError(str(outcome))


class KafkaPythonClient:
    """The `KafkaClient` of one cluster on kafka-python."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self.connection = settings.connection

    def check(self) -> None:
        _admin(self.connection).close()

    def ping(self, request_timeout_ms: int = 5000) -> None:
        admin = KafkaAdminClient(
            request_timeout_ms=request_timeout_ms, **client_config(self.connection)
        )
        try:
            admin.describe_cluster()
            admin.list_topics()
        finally:
            admin.close()

    def missing_topic(self, topic: str) -> bool:
        admin = _admin(self.connection)
        try:
            if topic in admin.list_topics():
                return False
            broker = str(admin.describe_cluster()["brokers"][0]["broker_id"])
            name = "auto.create.topics.enable"
            resource = ConfigResource(ConfigResourceType.BROKER, broker, configs={name: None})
            found = admin.describe_configs([resource], config_filter="all")["broker"][broker]
            return found[name]["value"] == "false"
        except (KafkaError, KeyError, IndexError):  # not allowed to ask, or not told
            return False
        finally:
            admin.close()

    def ensure_topics(self, topics: Mapping[str, TopicSpec]) -> None:
        """Create topics that do not exist yet; give those that do the settings they lack."""
        admin = _admin(self.connection)
        try:
            existing = set(admin.list_topics())
            wanted = {
                name: {
                    "num_partitions": topics_.partitions(spec),
                    "replication_factor": topics_.replication(spec),
                    "configs": topics_.configs(spec),
                }
                for name, spec in topics.items()
                if name not in existing
            }
            if wanted:
                with contextlib.suppress(TopicAlreadyExistsError):
                    admin.create_topics(wanted)
            topics_.settle_existing(
                topics,
                existing,
                functools.partial(_topic_settings, admin),
                functools.partial(_set_topic_settings, admin),
            )
        finally:
            admin.close()

    def source(self, topics: Sequence[str], pattern: str | None, rebalance: Rebalance):
        return KafkaSource(self.settings, topics, pattern, rebalance)

    def sink(
        self,
        *,
        max_record_bytes: int = 1_048_576,
        linger_ms: int = 1,
        transaction_timeout_ms: int | None = None,
    ):
        if transaction_timeout_ms is None:
            return KafkaSink(self.settings, max_record_bytes=max_record_bytes, linger_ms=linger_ms)
        return TransactionalSink(
            self.settings,
            max_record_bytes=max_record_bytes,
            linger_ms=linger_ms,
            transaction_timeout_ms=transaction_timeout_ms,
        )

    def tail(self, topics: Sequence[str], *, from_beginning: bool, read_committed: bool = False):
        return KafkaTail(
            self.connection, topics, from_beginning=from_beginning, read_committed=read_committed
        )

    def read_all(self, topic: str, timeout_s: float = 60.0) -> list:
        """Every record of a topic, from its start to its end when called (partition order)."""
        consumer = KafkaConsumer(
            enable_auto_commit=False,
            group_id=None,
            isolation_level="read_committed",
            **client_config(self.connection),
        )
        try:
            tps = [
                TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
            ]
            if not tps:
                return []
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            end = consumer.end_offsets(tps)
            records: list = []
            deadline = time.monotonic() + timeout_s
            while any(consumer.position(tp) < end[tp] for tp in tps):
                if time.monotonic() > deadline:
                    raise KafkaError(f"reading {topic} did not finish in {timeout_s:.0f}s")
                for batch in consumer.poll(timeout_ms=500).values():
                    records.extend(
                        r for r in batch if r.offset < end[TopicPartition(r.topic, r.partition)]
                    )
            return records
        finally:
            consumer.close()

    def _settled(self, consumer, tps: list, topic: str) -> dict:
        """The end offsets of a read_committed `consumer` once the transactions open when asked
        are over (see `topics_.SETTLE_S`)."""
        probe = KafkaConsumer(
            enable_auto_commit=False,
            group_id=None,
            isolation_level="read_uncommitted",
            **client_config(self.connection),
        )
        try:
            high = probe.end_offsets(tps)
        finally:
            probe.close()
        return topics_.settled(lambda: consumer.end_offsets(tps), high, topic)

    def read_latest(
        self, topic: str, keys: Iterable[bytes] | None = None, timeout_s: float = 30.0
    ) -> dict[bytes, bytes]:
        """The latest value per key of a (compacted) topic, read from the beginning to its end."""
        consumer = KafkaConsumer(
            enable_auto_commit=False,
            group_id=None,
            isolation_level="read_committed",
            **client_config(self.connection),
        )
        wanted = set(keys) if keys is not None else None
        try:
            tps = [
                TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
            ]
            if not tps:
                return {}
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            end = self._settled(consumer, tps, topic)
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

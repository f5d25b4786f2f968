"""The producers of the confluent-kafka client, and how a connection becomes librdkafka config.

`ConfluentSink` is an idempotent producer (acks=all) whose `flush` raises if any record was
not delivered; `TransactionalConfluentSink` commits what was sent and the offsets of a checkpoint
as one transaction, like the kafka-python sinks of `pipeline.kafka_io.kafka_python`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from pipeline.kafka_io.errors import DeliveryError, transaction_timeout_refused
from pipeline.kafka_io.protocols import Partition
from pipeline.kafka_io.settings import KafkaConnection, KafkaSettings
from pipeline.kafka_io.transactions import Transactions

__all__ = ["ConfluentSink", "TransactionalConfluentSink", "config"]

# librdkafka backs off reconnecting up to 10 s by default: after a broker restart the worker
# would sit out most of that. Try again at least every second.
RECONNECT_BACKOFF_MAX_MS = 1000
# Serve delivery reports every this many sends (they are otherwise served by flush).
SERVE_EVERY = 1000
# librdkafka's own log lines go to this logger, not to stderr.
LOGGER = logging.getLogger("pipeline.kafka_io.librdkafka")


def config(connection: KafkaConnection, client_id: str) -> dict:
    """librdkafka configuration of a connection (empty settings left out)."""
    conf = {
        "bootstrap.servers": connection.bootstrap_servers,
        "client.id": client_id,
        "security.protocol": connection.security_protocol,
        "reconnect.backoff.max.ms": RECONNECT_BACKOFF_MAX_MS,
        "logger": LOGGER,
    }
    if connection.sasl_mechanism:
        conf.update(
            {
                "sasl.mechanism": connection.sasl_mechanism,
                "sasl.username": connection.sasl_username,
                "sasl.password": connection.sasl_password,
            }
        )
    names = {
        "ssl_cafile": "ssl.ca.location",
        "ssl_certfile": "ssl.certificate.location",
        "ssl_keyfile": "ssl.key.location",
        "ssl_password": "ssl.key.password",
    }
    for name, key in names.items():
        if getattr(connection, name):
            conf[key] = getattr(connection, name)
    return conf


class ConfluentSink:
    """An idempotent producer (acks=all); `flush` raises if any record was not delivered."""

    transactional = False

    def __init__(
        self, settings: KafkaSettings, *, max_record_bytes: int, linger_ms: int, **extra
    ) -> None:
        conf = config(settings.connection, settings.client_id)
        conf.update(
            {
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": linger_ms,
                "compression.type": "lz4",
                "message.max.bytes": max(1_048_576, max_record_bytes + 65536),
                **extra,
            }
        )
        self.producer = Producer(conf)
        self._failed: list = []
        self._sent = 0

    def _delivered(self, error, message) -> None:
        if error is not None:
            self._failed.append(error)

    def send(self, topic, key, value, headers=None, partition=None) -> None:
        extra = {} if partition is None else {"partition": partition}
        while True:
            try:
                self.producer.produce(
                    topic, value, key, headers=headers or None, on_delivery=self._delivered, **extra
                )
                break
            except BufferError:  # the local queue is full: let deliveries make room
                self.producer.poll(0.05)
        self._sent += 1
        if self._sent % SERVE_EVERY == 0:
            self.producer.poll(0)

    def flush(self) -> None:
        while self.producer.flush(1.0):
            pass
        self._raise_undelivered()

    def commit(self, offsets: Mapping[Partition, int], group_metadata: object) -> None:
        raise TypeError("a plain sink commits no transaction: flush, then commit the source")

    def _raise_undelivered(self) -> None:
        failed, self._failed = self._failed, []
        if failed:
            raise DeliveryError(f"a record was not delivered: {failed[0]!r}")

    def close(self) -> None:
        self.producer.flush(5.0)


class TransactionalConfluentSink(Transactions, ConfluentSink):
    """Exactly-once output (see `pipeline.kafka_io.transactions`) on confluent-kafka."""

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
            **{
                "transactional.id": settings.transactional_id_value,
                "transaction.timeout.ms": transaction_timeout_ms,
            },
        )
        try:
            self.producer.init_transactions()
        except KafkaException as exc:
            if exc.args[0].code() == KafkaError.INVALID_TRANSACTION_TIMEOUT:
                raise transaction_timeout_refused(transaction_timeout_ms) from None
            raise

    def _begin_transaction(self) -> None:
        self.producer.begin_transaction()

    def _send_offsets(self, offsets: Mapping[Partition, int], group_metadata: object) -> None:
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        self.producer.send_offsets_to_transaction(tps, group_metadata)

    def _commit_transaction(self) -> None:
        try:
            self.producer.commit_transaction()
        except KafkaException as exc:
            raise DeliveryError(f"the transaction was not committed: {exc.args[0]}") from exc

    def _abort_transaction(self) -> None:
        with contextlib.suppress(KafkaException):
            self.producer.abort_transaction(5.0)

"""Kafka for the worker and the tools, behind typed protocols.

- `protocols`: what the worker and the tools ask of a client (`Source`, `Sink`, `Tail`,
  `KafkaClient`); the in-memory fakes of the tests implement them too;
- `settings`: the Kafka settings group (connection, consumer group, transactions);
- `kafka_python`: the client on kafka-python, the only module that imports it;
- `confluent` (with `confluent_records` and `confluent_sink`): the client on confluent-kafka (librdkafka), the only
  modules that import it; installed with the `fast` extra;
- `open_client(settings)`: the client the settings select (`kafka_client`).
"""

from __future__ import annotations

from pipeline.kafka_io.protocols import KafkaClient
from pipeline.kafka_io.settings import KafkaConnection, KafkaSettings

__all__ = ["open_client"]


def open_client(settings: KafkaSettings | KafkaConnection) -> KafkaClient:
    """The Kafka client of the cluster `settings` describe (a bare connection takes the group
    defaults: enough for tools that join no group)."""
    if isinstance(settings, KafkaConnection):
        settings = KafkaSettings(connection=settings)
    if settings.connection.kafka_client == "confluent":
        from pipeline.kafka_io.confluent import ConfluentClient

        return ConfluentClient(settings)
    from pipeline.kafka_io.kafka_python import KafkaPythonClient

    return KafkaPythonClient(settings)

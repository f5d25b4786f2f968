"""The Kafka settings group: where the cluster is, how to log in, and the consumer group.

Declared once (see `pipeline.settings`); the Kafka adapter gets this group and nothing else of
the worker's settings. The companion tools (`simulate`, `alerts`) take the connection part only.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import socket
from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.settings import add_arguments, check, read, setting

__all__ = [
    "ASSIGNORS",
    "CLIENTS",
    "SASL_MECHANISMS",
    "SECURITY_PROTOCOLS",
    "KafkaConnection",
    "KafkaSettings",
    "add_connection_arguments",
    "connection_from_args",
    "is_topic_name",
    "not_a_topic_name",
    "topic_name",
]

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
ASSIGNORS = ("range", "roundrobin", "cooperative-sticky")
# The Kafka client libraries: kafka-python (pure Python, the default and the reference) and
# confluent-kafka (librdkafka, the `fast` extra); `pipeline.kafka_io.open_client` picks one.
CLIENTS = ("kafka-python", "confluent")
INT32_MAX = 2**31 - 1  # Kafka's protocol carries these settings as 32-bit integers
# The connection flags of the companion commands (`simulate`, `alerts`).
TOOL_FLAGS = (
    "kafka_client",
    "security_protocol",
    "sasl_mechanism",
    "sasl_username",
    "sasl_password",
    "ssl_cafile",
)


# What Kafka accepts as a topic name (a name with any other character, such as a leading "^",
# would be taken by librdkafka as a pattern).
TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


def is_topic_name(name: str) -> bool:
    return TOPIC_NAME.fullmatch(name) is not None and name not in (".", "..")


def not_a_topic_name(name: str) -> str:
    """What a setting or flag says of a name that `is_topic_name` refuses."""
    return f"{name!r} is not a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)"


def topic_name(text: str) -> str:
    """An argparse type: a Kafka topic name."""
    if not is_topic_name(text):
        raise argparse.ArgumentTypeError(not_a_topic_name(text))
    return text


def _server_problem(server: str) -> str | None:
    """Why `server` is not a bootstrap address `host:port` (None when it is one)."""
    if "://" in server:
        return "not host:port (a Kafka address has no scheme)"
    host, colon, port = server.rpartition(":")
    if not colon or not host.strip("[]"):
        return "not host:port"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"port {port!r} is not a number from 1 to 65535"
    return None


@dataclass(frozen=True)
class KafkaConnection:
    """Where the cluster is and how to log in to it."""

    bootstrap_servers: str = setting(
        "Kafka bootstrap servers, host:port[,host:port]", required=True
    )
    security_protocol: str = setting(
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL", "PLAINTEXT", choices=SECURITY_PROTOCOLS
    )
    sasl_mechanism: str | None = setting(
        "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512", choices=SASL_MECHANISMS
    )
    sasl_username: str | None = setting("SASL user name")
    sasl_password: str | None = setting("SASL password", secret=True)
    ssl_cafile: str | None = setting("CA certificate file (PEM)")
    ssl_certfile: str | None = setting("client certificate file (PEM)")
    ssl_keyfile: str | None = setting("client key file (PEM)")
    ssl_password: str | None = setting("password of the client key", secret=True)
    kafka_client: str = setting(
        "Kafka client library: kafka-python, or confluent (librdkafka, faster; "
        "pip install 'aewatch[fast]')",
        "kafka-python",
        choices=CLIENTS,
    )

    def __post_init__(self) -> None:
        check(self)
        for server in self.bootstrap_servers.split(","):
            problem = _server_problem(server.strip())
            if problem:
                raise ConfigError("bootstrap_servers", f"{server.strip()!r}: {problem}")
        if self.kafka_client == "confluent" and importlib.util.find_spec("confluent_kafka") is None:
            raise ConfigError(
                "kafka_client",
                "confluent needs the confluent-kafka package: pip install 'aewatch[fast]'",
            )
        complete = self.sasl_mechanism and self.sasl_username and self.sasl_password
        if self.security_protocol.startswith("SASL") and not complete:
            raise ConfigError(
                "sasl_mechanism",
                f"{self.security_protocol} needs "
                "--sasl-mechanism, --sasl-username and --sasl-password",
            )
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigError(name, f"no such file: {path}")
        unused = [  # given, but the protocol would never use them: a forgotten protocol
            name
            for name, used in (
                ("sasl_mechanism", "SASL"),
                ("sasl_username", "SASL"),
                ("sasl_password", "SASL"),
                ("ssl_cafile", "SSL"),
                ("ssl_certfile", "SSL"),
                ("ssl_keyfile", "SSL"),
                ("ssl_password", "SSL"),
            )
            if getattr(self, name) and used not in self.security_protocol
        ]
        if unused:
            raise ConfigError(
                "security_protocol",
                f"{self.security_protocol} does not use {unused[0]}: "
                "give the protocol it belongs to (SASL_SSL, SASL_PLAINTEXT or SSL)",
            )


@dataclass(frozen=True)
class KafkaSettings:
    """The connection, and this member's client id, consumer group and transactions."""

    connection: KafkaConnection
    client_id: str = setting("Kafka client id", "aewatch-worker")
    group_id: str = setting("consumer group id", "aewatch-worker")
    max_poll_records: int = setting(
        "most records one poll returns", 5000, minimum=1, maximum=INT32_MAX
    )
    session_timeout_ms: int = setting(
        "consumer group session timeout (its heartbeat is a quarter of it)",
        10000,
        minimum=1000,
        maximum=INT32_MAX,
    )
    max_poll_interval_ms: int = setting(
        "longest gap between polls before the group evicts us (with confluent: at least the "
        "session timeout)",
        300000,
        minimum=1,
        maximum=INT32_MAX,
    )
    exactly_once: bool = setting("events, dead letters and offsets in one Kafka transaction", False)
    transactional_id: str | None = setting(
        "producer transactional id with --exactly-once, stable per worker "
        "(default: GROUP.INSTANCE_ID or GROUP.HOSTNAME)"
    )
    group_instance_id: str | None = setting("static group membership id, stable per worker")
    assignor: str = setting(
        "partition assignment strategy: range, roundrobin or cooperative-sticky "
        "(incremental: moves only the partitions that change owner)",
        "range",
        choices=ASSIGNORS,
    )

    def __post_init__(self) -> None:
        check(self)
        for name in ("client_id", "group_id"):
            if not getattr(self, name).strip():
                raise ConfigError(name, "must not be blank")
        confluent = self.connection.kafka_client == "confluent"
        if confluent and self.max_poll_interval_ms < self.session_timeout_ms:  # librdkafka's rule
            raise ConfigError(
                "max_poll_interval_ms",
                f"must be at least session_timeout_ms ({self.session_timeout_ms}) with the "
                f"confluent client, got {self.max_poll_interval_ms}",
            )

    @property
    def transactional_id_value(self) -> str:
        instance = self.group_instance_id or socket.gethostname()
        return self.transactional_id or f"{self.group_id}.{instance}"


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """The Kafka security flags of the companion commands (`simulate`, `alerts`)."""
    add_arguments(parser, KafkaConnection, names=TOOL_FLAGS, env=False)


def connection_from_args(args: argparse.Namespace, bootstrap_servers: str) -> KafkaConnection:
    """The connection those flags describe (no environment: the tools take flags only)."""
    values = read(KafkaConnection, args, {}, names=TOOL_FLAGS)
    return KafkaConnection(bootstrap_servers=bootstrap_servers, **values)

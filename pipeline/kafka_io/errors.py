"""Errors of the Kafka clients, and which connection failure explains the most."""

from __future__ import annotations

import logging

from pipeline.errors import AewatchError, ConfigError
from pipeline.kafka_io.protocols import Partition
from pipeline.kafka_io.settings import KafkaConnection

__all__ = [
    "DeliveryError",
    "KafkaConnectError",
    "RefusedCommits",
    "describe",
    "most_telling",
    "session_timeout_refused",
    "telling",
    "transaction_timeout_refused",
]

log = logging.getLogger(__name__)


class DeliveryError(AewatchError):
    """The producer could not deliver a record; offsets are not committed past it."""


class KafkaConnectError(AewatchError):
    """The cluster cannot be reached or refused us (credentials, TLS); says why."""


def session_timeout_refused(session_timeout_ms: int) -> ConfigError:
    """The group coordinator refused to let the member join with its session timeout."""
    return ConfigError(
        "session_timeout_ms",
        f"the broker refuses {session_timeout_ms} ms: it takes only what lies between its "
        "group.min.session.timeout.ms and group.max.session.timeout.ms (6 s and 30 min by default)",
    )


def transaction_timeout_refused(transaction_timeout_ms: int) -> ConfigError:
    """The transaction coordinator refused the producer's transaction timeout."""
    return ConfigError(
        "commit_interval_ms",
        f"--exactly-once asks for transactions of {transaction_timeout_ms} ms (4 x the commit "
        "interval, at least 60 s), and the broker refuses it: over its "
        "transaction.max.timeout.ms (15 min by default)",
    )


def telling(text: str) -> int:
    """0 for a refused login, 1 for a refused certificate: failures no retry will mend; 2 else,
    a login that timed out among them (a busy broker or client is slow, not a refusal)."""
    if "timed out" in text.lower():
        return 2
    if "Authentication" in text or "Authorization" in text:
        return 0
    if "CERTIFICATE" in text.upper():  # not any SSL error: a broker still starting can cut TLS
        return 1
    return 2


def most_telling(errors: list[BaseException]) -> str | None:
    """The failure that explains the most: a refused login or certificate over a bare disconnect
    (after a failed login the broker may just close the socket); the latest among equals."""
    texts = [f"{type(e).__name__}: {e}" for e in errors]
    return min(reversed(texts), key=telling) if texts else None


def describe(connection: KafkaConnection) -> str:
    """The cluster and how we log in to it, for messages (never the password)."""
    who = ""
    if connection.sasl_mechanism:
        who = f", SASL {connection.sasl_mechanism} as {connection.sasl_username!r}"
    return f"Kafka at {connection.bootstrap_servers} ({connection.security_protocol}{who})"


class RefusedCommits:
    """The partitions of commits sent without waiting (`Source.commit(wait=False)`) that the group
    refused, as a later poll reports them: logged, and kept until `take`."""

    def __init__(self) -> None:
        self._refused: set[Partition] = set()

    def add(self, partitions: set[Partition], error) -> None:
        if not partitions:
            return
        self._refused |= partitions
        log.warning(
            "offset commit of %s refused (%s): committed again at the next checkpoint",
            sorted(partitions),
            error,
        )

    def reported(self, error, partitions) -> None:
        """A client's report of one commit: `error` for all of it, else each partition's own."""
        errors = [error] if error is not None else [p.error for p in partitions if p.error]
        if errors:
            refused = {(p.topic, p.partition) for p in partitions if error or p.error}
            self.add(refused, errors[0])

    def take(self) -> set[Partition]:
        refused, self._refused = self._refused, set()
        return refused

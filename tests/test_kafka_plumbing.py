"""Plumbing under the Kafka tests and clients: the kafka-python socket reader hands the protocol
every byte the broker sent before it closed (a refused login's reason arrives together with the
close and must not be lost), a connection's failures are ranked by what they explain, and a local
broker's listeners get different ports."""

from __future__ import annotations

import logging
import socket

import pytest
from kafka.errors import KafkaConnectionError, KafkaTimeoutError, SaslAuthenticationFailedError
from kafka.net.transport import KafkaTCPTransport

import pipeline.kafka_io.kafka_python  # noqa: F401  (installs the reader)
from pipeline.kafka_io.errors import KafkaConnectError, most_telling, telling
from pipeline.kafka_io.kafka_python import _admin
from pipeline.kafka_io.settings import KafkaConnection
from pipeline.tools.local_broker import LocalKafkaBroker, free_ports


class _Net:
    """The few event-loop calls the reader makes; the socket is always ready."""

    def wait_read(self, sock):
        return _ready()

    def unregister_event(self, sock, events):
        pass

    def cancel(self, task):
        pass


async def _ready():
    return None


class _Protocol:
    _sensors = None

    def __init__(self) -> None:
        self.events: list = []

    def data_received(self, data: bytes) -> None:
        self.events.append(("data", data))

    def connection_lost(self, error) -> None:
        self.events.append(("lost", type(error).__name__))


def _run(coroutine) -> None:
    try:
        while True:
            coroutine.send(None)
    except StopIteration:
        pass


def test_bytes_sent_just_before_the_close_reach_the_protocol_before_the_loss():
    ours, broker = socket.socketpair()
    reason = b"\x00\x00\x00\x10SaslAuthenticationFailed"
    broker.sendall(reason)
    broker.close()  # the broker's reason and its close are both waiting before the first read
    ours.setblocking(False)
    protocol = _Protocol()
    transport = KafkaTCPTransport(_Net(), ours)
    transport.set_protocol(protocol)
    transport._read = True
    _run(transport._read_from_sock())
    assert protocol.events == [("data", reason), ("lost", "KafkaConnectionError")]


@pytest.mark.parametrize(
    "text, rank",
    [
        ("SaslAuthenticationFailedError: Authentication failed: invalid credentials", 0),
        ("KafkaException: SASL authentication error: Authentication failed", 0),
        ("SSLCertVerificationError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed", 1),
        ("KafkaTimeoutError: SASL Authentication timed out", 2),
        ("KafkaConnectionError: socket disconnected", 2),
    ],
)
def test_only_a_refusal_no_retry_can_mend_ends_the_connection_wait(text, rank):
    assert telling(text) == rank


def test_a_refused_login_explains_more_than_a_later_login_that_timed_out():
    """A busy broker can let one attempt's login time out after others were refused: the
    refusal is the reason to show, not the timeout."""
    errors = [
        KafkaConnectionError("socket disconnected"),
        SaslAuthenticationFailedError("Authentication failed due to invalid credentials"),
        KafkaTimeoutError("SASL Authentication timed out"),
    ]
    assert most_telling(errors).startswith("SaslAuthenticationFailedError")


def test_the_clients_loggers_are_as_they_were_after_a_connection_attempt():
    """Its retry lines are held back while connecting only: a running client's are logged."""
    loggers = [logging.getLogger(f"kafka.net.{n}") for n in ("manager", "transport", "connection")]
    before = [(logger.level, logger.propagate, list(logger.handlers)) for logger in loggers]
    [port] = free_ports(1)  # nobody listens there
    with pytest.raises(KafkaConnectError, match=f"127.0.0.1:{port}"):
        _admin(KafkaConnection(f"127.0.0.1:{port}"), timeout_ms=300)
    assert [(logger.level, logger.propagate, list(logger.handlers)) for logger in loggers] == before


def test_ports_found_together_are_all_different():
    # one at a time, 200 ports repeat in most tries: the kernel hands a released port out again
    assert len(set(free_ports(200))) == 200
    listeners = {f"L{i}": "PLAINTEXT" for i in range(40)}
    broker = LocalKafkaBroker(listeners=listeners)
    try:
        assert len(set(broker.ports.values())) == len(broker.ports) == 42
    finally:
        broker.stop()

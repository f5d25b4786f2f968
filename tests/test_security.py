"""Credentials, against a real broker with a SASL_SSL listener (SCRAM-SHA-512, a certificate from
a CA made here): the worker, the simulator and the alerts tail connect with the right
credentials, fail at once with the reason given wrong ones, and never show the password."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import orjson
import pytest
import requests

from pipeline.cli import main
from pipeline.kafka_io.errors import KafkaConnectError
from pipeline.kafka_io.kafka_python import security_config
from pipeline.tools.local_broker import free_port
from tests.helpers import metric_values
from tests.kafka_support import build_app, consume, ensure_topics, names, worker_settings
from tests.tls_support import PASSWORD, USER, secure_broker
from tests.worker_support import FEATURES, train_fleet_detector

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    with secure_broker(tmp_path_factory.mktemp("tls")) as (address, certs):
        yield address, certs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_fleet_detector(tmp_path_factory.mktemp("fleet"))


def _security(cafile: Path, password: str = PASSWORD) -> dict:
    return dict(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username=USER,
        sasl_password=password,
        ssl_cafile=str(cafile),
    )


def _flags(cafile: Path, password: str = PASSWORD) -> list[str]:
    return [
        "--security-protocol",
        "SASL_SSL",
        "--sasl-mechanism",
        "SCRAM-SHA-512",
        "--sasl-username",
        USER,
        "--sasl-password",
        password,
        "--ssl-cafile",
        str(cafile),
    ]


def test_the_right_credentials_carry_a_stream_and_the_password_is_never_shown(
    secure, trained, caplog, capsys
):
    address, certs = secure
    topics = names("sasl")
    port = free_port()
    settings = worker_settings(
        address,
        topics,
        trained.artifact_dir,
        emit_all=True,
        http_port=port,
        **_security(certs["ca"]),
    )
    kafka = security_config(settings.kafka.connection)
    ensure_topics(address, {topics["input"]: {"num_partitions": 2}}, settings.kafka.connection)
    with caplog.at_level(logging.DEBUG):
        simulate = [
            "simulate",
            "--bootstrap-servers",
            address,
            "--topic",
            topics["input"],
            "--keys",
            "2",
            "--readings",
            "300",
            "--features",
            str(FEATURES),
            *_flags(certs["ca"]),
        ]
        assert main(simulate) == 0
        app = build_app(settings)
        try:
            stats = app.run()
            exposed = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        finally:
            app.close()
        tail = [
            "alerts",
            "--bootstrap-servers",
            address,
            "--topic",
            topics["output"],
            "--from-beginning",
            "--json",
            "--timeout",
            "5",
            *_flags(certs["ca"]),
        ]
        assert main(tail) == 0
    printed = capsys.readouterr()
    lines = [line for line in printed.out.splitlines() if line.startswith("{")]
    events = [orjson.loads(line) for line in lines if b'"aewatch.anomaly' in line.encode()]
    assert stats.windows_scored > 0
    assert len(events) == stats.windows_scored, "every window's event read back over SASL_SSL"
    assert metric_values(exposed), "metrics were served"
    produced = consume(address, topics["output"], security=kafka)
    assert len(produced) == stats.windows_scored
    for shown in (caplog.text, exposed, printed.out, printed.err):
        assert PASSWORD not in shown


@pytest.mark.parametrize(
    "wrong, reason",
    [("password", "SaslAuthenticationFailed"), ("ca", "CERTIFICATE_VERIFY_FAILED")],
)
def test_wrong_credentials_fail_fast_with_the_reason(
    secure, trained, wrong, reason, capsys, caplog
):
    address, certs = secure
    password = "not-the-password" if wrong == "password" else PASSWORD
    cafile = certs["other_ca"] if wrong == "ca" else certs["ca"]
    topics = names("badauth")
    settings = worker_settings(address, topics, trained.artifact_dir, **_security(cafile, password))
    started = time.monotonic()
    with pytest.raises(KafkaConnectError, match=reason) as raised:
        build_app(settings)
    assert time.monotonic() - started < 30, "an error, not a hang"
    assert address in str(raised.value) and PASSWORD not in str(raised.value)
    retries = [r.getMessage() for r in caplog.records if r.name.startswith("kafka.")]
    assert not retries, "the client's retry lines are folded into the one error"

    for command in (
        ["simulate", "--topic", topics["input"], "--keys", "1", "--readings", "400"],
        ["alerts", "--topic", topics["output"], "--timeout", "2"],
    ):
        started = time.monotonic()
        code = main([*command, "--bootstrap-servers", address, *_flags(cafile, password)])
        assert code == 2
        assert time.monotonic() - started < 30
        err = capsys.readouterr().err
        assert reason in err and f"aewatch {command[0]}: error" in err
        assert PASSWORD not in err
    assert PASSWORD not in caplog.text

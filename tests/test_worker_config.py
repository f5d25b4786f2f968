"""Worker settings: flags, AEWATCH_ variables, validation that names the setting, secrets."""

from __future__ import annotations

import argparse
import logging

import pytest

from pipeline.errors import ConfigError
from pipeline.kafka_io.kafka_python import security_config
from pipeline.worker.settings import WorkerSettings, add_worker_arguments, settings_from_args


def _settings(argv: list[str], environ: dict | None = None):
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    return settings_from_args(parser.parse_args(argv), environ or {})


BASE = ["--model", "models:/m@champion", "--bootstrap-servers", "k:9092", "--input-topic", "in"]


def test_environment_fills_in_and_flags_win():
    settings = _settings(
        ["--max-batch", "128"],
        {
            "AEWATCH_MODEL": "models:/m@champion",
            "AEWATCH_BOOTSTRAP_SERVERS": "k:9092",
            "AEWATCH_INPUT_TOPIC": "a,b",
            "AEWATCH_MAX_BATCH": "999",
            "AEWATCH_EMIT_ALL": "true",
            "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        },
    )
    assert settings.topics.input_topic == ("a", "b")
    assert settings.batching.max_batch == 128
    assert settings.events.emit_all is True
    assert settings.registry.tracking_uri == "http://mlflow:5000"


@pytest.mark.parametrize(
    "argv,environ,setting",
    [
        (["--max-batch", "many"], {}, "max_batch"),
        (["--max-batch", "0"], {}, "max_batch"),
        ([], {"AEWATCH_MAX_WAIT_MS": "soon"}, "max_wait_ms"),
        (["--order-policy", "shuffle"], {}, "order_policy"),
        (["--input-pattern", "("], {}, "input_pattern"),
        (["--security-protocol", "SASL_SSL"], {}, "sasl_mechanism"),
        (["--ssl-cafile", "/no/such/ca.pem"], {}, "ssl_cafile"),
        (["--output-topic", "in"], {}, "output_topic"),
        (["--input-topic", "^in.*"], {}, "input_topic"),  # a pattern given as a topic
        (["--dlq-topic", "dead letters"], {}, "dlq_topic"),
        ([], {"AEWATCH_STATE_TOPIC": "state/positions"}, "state_topic"),
        (["--alarm-topic", ".."], {}, "alarm_topic"),
        (["--output-topic", "e" * 250], {}, "output_topic"),
        (["--group-id", "pumps scoring"], {}, "state_topic"),  # the default state topic's name
        ([], {"AEWATCH_ADAPTIVE_THRESHOLD": "nan"}, "adaptive_threshold"),  # no bound to pass
        (["--drift-psi", "NaN"], {}, "drift_psi"),
        ([], {"AEWATCH_ALARM_COOLDOWN_S": "nan"}, "alarm_cooldown_s"),
        ([], {"AEWATCH_RELOAD_INTERVAL_S": "inf"}, "reload_interval_s"),  # no wait takes it
        (["--adaptive-min-std", "inf"], {}, "adaptive_min_std"),
        # found only when the connection failed (17 s later) or by MLflow's traceback
        (["--bootstrap-servers", "k:99999"], {}, "bootstrap_servers"),
        (["--bootstrap-servers", "k:9092,kafka-2"], {}, "bootstrap_servers"),
        (["--bootstrap-servers", ":9092"], {}, "bootstrap_servers"),
        (["--group-id", ""], {}, "group_id"),
        (["--client-id", " "], {}, "client_id"),
        ([], {"MLFLOW_TRACKING_URI": "foo://bar"}, "tracking_uri"),
        ([], {"MLFLOW_TRACKING_URI": "/var/lib/mlruns"}, "tracking_uri"),
        # a topic the worker writes that it also reads, or that mixes what it holds: accepted
        # before, and the state topic was then made compacted (the input's readings deleted)
        (["--state-topic", "in"], {}, "state_topic"),
        (["--alarm-topic", "in"], {}, "alarm_topic"),
        (["--dlq-topic", "in"], {}, "dlq_topic"),
        (["--output-topic", "x", "--dlq-topic", "x"], {}, "dlq_topic"),
        (["--state-topic", "aewatch.anomalies"], {}, "state_topic"),
        (["--alarm-topic", "aewatch.dlq"], {}, "dlq_topic"),
        (["--input-pattern", "aewatch[.].*"], {}, "output_topic"),
        (["--input-pattern", "pumps.*", "--group-id", "pumps"], {}, "state_topic"),
        # values that overflowed or asked for the impossible once the worker had connected
        (["--alarm-cooldown-s", "1e308"], {}, "alarm_cooldown_s"),
        ([], {"AEWATCH_KEY_TTL_S": "1e308"}, "key_ttl_s"),
        (["--drift-window", "100000000000000000"], {}, "drift_window"),
        (["--cpu-threads", "100000000000"], {}, "cpu_threads"),
        (["--processes", "100000"], {}, "processes"),
        (["--processes", "2", "--http-port", "65535"], {}, "processes"),  # member 1: 65536
        (["--session-timeout-ms", "300"], {}, "session_timeout_ms"),  # not above its heartbeat
        # below the session timeout: librdkafka refuses it once the consumer is made
        (
            ["--kafka-client", "confluent", "--max-poll-interval-ms", "5000"],
            {},
            "max_poll_interval_ms",
        ),
        (["--bootstrap-servers", "http://k:9092"], {}, "bootstrap_servers"),
        # credentials PLAINTEXT never sends: the protocol was forgotten
        (["--sasl-mechanism", "PLAIN", "--sasl-username", "u"], {}, "security_protocol"),
        # named only once the model was loaded (after the registry's wait, 22 s)
        (["--device", "gpu7"], {}, "device"),
        ([], {"AEWATCH_DEVICE": "cuda7"}, "device"),
    ],
)
def test_invalid_settings_fail_at_start_naming_the_setting(argv, environ, setting):
    base = BASE[:4] if "--input-pattern" in argv else BASE  # a pattern replaces the topic
    with pytest.raises(ConfigError) as error:
        _settings(base + argv, environ)
    assert error.value.setting == setting


@pytest.mark.parametrize("where", ["port in use", "no such host"])
def test_an_endpoint_that_cannot_listen_fails_before_the_model_or_kafka(where):
    """A port in use or a host that is not this machine's: named at once (it was a traceback
    after the model was loaded and the topics were made)."""
    import socket

    from pipeline.worker.app import WorkerApp

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        host = "127.0.0.1" if where == "port in use" else "nosuch.invalid"
        settings = _settings(  # nothing is at the model's folder or the broker's port
            ["--model", "/no/such/detector", "--bootstrap-servers", "127.0.0.1:1"]
            + ["--input-topic", "in", "--http-host", host, "--http-port", str(port)]
        )
        with pytest.raises(ConfigError) as error:
            WorkerApp.build(settings)
    assert error.value.setting == ("http_port" if where == "port in use" else "http_host")


def test_a_registry_model_without_a_tracking_uri_is_looked_up_where_the_commands_look(
    tmp_path, monkeypatch
):
    """Without MLFLOW_TRACKING_URI the worker reads the store of the working directory, as every
    command does; a missing one is one line, not an empty store made there by MLflow."""
    from pipeline.errors import RegistryError
    from pipeline.worker.app import WorkerApp

    monkeypatch.chdir(tmp_path)
    settings = _settings(BASE[:2] + ["--bootstrap-servers", "127.0.0.1:1", *BASE[4:]])
    assert settings.registry.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    with pytest.raises(RegistryError, match="no MLflow store at"):
        WorkerApp.build(settings.replace(http_port=-1))
    assert list(tmp_path.iterdir()) == []


def test_missing_required_settings_are_named():
    with pytest.raises(ConfigError, match="model"):
        _settings(["--bootstrap-servers", "k:9092", "--input-topic", "in"])


def test_secrets_never_appear_in_repr_or_logs(caplog):
    settings = _settings(
        BASE
        + [
            "--security-protocol",
            "SASL_SSL",
            "--sasl-mechanism",
            "SCRAM-SHA-512",
            "--sasl-username",
            "svc",
            "--sasl-password",
            "hunter2-secret",
        ]
    )
    assert "hunter2-secret" not in repr(settings)
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("settings %s", settings.redacted())
    assert "hunter2-secret" not in caplog.text and "***" in caplog.text
    assert security_config(settings.kafka.connection)["sasl_plain_password"] == "hunter2-secret"


def test_settings_survive_a_trip_through_the_command_line():
    settings = WorkerSettings.build(
        model="models:/pumps@champion",
        bootstrap_servers="k1:9092,k2:9092",
        group_id="g",
        input_topic=("a", "b"),
        output_topic="out",
        dlq_topic="dlq",
        emit_all=True,
        http_port=-1,
        max_batch=100,
        alarm_cooldown_s=1.5,
        sasl_password="kept-out-of-argv",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="svc",
    )
    argv = settings.to_argv()
    assert "kept-out-of-argv" not in argv
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    back = settings_from_args(
        parser.parse_args(argv), {"AEWATCH_SASL_PASSWORD": "kept-out-of-argv"}
    )
    assert back == settings


def test_members_take_their_settings_from_their_flags_not_the_supervisors_environment():
    """The GPU Deployment sets AEWATCH_PROCESSES: each member read it again and supervised
    members of its own (15 processes in 12 s, the machine out of memory in minutes). A member's
    flags leave defaults out, so any AEWATCH_ variable stood in for them: member 1's port 8080
    (the default) became the supervisor's 8079, and --max-batch 4096 (the default, over an
    AEWATCH_MAX_BATCH of 8) became 8."""
    from pipeline.worker.supervisor import member_process

    environ = {
        "AEWATCH_PROCESSES": "2",
        "AEWATCH_HTTP_PORT": "8079",
        "AEWATCH_MAX_BATCH": "8",
        "AEWATCH_ORDER_POLICY": "drop",
        "AEWATCH_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "AEWATCH_SASL_MECHANISM": "PLAIN",
        "AEWATCH_SASL_USERNAME": "aewatch",
        "AEWATCH_SASL_PASSWORD": "s3cret",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "HOME": "/home/aewatch",
    }
    flags = ["--max-batch", "4096", "--order-policy", "reject"]
    settings = _settings(BASE + flags, environ)
    assert settings.loop.processes == 2 and settings.batching.max_batch == 4096
    members = []
    for index in range(2):
        argv, env = member_process(settings, index, environ)
        assert "AEWATCH_PROCESSES" not in env and "AEWATCH_SASL_PASSWORD" not in argv
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["HOME"] == "/home/aewatch"
        members.append(_settings(argv[argv.index("worker") + 1 :], env))
    assert [m.loop.processes for m in members] == [1, 1]
    assert [m.http.http_port for m in members] == [8079, 8080]
    assert {(m.batching.max_batch, m.records.order_policy) for m in members} == {(4096, "reject")}
    assert {m.kafka.connection.sasl_password for m in members} == {"s3cret"}
    assert {m.registry.tracking_uri for m in members} == {"http://mlflow:5000"}


def test_cuda_where_there_is_none_is_refused_before_the_registry_is_asked(monkeypatch):
    """With the registry unreachable, the worker waited for it (`--registry-wait-s`) and then
    named the registry, never the device."""
    import torch

    from pipeline.worker.app import WorkerApp

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings = _settings(
        ["--model", "models:/m@champion", "--bootstrap-servers", "127.0.0.1:1"]
        + ["--input-topic", "in", "--device", "cuda", "--registry-wait-s", "60"],
        {"MLFLOW_TRACKING_URI": "http://127.0.0.1:1"},
    )
    with pytest.raises(ConfigError) as error:
        WorkerApp.build(settings)
    assert error.value.setting == "device"

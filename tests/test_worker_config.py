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
    ],
)
def test_invalid_settings_fail_at_start_naming_the_setting(argv, environ, setting):
    base = BASE[:4] if "--input-pattern" in argv else BASE  # a pattern replaces the topic
    with pytest.raises(ConfigError) as error:
        _settings(base + argv, environ)
    assert error.value.setting == setting


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

"""Credentials in URI settings never reach the logs: the userinfo password (or token) and the
query-string secrets of every URI are masked in `redacted()` and in the worker's "ready" line."""

from __future__ import annotations

import logging

import pytest

from pipeline.uris import mask_uri
from pipeline.worker.settings import WorkerSettings
from tests.kafka_support import build_app, names, worker_settings
from tests.worker_support import train_fleet_detector

TOKEN = "tok-9f3e-not-for-logs"
SIG = "sig-77aa-not-for-logs"
URI = f"https://svc-user:{TOKEN}@mlflow.example.com:8443/root?sig={SIG}&region=eu"


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        (URI, "https://svc-user:***@mlflow.example.com:8443/root?sig=***&region=eu"),
        (f"http://{TOKEN}@host/", "http://***@host/"),
        (f"postgresql://u:{TOKEN}@db/mlflow", "postgresql://u:***@db/mlflow"),
        (f"s3://bucket/p?X-Amz-Signature={SIG}&X-Amz-Credential=c", None),
        ("sqlite:///tmp/mlflow.db", "sqlite:///tmp/mlflow.db"),
        ("databricks", "databricks"),
    ],
)
def test_uris_are_masked(uri, shown):
    masked = mask_uri(uri)
    assert TOKEN not in masked and SIG not in masked
    if shown is not None:
        assert masked == shown


def test_redacted_settings_mask_every_uri():
    settings = WorkerSettings.build(
        model="models:/m@champion",
        tracking_uri=URI,
        bootstrap_servers="b:9092",
        input_topic=("t",),
    )
    text = repr(settings.redacted())
    assert TOKEN not in text and SIG not in text
    assert "svc-user:***@mlflow.example.com" in text


@pytest.mark.kafka
def test_the_ready_line_shows_no_uri_credentials(kafka_bootstrap, tmp_path, caplog):
    trained = train_fleet_detector(tmp_path)
    settings = worker_settings(
        kafka_bootstrap, names("mask"), trained.artifact_dir, tracking_uri=URI
    )
    # The package's own level too: an in-process demo earlier in the session quiets "pipeline".
    with (
        caplog.at_level(logging.DEBUG),
        caplog.at_level(logging.DEBUG, logger="pipeline"),
        build_app(settings),
    ):
        pass
    ready = [r.getMessage() for r in caplog.records if "worker ready" in r.getMessage()]
    assert ready, "the worker logged its ready line"
    assert TOKEN not in caplog.text and SIG not in caplog.text
    assert "svc-user:***@" in ready[0]

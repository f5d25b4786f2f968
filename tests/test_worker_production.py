"""The worker in production shape, against the real broker: alarm episodes and metrics over HTTP,
several members sharing partitions, exactly-once output, image streams."""

from __future__ import annotations

import base64
import io
import os
import signal
import threading
import time
from collections import Counter

import numpy as np
import orjson
import pytest
import requests
from jsonschema import Draft202012Validator
from PIL import Image

from pipeline.events import ALARM_SCHEMA, event_id, event_schema
from pipeline.modalities.images import encode_image_record
from pipeline.registry.client import resolve_model
from pipeline.tools.local_broker import free_port
from tests.helpers import metric_values, wait_until
from tests.kafka_support import (
    build_app,
    consume,
    names,
    produce,
    run_worker,
    stream_items,
    wait_for_log,
    worker_process,
    worker_settings,
)
from tests.test_worker_ops import long_anomaly_stream
from tests.worker_support import flags_by_window, fleet, train_fleet_detector

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_fleet_detector(tmp_path_factory.mktemp("fleet"))


def all_window_ids(trained, stream) -> set[str]:
    """The id of every window of `stream` as a worker serving the artifact folder names it."""
    model = resolve_model(str(trained.artifact_dir)).identity()
    windows, _, _ = flags_by_window(stream, trained.detector)
    return {
        event_id(model, str(k), int(e))
        for k, e in zip(windows.keys, windows.end_times, strict=True)
    }


def test_alarm_episodes_and_metrics_over_http(kafka_bootstrap, create_topic, trained):
    topics = names("alarms")
    create_topic(topics["input"], partitions=2)
    stream = long_anomaly_stream(seed=41)
    bad = [(b"machine-000", b"{broken"), (b"machine-001", orjson.dumps({"ts": 5, "values": {}}))]
    items = stream_items(stream)
    items = items[:500] + bad + items[500:]
    produce(kafka_bootstrap, topics["input"], items)
    port = free_port()
    settings = worker_settings(
        kafka_bootstrap, topics, trained.artifact_dir, events="alarms", http_port=port
    )
    app = build_app(settings)
    try:
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        assert requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 503
        runner = threading.Thread(target=app.run, daemon=True)
        runner.start()
        deadline = time.monotonic() + 60
        while requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.2)
        runner.join(timeout=180)
        assert not runner.is_alive()
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        app.stop()
        app.close()

    events = [orjson.loads(r.value) for r in consume(kafka_bootstrap, topics["output"])]
    (bad_key,) = {t.key for t in stream.truth}
    assert [(e["type"], e["subject"]) for e in events] == [
        ("aewatch.alarm.opened", bad_key),
        ("aewatch.alarm.resolved", bad_key),
    ]
    validator = Draft202012Validator(event_schema(ALARM_SCHEMA))
    for event in events:
        validator.validate(event)

    values = metric_values(text)
    windows, _, _ = flags_by_window(stream, trained.detector)
    assert values[("aewatch_records_total", (("topic", topics["input"]),))] == len(items)
    assert values[("aewatch_windows_scored_total", ())] == len(windows)
    assert values[("aewatch_dead_letters_total", (("reason", "decode_error"),))] == 1
    assert values[("aewatch_dead_letters_total", (("reason", "missing_feature"),))] == 1
    assert values[("aewatch_events_total", (("type", "alarm_opened"),))] == 1
    assert values[("aewatch_events_total", (("type", "alarm_resolved"),))] == 1
    assert values[("aewatch_end_to_end_latency_seconds_count", ())] == len(windows)
    assert values[("aewatch_commits_total", ())] >= 1
    lags = [v for (name, _), v in values.items() if name == "aewatch_consumer_lag"]
    assert len(lags) == 2 and all(v == 0 for v in lags), "both partitions read to the end"


def _log_end(bootstrap: str, topic: str) -> int:
    """The topic's records and transaction markers, committed or not (its log-end offsets)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return sum(consumer.end_offsets(partitions).values())
    finally:
        consumer.close()


def _ids(bootstrap: str, topic: str, **kwargs) -> list[str]:
    return [orjson.loads(r.value)["id"] for r in consume(bootstrap, topic, **kwargs)]


@pytest.mark.parametrize("assignor", ["range", "cooperative-sticky"])
def test_members_joining_and_leaving_hand_over_without_losing_or_repeating_windows(
    kafka_bootstrap, create_topic, trained, tmp_path, assignor
):
    topics = names("handover")
    create_topic(topics["input"], partitions=4)
    stream = fleet(seed=42, keys=8, readings_per_key=1200)
    items = stream_items(stream)
    third = len(items) // 3
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    common = ("--emit-all", "--stop-after-idle-s", "12", "--assignor", assignor)
    produce(kafka_bootstrap, topics["input"], items[:third])
    first = worker_process(kafka_bootstrap, topics, trained.artifact_dir, log_a, *common)
    wait_for_log(first, log_a, b'"checkpoint')
    second = worker_process(
        kafka_bootstrap, topics, trained.artifact_dir, log_b, *common, "--group-instance-id", "b"
    )
    wait_for_log(second, log_b, b"assigned [(")
    produce(kafka_bootstrap, topics["input"], items[third : 2 * third])
    wait_for_log(second, log_b, b'"checkpoint')
    os.killpg(second.pid, signal.SIGTERM)  # graceful: finish, commit, leave the group
    assert second.wait(timeout=60) == 0, log_b.read_text()[-3000:]
    produce(kafka_bootstrap, topics["input"], items[2 * third :])
    assert first.wait(timeout=180) == 0, log_a.read_text()[-3000:]

    ids = _ids(kafka_bootstrap, topics["output"])
    assert set(ids) == all_window_ids(trained, stream), "every window scored"
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    assert repeated == [], f"{len(repeated)} windows emitted twice across graceful handovers"
    assert b"revoked [(" in log_a.read_bytes(), "the first member gave partitions away"


def test_a_member_killed_mid_stream_loses_no_window(
    kafka_bootstrap, create_topic, trained, tmp_path
):
    topics = names("kill")
    create_topic(topics["input"], partitions=4)
    stream = fleet(seed=43, keys=8, readings_per_key=1200)
    items = stream_items(stream)
    half = len(items) // 2
    produce(kafka_bootstrap, topics["input"], items[:half])
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    common = ("--emit-all", "--stop-after-idle-s", "15")
    workers = [
        worker_process(kafka_bootstrap, topics, trained.artifact_dir, log, *common) for log in logs
    ]
    for proc, log in zip(workers, logs, strict=True):
        wait_for_log(proc, log, b'"checkpoint')
    os.killpg(workers[0].pid, signal.SIGKILL)
    workers[0].wait()
    produce(kafka_bootstrap, topics["input"], items[half:])
    assert workers[1].wait(timeout=180) == 0, logs[1].read_text()[-3000:]
    ids = _ids(kafka_bootstrap, topics["output"])
    assert set(ids) == all_window_ids(trained, stream)


def test_exactly_once_output_survives_a_sigkill(kafka_bootstrap, create_topic, trained, tmp_path):
    topics = names("eos")
    create_topic(topics["input"], partitions=2)
    stream = fleet(seed=44, keys=4, readings_per_key=2000)
    items = stream_items(stream)
    head = len(items) // 5
    produce(kafka_bootstrap, topics["input"], items[:head])
    log = tmp_path / "worker.log"
    eos = (
        "--emit-all",
        "--exactly-once",
        "--transactional-id",
        f"{topics['group']}-0",
        "--commit-interval-ms",
        "3000",  # a long transaction: the kill lands inside one
    )
    first = worker_process(kafka_bootstrap, topics, trained.artifact_dir, log, *eos)
    wait_for_log(first, log, b'"checkpoint')

    def feed():  # the rest arrives while the worker runs, so a transaction is always open
        for start in range(head, len(items), 100):
            produce(kafka_bootstrap, topics["input"], items[start : start + 100])
            time.sleep(0.05)

    written = _log_end(kafka_bootstrap, topics["output"])  # the first transaction, committed
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    wait_until(
        lambda: _log_end(kafka_bootstrap, topics["output"]) > written, 60, "events of a new one"
    )
    time.sleep(0.3)  # (events keep coming: one committed meanwhile leaves the next one open)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    second = worker_process(kafka_bootstrap, topics, trained.artifact_dir, log, *eos)
    feeder.join()
    assert second.wait(timeout=180) == 0, log.read_text()[-3000:]

    committed = _ids(kafka_bootstrap, topics["output"], committed_only=True)
    assert set(committed) == all_window_ids(trained, stream)
    repeated = [i for i, n in Counter(committed).items() if n > 1]
    assert repeated == [], f"{len(repeated)} duplicate event ids for a read_committed consumer"
    everything = _ids(kafka_bootstrap, topics["output"])
    assert len(everything) > len(committed), "the killed transaction's events were aborted"


def test_an_image_stream_of_digits_flags_the_other_digits(kafka_bootstrap, create_topic, tmp_path):
    from pipeline.detector import ModelConfig
    from training.fit import FitConfig
    from training.job import CalibrationSettings, TrainSettings, train

    result = train(
        TrainSettings(
            data="digits",
            normal_class="0",
            out=str(tmp_path / "digits"),
            model=ModelConfig(kind="undercomplete", backbone="conv", hidden=(16, 32), code_size=8),
            fit=FitConfig(
                min_steps=0,
                schedule="constant",
                patience_steps=0,
                epochs=60,
                batch_size=32,
                lr=3e-3,
                patience=10,
            ),
            calibration=CalibrationSettings(method="quantile", target_fpr=0.05),
            device="cpu",
        )
    )
    test = result.data.splits["test"]
    images, labels = test.images, test.labels.astype(bool)
    topics = names("images")
    create_topic(topics["input"], partitions=2)
    start_ms = 1_767_225_600_000
    items = []
    for i, image in enumerate(images):
        headers = [("aewatch.ts", str(start_ms + 1000 * i).encode())]
        items.append((f"camera-{i % 3}".encode(), encode_image_record(image, "npy"), headers))
    wrong = encode_image_record(np.zeros((1, 16, 16), np.float32), "npy")
    items += [(b"camera-0", wrong, []), (b"camera-1", b"not an image", [])]
    produce(kafka_bootstrap, topics["input"], items)
    _, stats = run_worker(worker_settings(kafka_bootstrap, topics, result.artifact_dir))
    assert stats.windows_scored == len(images)

    events = [orjson.loads(r.value) for r in consume(kafka_bootstrap, topics["output"])]
    validator = Draft202012Validator(event_schema())
    flagged = set()
    for event in events:
        validator.validate(event)
        flagged.add(int((_ms(event["data"]["image"]["time"]) - start_ms) // 1000))
    anomalous = set(np.flatnonzero(labels).tolist())
    recall = len(flagged & anomalous) / len(anomalous)
    false_rate = len(flagged - anomalous) / max(1, int((~labels).sum()))
    assert recall > 0.8, f"only {recall:.0%} of the other digits raised an event"
    assert false_rate < 0.2, f"{false_rate:.0%} of normal digits raised an event"
    error_map = Image.open(
        io.BytesIO(base64.b64decode(events[0]["data"]["image"]["error_map_png"]))
    )
    assert error_map.size == (8, 8)
    dead = consume(kafka_bootstrap, topics["dlq"])
    reasons = sorted(dict(r.headers)["aewatch.dlq.reason"].decode() for r in dead)
    assert reasons == ["decode_error", "image_shape"]


def _ms(iso: str) -> int:
    return int(np.datetime64(iso.rstrip("Z"), "ms").astype(np.int64))

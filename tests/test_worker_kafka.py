"""The worker against the real broker: detection, crash recovery, dead letters, batch parity."""

from __future__ import annotations

import os
import signal
import uuid

import numpy as np
import orjson
import pandas as pd
import pytest
from jsonschema import Draft202012Validator
from scipy import stats

from pipeline.events import event_schema
from pipeline.kafka_io.settings import CLIENTS
from tests.kafka_support import (
    consume,
    produce,
    run_worker,
    stream_items,
    topic_settings,
    wait_for_log,
    worker_process,
    worker_settings,
)
from tests.kafka_support import names as topic_names
from tests.worker_support import flags_by_window, fleet, train_fleet_detector

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_fleet_detector(tmp_path_factory.mktemp("fleet"))


def test_every_injected_anomaly_yields_an_event(kafka_bootstrap, create_topic, trained):
    names = topic_names("detect")
    create_topic(names["input"], partitions=4)
    stream = fleet(seed=21, keys=6, anomalous_keys=3, readings_per_key=1700)
    assert len(stream.keys) >= 10_000
    produce(kafka_bootstrap, names["input"], stream_items(stream))
    worker, stats = run_worker(worker_settings(kafka_bootstrap, names, trained.artifact_dir))
    windows, _, _ = flags_by_window(stream, trained.detector)
    assert stats.windows_scored == len(windows)

    events = [orjson.loads(r.value) for r in consume(kafka_bootstrap, names["output"])]
    validator = Draft202012Validator(event_schema())
    for event in events:
        validator.validate(event)
    spec = trained.detector.input.window
    for truth in stream.truth:
        hits = [
            e
            for e in events
            if e["subject"] == truth.key
            and truth.start_ms
            <= _ms(e["data"]["window"]["end"])
            <= truth.end_ms + (spec.length - 1) * 1000
        ]
        assert hits, f"no event for {truth.kind} on {truth.key}"

    clean_keys = {f"machine-{i:03d}" for i in range(3, 6)}
    clean_windows = int(np.isin(windows.keys, list(clean_keys)).sum())
    false_events = sum(e["subject"] in clean_keys for e in events)
    target = trained.detector.threshold.params["target_fpr"]
    assert _ci_low(false_events, clean_windows) <= target, (
        f"{false_events} false events in {clean_windows} clean windows"
    )


def _ci_low(k: int, n: int) -> float:
    return float(stats.binomtest(k, n).proportion_ci(0.95, method="exact").low)


def _ms(iso: str) -> int:
    return int(pd.Timestamp(iso).value // 1_000_000)


def test_sigkill_and_restart_scores_every_window(kafka_bootstrap, create_topic, trained, tmp_path):
    stream = fleet(seed=22, keys=4, readings_per_key=2500)
    items = stream_items(stream)
    half = len(items) // 2

    clean = topic_names("clean")
    create_topic(clean["input"], partitions=4)
    produce(kafka_bootstrap, clean["input"], items)
    run_worker(worker_settings(kafka_bootstrap, clean, trained.artifact_dir))
    clean_ids = {orjson.loads(r.value)["id"] for r in consume(kafka_bootstrap, clean["output"])}
    assert clean_ids

    crash = topic_names("crash")
    create_topic(crash["input"], partitions=4)
    produce(kafka_bootstrap, crash["input"], items[:half])
    log = tmp_path / "worker.log"
    first = worker_process(kafka_bootstrap, crash, trained.artifact_dir, log)
    wait_for_log(first, log, b'"checkpoint')
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    produce(kafka_bootstrap, crash["input"], items[half:])
    second = worker_process(kafka_bootstrap, crash, trained.artifact_dir, log)
    assert second.wait(timeout=180) == 0, log.read_text()[-3000:]
    events = [orjson.loads(r.value) for r in consume(kafka_bootstrap, crash["output"])]
    ids = [e["id"] for e in events]
    assert set(ids) == clean_ids
    by_id = {}
    for event in events:  # duplicates are replays of the same window: same content
        by_id.setdefault(event["id"], event["data"]["score"])
        assert by_id[event["id"]] == pytest.approx(event["data"]["score"], rel=1e-6)


def test_malformed_records_land_in_the_dlq(kafka_bootstrap, create_topic, trained):
    names = topic_names("dlq")
    create_topic(names["input"], partitions=2)
    stream = fleet(seed=23, keys=2, readings_per_key=800, anomalies=())
    good = stream_items(stream)
    features = trained.detector.input.features
    values = {f: 0.5 for f in features}
    bad = [
        (b"machine-000", b"{oops", "decode_error"),
        (b"machine-001", b"\xc3\x28", "decode_error"),
        (b"machine-000", orjson.dumps({"ts": 1, "values": {features[0]: 1}}), "missing_feature"),
        (
            b"machine-001",
            orjson.dumps({"ts": 1, "values": {**values, features[2]: "high"}}),
            "schema_mismatch",
        ),
        (
            b"machine-000",
            orjson.dumps({"ts": 1, "values": {**values, features[1]: 1e300}}),
            "non_finite",
        ),
        (b"machine-001", orjson.dumps({"values": values}), "bad_timestamp"),
        (
            b"machine-000",
            orjson.dumps({"ts_start": 1, "ts_end": 2, "values": [[1.0]]}),
            "window_shape",
        ),
        (None, orjson.dumps({"ts": 1, "values": values}), "schema_mismatch"),
    ]
    items, sent_reasons = [], []
    for i, item in enumerate(good):
        items.append(item)
        if i % 150 == 75 and len(sent_reasons) < len(bad):
            key, value, reason = bad[len(sent_reasons)]
            items.append((key, value))
            sent_reasons.append(reason)
    assert len(sent_reasons) == len(bad)
    produce(kafka_bootstrap, names["input"], items)
    _, stats = run_worker(worker_settings(kafka_bootstrap, names, trained.artifact_dir))
    dead = consume(kafka_bootstrap, names["dlq"])
    reasons = sorted(dict(r.headers)["aewatch.dlq.reason"].decode() for r in dead)
    assert reasons == sorted(sent_reasons)
    for record in dead:
        headers = dict(record.headers)
        assert headers["aewatch.source.topic"].decode() == names["input"]
        assert int(headers["aewatch.source.offset"]) >= 0
    windows, _, _ = flags_by_window(stream, trained.detector)
    assert stats.windows_scored == len(windows)


def test_worker_and_score_command_agree(kafka_bootstrap, create_topic, trained, tmp_path, capsys):
    from pipeline.cli import main

    names = topic_names("parity")
    create_topic(names["input"], partitions=3)
    stream = fleet(seed=24, keys=3, readings_per_key=700)
    produce(kafka_bootstrap, names["input"], stream_items(stream))
    run_worker(worker_settings(kafka_bootstrap, names, trained.artifact_dir, emit_all=True))
    events = {}
    for record in consume(kafka_bootstrap, names["output"]):
        event = orjson.loads(record.value)
        events[event["id"]] = event["data"]["score"]

    frame = pd.DataFrame(stream.values, columns=list(stream.features))
    frame.insert(0, "key", stream.keys)
    frame.insert(0, "ts", pd.to_datetime(stream.ts_ms, unit="ms"))
    frame.to_csv(tmp_path / "readings.csv", index=False)
    assert (
        main(
            [
                "score",
                "--model",
                str(trained.artifact_dir),
                "--data",
                str(tmp_path / "readings.csv"),
                "--key-col",
                "key",
                "--out",
                str(tmp_path / "scores.parquet"),
            ]
        )
        == 0
    )
    scored = pd.read_parquet(tmp_path / "scores.parquet")
    assert len(scored) == len(events)
    assert dict(zip(scored["event_id"], scored["score"], strict=True)) == pytest.approx(
        events, rel=1e-6
    )


def test_simulate_and_alerts_commands(kafka_bootstrap, create_topic, tmp_path, capsys):
    from pipeline.cli import main

    topic = create_topic(f"sim-{uuid.uuid4().hex[:8]}", partitions=2)
    truth = tmp_path / "truth.csv"
    assert (
        main(
            [
                "simulate",
                "--bootstrap-servers",
                kafka_bootstrap,
                "--topic",
                topic,
                "--keys",
                "3",
                "--readings",
                "400",
                "--features",
                "pressure,flow,temp",
                "--anomalies",
                "spike,stuck,drift",
                "--truth",
                str(truth),
            ]
        )
        == 0
    )
    readings = [orjson.loads(r.value) for r in consume(kafka_bootstrap, topic, idle_s=2)]
    assert len(readings) == 1200
    assert set(readings[0]["values"]) == {"pressure", "flow", "temp"}
    injected = pd.read_csv(truth)
    assert sorted(injected["kind"]) == ["drift", "spike", "stuck"]
    capsys.readouterr()

    events = create_topic(f"ev-{uuid.uuid4().hex[:8]}")
    event = {
        "specversion": "1.0",
        "id": "x",
        "type": "aewatch.anomaly.v1",
        "subject": "m-1",
        "time": "2026-01-01T00:00:00.000Z",
        "data": {
            "score": 2.0,
            "severity": 4.0,
            "p_value": 0.001,
            "window": {"end": "2026-01-01T00:00:00.000Z"},
            "top_features": [{"name": "flow", "error": 3.0}],
            "model": {"name": "pumps", "version": "3"},
        },
    }
    good = orjson.dumps(event)
    # records another producer left on the topic, or events whose fields have other types
    strange = [
        b"not json",
        orjson.dumps({**event, "data": {**event["data"], "score": "high"}}),
        orjson.dumps({**event, "data": {**event["data"], "top_features": [{"error": 3.0}]}}),
        orjson.dumps({**event, "data": [1, 2]}),
    ]
    produce(kafka_bootstrap, events, [(b"m-1", v) for v in [good, *strange, good]])
    assert (
        main(
            [
                "alerts",
                "--bootstrap-servers",
                kafka_bootstrap,
                "--topic",
                events,
                "--from-beginning",
                "--max",
                "6",
                "--timeout",
                "20",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and lines[0] == lines[5]
    assert "m-1" in lines[0] and "flow" in lines[0] and "pumps v3" in lines[0]
    assert lines[1:5] == [f"(not an aewatch event at offset {i})" for i in range(1, 5)]


def test_alerts_max_stops_at_that_many_events_when_a_poll_spans_partitions(
    kafka_bootstrap, create_topic, capsys
):
    """One poll returns the records of every partition; --max 5 prints 5 events, not 5 and one
    more for each further partition of that poll."""
    from kafka import KafkaProducer

    from pipeline.cli import main

    topic = create_topic(f"max-{uuid.uuid4().hex[:8]}", partitions=3)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for partition in range(3):
        for i in range(4):
            event = {"type": "aewatch.anomaly.v1", "subject": f"m-{partition}-{i}", "data": {}}
            producer.send(topic, key=b"m", value=orjson.dumps(event), partition=partition)
    producer.flush()
    producer.close()
    argv = ["alerts", "--bootstrap-servers", kafka_bootstrap, "--topic", topic]
    assert main([*argv, "--from-beginning", "--max", "5", "--timeout", "20"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5, lines


def test_simulate_names_a_topic_a_broker_without_auto_create_does_not_have(capsys):
    """On a broker that does not create topics on first use, simulate waited 60 s for the topic
    and ended with a KafkaTimeoutError traceback; now it says so in seconds, with both clients."""
    import time

    from pipeline.cli import main
    from pipeline.tools.local_broker import LocalKafkaBroker

    with LocalKafkaBroker(extra_properties={"auto.create.topics.enable": "false"}) as broker:
        for client in CLIENTS:
            argv = ["simulate", "--bootstrap-servers", broker.bootstrap_servers, "--topic"]
            argv += [f"nosuch-{uuid.uuid4().hex[:8]}", "--keys", "1", "--readings", "100"]
            started = time.monotonic()
            code = main([*argv, "--anomalies", "", "--kafka-client", client])
            err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
            assert code == 2 and time.monotonic() - started < 20, err
            assert "Traceback" not in "\n".join(err) and "does not exist" in err[-1], err
            assert "--topic" in err[-1], err


@pytest.mark.parametrize("kafka_client", CLIENTS)
def test_a_partition_of_thousands_of_keys_checkpoints_and_restores_its_state(
    kafka_bootstrap, create_topic, trained, kafka_client
):
    """3,000 keys on one partition, with adaptive and alarm state: the partition's state record
    is larger than Kafka's default 1 MB message limit. It is written, and a second worker
    restores it and continues every key's windows: each window is scored once over both."""
    from pipeline.tools.simulate import simulate_fleet

    names = topic_names(f"wide-{kafka_client}")
    create_topic(names["input"], partitions=1)
    stream = simulate_fleet(
        keys=3000, readings_per_key=24, features=4, anomalies=(), seed=0, skip=6000
    )
    items = stream_items(stream)
    order = np.argsort(stream.ts_ms, kind="stable")  # every key's first 16 readings first
    first = [items[i] for i in order[: 16 * 3000]]
    produce(kafka_bootstrap, names["input"], first)
    settings = worker_settings(
        kafka_bootstrap, names, trained.artifact_dir, events="both", kafka_client=kafka_client
    )
    _, stats = run_worker(settings)
    assert stats.windows_scored == 3000  # each key's window ending at its 16th reading
    made = topic_settings(kafka_bootstrap, settings.state_topic_name, "cleanup.policy")
    assert made["cleanup.policy"] == ("compact", "DYNAMIC_TOPIC_CONFIG")  # the latest record kept
    produce(kafka_bootstrap, names["input"], [items[i] for i in order[16 * 3000 :]])
    worker, stats = run_worker(settings)
    assert stats.windows_scored == 2 * 3000  # those ending at the 20th and the 24th
    assert worker.metrics.state_refused._value.get() == 0

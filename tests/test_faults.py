"""Faults the worker must ride out, against real services: a broker restart mid-stream, an
MLflow server that is not there when the worker starts."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import threading
import time
from pathlib import Path

import orjson
import pytest
import requests
from kafka import KafkaProducer

from pipeline.errors import RegistryError
from pipeline.events import event_id
from pipeline.registry.client import resolve_model
from pipeline.tools.local_broker import LocalKafkaBroker, free_port
from tests.helpers import metric_values, wait_until
from tests.kafka_support import (
    build_app,
    consume,
    ensure_topics,
    names,
    produce,
    stream_items,
    worker_process,
    worker_settings,
)
from tests.test_worker_production import all_window_ids
from tests.worker_support import flags_by_window, fleet, train_fleet_detector


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_fleet_detector(tmp_path_factory.mktemp("fleet"))


@pytest.mark.kafka
@pytest.mark.faults
def test_the_worker_rides_out_a_broker_restart(trained, kafka_bootstrap):
    # a broker of this test's own, so that stopping it disturbs nothing else
    broker = LocalKafkaBroker().start()
    try:
        bootstrap = broker.bootstrap_servers
        topics = names("restart")
        ensure_topics(bootstrap, {topics["input"]: {"num_partitions": 2}})
        stream = fleet(seed=71, keys=4, readings_per_key=1500)
        items = stream_items(stream)
        half = len(items) // 2
        produce(bootstrap, topics["input"], items[:half])
        settings = worker_settings(
            bootstrap, topics, trained.artifact_dir, emit_all=True, stop_after_idle_s=0
        )
        app = build_app(settings)
        runner = threading.Thread(target=app.run, daemon=True)
        runner.start()
        try:
            wait_until(lambda: app.worker.stats.records_in >= half, 60, "the first half")
            broker.stop(remove_data=False)
            time.sleep(3.0)
            broker.start()
            back = time.monotonic()
            produce(bootstrap, topics["input"], items[half:])
            seen = app.worker.stats.records_in
            wait_until(lambda: app.worker.stats.records_in > seen, 60, "reading after the restart")
            recovered_s = time.monotonic() - back
            print(f"read again {recovered_s:.1f}s after the broker returned")
            wait_until(lambda: app.worker.stats.records_in >= len(items), 60, "the second half")
            assert runner.is_alive(), "the worker kept running through the outage"
        finally:
            app.stop()
            runner.join(timeout=60)
            app.close()
        assert recovered_s <= 30, f"took {recovered_s:.1f}s to read again after the restart"
        ids = {orjson.loads(r.value)["id"] for r in consume(bootstrap, topics["output"])}
        assert ids == all_window_ids(trained, stream), "nothing lost across the restart"
    finally:
        broker.stop()


def test_an_unreachable_registry_at_start_is_a_clear_error_not_a_hang(monkeypatch):
    from pipeline.registry import reach

    monkeypatch.setattr(reach, "_budget", [0.0])  # as `aewatch worker` sets it: one attempt
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # (`worker_environment`)
    settings = worker_settings(
        "127.0.0.1:9",
        names("nomlflow"),
        "models:/pumps@champion",
        tracking_uri=f"http://127.0.0.1:{free_port()}",
    )
    started = time.monotonic()
    with pytest.raises(RegistryError, match="models:/pumps@champion"):
        build_app(settings)
    assert time.monotonic() - started < 5, "fails at once by default"

    patient = settings.replace(registry_wait_s=3.0)
    started = time.monotonic()
    with pytest.raises(RegistryError, match="models:/pumps@champion"):
        build_app(patient)
    assert 3.0 <= time.monotonic() - started < 10, "retried for registry_wait_s, then failed"


class _SlowDevice:
    """A detector whose every forward pass stalls for `delay_s`, as a slow or busy device would."""

    def __init__(self, detector, delay_s: float) -> None:
        self._detector, self.delay_s, self.calls = detector, delay_s, 0

    def score(self, windows, **kwargs):
        self.calls += 1
        time.sleep(self.delay_s)
        return self._detector.score(windows, **kwargs)

    def __getattr__(self, name):
        return getattr(self._detector, name)


@pytest.mark.kafka
@pytest.mark.faults
def test_batches_slower_than_the_poll_interval_cause_no_rebalance_storm(
    trained, kafka_bootstrap, caplog
):
    topics = names("slow")
    ensure_topics(kafka_bootstrap, {topics["input"]: {"num_partitions": 2}})
    stream = fleet(seed=73, keys=4, readings_per_key=600)
    produce(kafka_bootstrap, topics["input"], stream_items(stream))
    settings = worker_settings(
        kafka_bootstrap,
        topics,
        trained.artifact_dir,
        emit_all=True,
        max_poll_interval_ms=1500,
        max_poll_records=600,
        max_batch=150,
    )
    app = build_app(settings)
    slow = app.worker.detector = _SlowDevice(app.worker.detector, delay_s=2.5)
    try:
        with caplog.at_level(logging.INFO):
            stats = app.run()
    finally:
        app.close()
    ids = [orjson.loads(r.value)["id"] for r in consume(kafka_bootstrap, topics["output"])]
    assert set(ids) == all_window_ids(trained, stream), "every window scored"
    assert slow.calls >= 2, "several batches each stalled past max.poll.interval.ms"
    said = [r.getMessage() for r in caplog.records]
    assignments = [m for m in said if m.startswith("assigned [(")]
    assert len(assignments) == 1, f"one assignment, no rebalance storm: {assignments}"
    assert not [m for m in said if "poll timeout has expired" in m or "commit refused" in m]
    assert len(ids) == len(set(ids)), "no batch was scored twice after an eviction"
    assert stats.commits >= 1


class _SlowOnce(_SlowDevice):
    """One forward pass (the third: a transaction holds the first two's events) stalls for
    `delay_s`; the rest run at once."""

    def score(self, windows, **kwargs):
        self.calls += 1
        if self.calls == 3:
            time.sleep(self.delay_s)
        return self._detector.score(windows, **kwargs)


@pytest.mark.kafka
@pytest.mark.faults
def test_a_pass_slower_than_ten_seconds_with_exactly_once_commits_every_window_once(
    trained, kafka_bootstrap
):
    """The transaction held open across a slow pass was aborted by the broker after 10 s: the
    worker died, and the restart read the same batch and died again."""
    topics = names("slowtx")
    ensure_topics(kafka_bootstrap, {topics["input"]: {"num_partitions": 2}})
    stream = fleet(seed=74, keys=4, readings_per_key=300)
    produce(kafka_bootstrap, topics["input"], stream_items(stream))
    settings = worker_settings(
        kafka_bootstrap,
        topics,
        trained.artifact_dir,
        emit_all=True,
        exactly_once=True,
        max_poll_records=200,
        max_batch=100,
    )
    app = build_app(settings)
    app.worker.detector = _SlowOnce(app.worker.detector, delay_s=25)
    try:
        stats = app.run()
    finally:
        app.close()
    records = consume(kafka_bootstrap, topics["output"], committed_only=True)
    ids = [orjson.loads(r.value)["id"] for r in records]
    assert len(ids) == len(set(ids)) and set(ids) == all_window_ids(trained, stream)
    assert stats.commits >= 1


def _count(log, needle: bytes) -> int:
    return log.read_bytes().count(needle) if log.exists() else 0


@pytest.mark.kafka
@pytest.mark.faults
def test_ten_sigkills_in_a_stream_of_100k_readings_lose_no_window(
    trained, kafka_bootstrap, tmp_path
):
    topics = names("kills")
    ensure_topics(kafka_bootstrap, {topics["input"]: {"num_partitions": 4}})
    stream = fleet(seed=75, keys=8, readings_per_key=12_500)
    items = stream_items(stream)
    assert len(items) >= 100_000

    def feed():  # the stream keeps arriving while the worker is killed and restarted
        for start in range(0, len(items), 2_000):
            produce(kafka_bootstrap, topics["input"], items[start : start + 2_000])
            time.sleep(1.0)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    log, rng, kills = tmp_path / "worker.log", random.Random(75), 0
    while kills < 10:
        proc = worker_process(kafka_bootstrap, topics, trained.artifact_dir, log, "--emit-all")
        wait_until(lambda n=kills: _count(log, b"worker ready") > n, 90, "the worker to start")
        time.sleep(rng.uniform(0.2, 4.0))
        assert proc.poll() is None, log.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
    feeder.join()
    last = worker_process(kafka_bootstrap, topics, trained.artifact_dir, log, "--emit-all")
    assert last.wait(timeout=300) == 0, log.read_text()[-3000:]

    events = [orjson.loads(r.value) for r in consume(kafka_bootstrap, topics["output"])]
    scores: dict[str, float] = {}
    for event in events:  # a duplicate is a replay of the same window: same id, same score
        scores.setdefault(event["id"], event["data"]["score"])
        assert scores[event["id"]] == pytest.approx(event["data"]["score"], rel=1e-6)
    windows, _, flags = flags_by_window(stream, trained.detector)
    model = resolve_model(str(trained.artifact_dir)).identity()
    expected = [
        event_id(model, str(k), int(e))
        for k, e in zip(windows.keys, windows.end_times, strict=True)
    ]
    anomalous = {i for i, flag in zip(expected, flags, strict=True) if flag}
    assert anomalous, "the stream has anomalous windows"
    assert anomalous <= set(scores), "every anomalous window has an event"
    assert set(scores) == set(expected), "every window of the stream was scored"


def _process_sample(pid: int) -> tuple[float, int]:
    """Resident memory (MiB) and open file descriptors of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


# Soak bounds: growth after the first minute (model, clients and buffers are warm by then).
SOAK_RSS_GROWTH_MIB = 64
SOAK_FD_GROWTH = 8
SOAK_MAX_LAG_S = 5.0  # records behind the log end, in seconds of input


@pytest.mark.kafka
@pytest.mark.faults
def test_a_five_minute_soak_at_a_fixed_rate_stays_bounded(trained, kafka_bootstrap, tmp_path):
    duration_s = float(os.environ.get("AEWATCH_SOAK_S", "300"))
    rate = 1000  # readings per second
    topics = names("soak")
    ensure_topics(kafka_bootstrap, {topics["input"]: {"num_partitions": 4}})
    stream = fleet(seed=77, keys=10, readings_per_key=int(rate * duration_s / 10) + 1)
    items = stream_items(stream)
    port = free_port()
    log = tmp_path / "worker.log"
    proc = worker_process(
        kafka_bootstrap,
        topics,
        trained.artifact_dir,
        log,
        "--http-port",
        str(port),
        "--stop-after-idle-s",
        "20",
    )
    # the stream starts once the member holds its partitions: the lag counts from there
    wait_until(lambda: _count(log, b"assigned [(") > 0, 90, "the worker to join its group")
    stop = threading.Event()

    def feed():  # a fixed rate: every 0.1 s the readings due by then
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
        started, sent = time.monotonic(), 0
        while sent < len(items) and not stop.is_set():
            due = min(len(items), int((time.monotonic() - started) * rate))
            for key, value in items[sent:due]:
                producer.send(topics["input"], key=key, value=value)
            sent = due
            time.sleep(0.1)
        producer.flush()
        producer.close()

    feeder = threading.Thread(target=feed, daemon=True)
    started = time.monotonic()
    feeder.start()
    samples = []  # (seconds, rss MiB, fds, lag records)
    try:
        while True:
            feeder.join(timeout=5.0)
            if not feeder.is_alive():
                break
            assert proc.poll() is None, log.read_text()[-3000:]
            rss, fds = _process_sample(proc.pid)
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            lag = sum(
                v for (name, _), v in metric_values(text).items() if name == "aewatch_consumer_lag"
            )
            samples.append((time.monotonic() - started, rss, fds, lag))
    finally:
        stop.set()
        feeder.join()
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]

    warm = [s for s in samples if s[0] >= min(60.0, duration_s / 5)]
    first, last = warm[0], warm[-1]
    summary = {
        "duration_s": round(samples[-1][0], 1),
        "samples": len(warm),
        "rate_per_s": rate,
        "readings": len(items),
        "rss_mib": {"start": round(first[1], 1), "end": round(last[1], 1)},
        "rss_peak_mib": round(max(s[1] for s in warm), 1),
        "fds": {"start": first[2], "end": last[2]},
        "max_lag_records": max(s[3] for s in samples),
    }
    Path("results").mkdir(exist_ok=True)
    Path("results/soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"soak: {summary}")
    assert max(s[1] for s in warm) - first[1] <= SOAK_RSS_GROWTH_MIB, summary
    assert last[2] - first[2] <= SOAK_FD_GROWTH, summary
    assert summary["max_lag_records"] <= SOAK_MAX_LAG_S * rate, summary

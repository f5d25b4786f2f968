"""Shared pieces for worker tests: a fleet detector, fake Kafka source and sink."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.memory_feed import MemorySource
from pipeline.events import ModelIdentity
from pipeline.tools.simulate import FleetStream, simulate_fleet
from pipeline.worker.settings import WorkerSettings

FEATURES = 4
FLEET_KEYS = 6
HISTORY = 6000  # readings per machine the detector is trained on; streams continue after


def train_fleet_detector(root: Path, *, window: int = 16, stride: int = 4, target_fpr=0.002):
    """A detector trained on a clean fleet (same generator as the streams, other seeds)."""
    from pipeline.detector import ModelConfig
    from training.fit import FitConfig
    from training.job import CalibrationSettings, TrainSettings, train

    clean = simulate_fleet(
        keys=FLEET_KEYS, readings_per_key=HISTORY, features=FEATURES, anomalies=(), seed=0
    )
    frame = pd.DataFrame(clean.values, columns=list(clean.features))
    frame.insert(0, "key", clean.keys)
    frame.insert(0, "ts", pd.to_datetime(clean.ts_ms, unit="ms"))
    frame.to_csv(root / "clean.csv", index=False)
    settings = TrainSettings(
        data=str(root / "clean.csv"),
        time_col="ts",
        key_col="key",
        window=window,
        stride=stride,
        out=str(root / "detector"),
        fractions=(0.6, 0.1, 0.25, 0.05),
        model=ModelConfig(hidden=(64,), code_size=8),
        fit=FitConfig(
            min_steps=0,
            schedule="constant",
            patience_steps=0,
            epochs=15,
            batch_size=64,
            patience=3,
        ),
        calibration=CalibrationSettings(method="quantile", target_fpr=target_fpr),
        device="cpu",
    )
    return train(settings)


def fleet(seed: int = 1, **kwargs) -> FleetStream:
    """The trained fleet's next readings, with anomalies placed by `seed`."""
    defaults = dict(
        keys=4,
        readings_per_key=2500,
        features=FEATURES,
        seed=0,
        warmup=100,
        skip=HISTORY,
        anomaly_seed=seed,
    )
    return simulate_fleet(**{**defaults, **kwargs})


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list = field(default_factory=list)
    timestamp: int = 0


def partitioned(stream: FleetStream, topic: str, partitions: int) -> dict:
    """Records per partition the way Kafka's key hashing would spread keys (stable here)."""
    out: dict = {(topic, p): [] for p in range(partitions)}
    names = sorted(set(stream.keys.tolist()))
    for key, payload in zip(stream.keys.tolist(), stream.payloads(), strict=True):
        p = names.index(key) % partitions
        records = out[(topic, p)]
        records.append(Record(topic, p, len(records), key.encode(), payload))
    return out


class FakeSource(MemorySource):
    """Serves per-partition record lists in chunks, from committed offsets, and records commits
    (a `pipeline.kafka_io.protocols.Source` without a group)."""

    def __init__(self, records: dict, chunk: int = 500, committed: dict | None = None):
        super().__init__(records, chunk, committed)
        self.commits: list[dict] = []

    def commit(self, offsets: dict, *, wait: bool = True) -> None:
        self.commits.append(dict(offsets))

    def latest_commits(self) -> dict:
        latest: dict = {}
        for commit in self.commits:
            latest.update(commit)
        return latest


class FakeSink:
    """A `pipeline.kafka_io.protocols.Sink` that keeps what it is sent."""

    transactional = False

    def __init__(self) -> None:
        self.sent: list[tuple] = []
        self.flushes = 0

    def send(self, topic, key=None, value=None, headers=None, partition=None) -> None:
        self.sent.append((topic, key, value, headers or []))

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        pass

    def values(self, topic: str) -> list[bytes]:
        return [v for t, _, v, _ in self.sent if t == topic]


FLEET_MODEL = ModelIdentity("fleet", "1", "champion")


def in_memory_worker(detector, source, state=None, follower=None, **overrides) -> tuple:
    """A worker of `settings(**overrides)` attached to `source`, with every partition of it
    assigned and a fresh sink: (worker, sink)."""
    from pipeline.worker.loop import Worker
    from pipeline.worker.state import MemoryStateStore

    sink = FakeSink()
    config = settings(**overrides)
    state = state or MemoryStateStore()
    worker = Worker(config, detector, FLEET_MODEL, sink, state, follower=follower)
    worker.attach(source)
    worker.on_assigned(set(source.records))
    return worker, sink


def run_in_memory(detector, source, state=None, **overrides) -> tuple:
    """A worker of `settings(**overrides)` over `source` until it idles, with a fresh sink:
    (worker, sink, stats)."""
    worker, sink = in_memory_worker(detector, source, state, **overrides)
    return worker, sink, worker.run()


def checkpointed(detector, source, state, **overrides):
    """A worker's first life: a worker of `settings(**overrides)` takes every poll of `source`,
    checkpoints into `state` and is left there, as a crash would leave it."""
    from pipeline.worker.loop import Worker

    worker = Worker(settings(**overrides), detector, FLEET_MODEL, FakeSink(), state)
    worker.attach(source)
    worker.on_assigned(set(source.records))
    while polled := source.poll(0):
        worker.process(polled)
    worker.checkpoint()
    return worker


def dead_letters(sink: FakeSink) -> dict:
    """(partition, offset) -> reason of each dead letter the sink was sent."""
    out = {}
    for topic, _key, _value, headers in sink.sent:
        if topic == "dlq":
            h = dict(headers)
            where = (int(h["aewatch.source.partition"]), int(h["aewatch.source.offset"]))
            out[where] = h["aewatch.dlq.reason"].decode()
    return out


def settings(**kwargs) -> WorkerSettings:
    base = dict(
        model="unused",
        bootstrap_servers="unused:9092",
        input_topic=("readings",),
        output_topic="events",
        dlq_topic="dlq",
        max_wait_ms=0,
        commit_interval_ms=50,
        stop_after_idle_s=0.2,
        events="windows",
        http_port=-1,
    )
    return WorkerSettings.build(**{**base, **kwargs})


def batch_windows(stream: FleetStream, spec):
    from pipeline.detector import cut_windows

    groups = []
    for key in sorted(set(stream.keys.tolist())):
        ts, values, labels = stream.key_series(key)
        groups.append((key, ts, values, labels))
    return cut_windows(groups, spec)


def flags_by_window(stream: FleetStream, detector) -> tuple:
    windows = batch_windows(stream, detector.input.window)
    scores = detector.score(windows.windows, attribution=False).scores
    return windows, scores, np.asarray(scores > detector.threshold.value)

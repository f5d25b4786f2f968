"""Prometheus metrics of the scoring worker, in a registry of its own.

The loop updates them in bulk, once per poll, batch or checkpoint, never once per record. The
end-to-end latency (wall clock at scoring minus the reading timestamp that closed each window) is
observed for every scored window with one numpy call per batch through `BulkHistogram`.

| metric | type | labels |
|---|---|---|
| `aewatch_records_total` | counter | `topic` |
| `aewatch_windows_scored_total` | counter | |
| `aewatch_events_total` | counter | `type` (anomaly, alarm_opened, alarm_resolved, drift) |
| `aewatch_dead_letters_total` | counter | `reason` |
| `aewatch_dropped_total` | counter | `reason` |
| `aewatch_batch_windows` | histogram | |
| `aewatch_scoring_seconds` | histogram | |
| `aewatch_end_to_end_latency_seconds` | histogram | |
| `aewatch_consumer_lag` | gauge | `topic`, `partition` |
| `aewatch_assigned_partitions` | gauge | |
| `aewatch_alarms_open` | gauge | |
| `aewatch_commits_total` | counter | |
| `aewatch_state_refused_total` | counter | |
| `aewatch_keys_expired_total` | counter | |
| `aewatch_reread_records`, `aewatch_parked_keys` | gauge | `topic`, `partition` |
| `aewatch_keys`, `aewatch_state_record_bytes` | gauge | `topic`, `partition` |
| `aewatch_model_info` | gauge (1) | `name`, `version`, `alias` |
| `aewatch_model_reloads_total` | counter | `outcome` (loaded, refused, failed, unreachable, missing), `reason` |
| `aewatch_drift_psi` | gauge | `key`, for the keys this member holds (`*`: all of them, pooled; a key named `*` has no gauge of its own) |
| `aewatch_drift_psi_limit` | gauge | `key` (`*`): `--drift-psi`, where the drift statistic is on |
"""

from __future__ import annotations

import contextlib
from collections import Counter as Tally
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from pipeline.worker.drift import OVERALL

__all__ = ["BulkHistogram", "WorkerMetrics", "WorkerStats"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
EVENT_KINDS = ("anomaly", "alarm_opened", "alarm_resolved", "drift")
SCORING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class BulkHistogram(Collector):
    """A histogram that takes a whole array of observations at once."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # last: above every bound
        self.sum = 0.0

    def observe_many(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        if values.size:
            index = np.searchsorted(self.bounds, values, side="left")
            self.counts += np.bincount(index, minlength=len(self.counts))
            self.sum += float(values.sum())

    def collect(self):
        cumulative = np.cumsum(self.counts)
        buckets = [(repr(float(b)), int(c)) for b, c in zip(self.bounds, cumulative, strict=False)]
        buckets.append(("+Inf", int(cumulative[-1])))
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], buckets, self.sum)
        yield family


class Children(dict):
    """A labelled counter's children by label, each looked up once: a flood of records of one
    reason costs a dict hit per record, not a `labels()` call."""

    def __init__(self, metric: Counter) -> None:
        super().__init__()
        self.metric = metric

    def __missing__(self, label: str):
        child = self[label] = self.metric.labels(label)
        return child


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.records = Counter("aewatch_records", "records consumed", ["topic"], registry=r)
        self.windows = Counter("aewatch_windows_scored", "windows (or images) scored", registry=r)
        self.events = Counter("aewatch_events", "events produced", ["type"], registry=r)
        for kind in EVENT_KINDS:  # at 0 from the start: the first event is an increase
            self.events.labels(kind)
        self.dead_letters = Counter(
            "aewatch_dead_letters", "records sent to the dead-letter topic", ["reason"], registry=r
        )
        self.dropped = Counter(
            "aewatch_dropped", "records dropped by the order policy", ["reason"], registry=r
        )
        self.dead_letters_by_reason = Children(self.dead_letters)
        self.dropped_by_reason = Children(self.dropped)
        self.batch_windows = Histogram(
            "aewatch_batch_windows", "windows per scored batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.scoring_seconds = Histogram(
            "aewatch_scoring_seconds",
            "time of one batch's forward pass",
            buckets=SCORING_BUCKETS,
            registry=r,
        )
        self.latency = BulkHistogram(
            "aewatch_end_to_end_latency_seconds",
            "scoring time minus the timestamp of the reading that closed the window",
            LATENCY_BUCKETS,
        )
        r.register(self.latency)
        self.lag = Gauge(
            "aewatch_consumer_lag", "records behind the log end", ["topic", "partition"], registry=r
        )
        self.reread = Gauge(
            "aewatch_reread_records",
            "records between the commit and what was processed: what a restart reads again",
            ["topic", "partition"],
            registry=r,
        )
        self.parked = Gauge(
            "aewatch_parked_keys",
            "keys whose held readings are in the state record, not holding the commit back",
            ["topic", "partition"],
            registry=r,
        )
        self.keys = Gauge(
            "aewatch_keys",
            "keys whose windows this member holds, at the last checkpoint",
            ["topic", "partition"],
            registry=r,
        )
        self.state_bytes = Gauge(
            "aewatch_state_record_bytes",
            "size of the partition's last state record (the worker stops past 16 MiB)",
            ["topic", "partition"],
            registry=r,
        )
        self.assigned = Gauge("aewatch_assigned_partitions", "partitions assigned", registry=r)
        self.alarms_open = Gauge("aewatch_alarms_open", "keys with an open alarm", registry=r)
        self.commits = Counter("aewatch_commits", "offset commits", registry=r)
        self.state_refused = Counter(
            "aewatch_state_refused",
            "state records refused as unreadable (their partition's keys started afresh)",
            registry=r,
        )
        self.keys_expired = Counter(
            "aewatch_keys_expired",
            "keys forgotten after --key-ttl-s of silence (they start afresh if they come back)",
            registry=r,
        )
        self.model_info = Gauge(
            "aewatch_model_info",
            "the model version serving",
            ["name", "version", "alias"],
            registry=r,
        )
        self.reloads = Counter(
            "aewatch_model_reloads", "model reload attempts", ["outcome", "reason"], registry=r
        )

        self.drift_psi = Gauge(
            "aewatch_drift_psi",
            "population stability index of recent scores against the calibration deciles",
            ["key"],
            registry=r,
        )
        self.drift_psi_limit = Gauge(  # beside the pooled gauge, for alert rules to compare
            "aewatch_drift_psi_limit",
            "the pooled PSI at which a drift event is emitted (--drift-psi)",
            ["key"],
            registry=r,
        )

    def set_model(self, name: str, version: str, alias: str | None) -> None:
        self.model_info.clear()
        self.model_info.labels(name, version, alias or "").set(1)

    def set_lag(self, lag: dict[tuple[str, int], int]) -> None:
        self.lag.clear()
        for (topic, partition), value in lag.items():
            self.lag.labels(topic, str(partition)).set(value)

    def set_held(self, reread: dict[tuple[str, int], int], saved: dict) -> None:
        """Per partition checkpointed: records a restart reads again, and of its state record
        (`saved`: partition -> (keys, parked keys, bytes)) the keys, parked keys and size."""
        for (topic, partition), value in reread.items():
            self.reread.labels(topic, str(partition)).set(value)
        for (topic, partition), (keys, parked, size) in saved.items():
            self.keys.labels(topic, str(partition)).set(keys)
            self.parked.labels(topic, str(partition)).set(parked)
            self.state_bytes.labels(topic, str(partition)).set(size)

    def forget(self, partitions) -> None:
        """Partitions this member no longer owns leave the per-partition gauges."""
        for topic, partition in partitions:
            for gauge in (self.reread, self.parked, self.keys, self.state_bytes):
                with contextlib.suppress(KeyError):  # never set for this partition
                    gauge.remove(topic, str(partition))

    def forget_keys(self, keys) -> None:
        """Keys this member no longer holds leave the per-key gauge: their new owner reports
        them, and a value left here would go stale."""
        for key in keys:
            if key == OVERALL:  # a key named `*` is not exported: the label is the pooled one's
                continue
            with contextlib.suppress(KeyError):  # never reported: its reservoir was not full
                self.drift_psi.remove(key)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class WorkerStats:
    """What the worker did since it started, for its logs and for whoever runs it in-process."""

    records_in: int = 0
    windows_scored: int = 0
    events_out: int = 0
    batches: int = 0
    commits: int = 0
    dead_letters: Tally = field(default_factory=Tally)
    dropped: Tally = field(default_factory=Tally)
    alarms: Tally = field(default_factory=Tally)
    reloads: int = 0

    def snapshot(self) -> dict:
        return {
            "records_in": self.records_in,
            "windows_scored": self.windows_scored,
            "events_out": self.events_out,
            "dead_letters": dict(self.dead_letters),
            "batches": self.batches,
            "commits": self.commits,
            "alarms": dict(self.alarms),
            "reloads": self.reloads,
        }

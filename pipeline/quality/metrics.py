"""Prometheus metrics of `aewatch quality`, in a registry of its own.

The figures of the join are computed from the tracker when Prometheus scrapes (`QualityCollector`),
so they are exact at every scrape and rebuilt whole after a restart:

| metric | type | labels |
|---|---|---|
| `aewatch_feedback_alarms_confirmed` | gauge | `model`, `version`, `key` |
| `aewatch_feedback_alarms_refuted` | gauge | `model`, `version`, `key` |
| `aewatch_feedback_alarms_unsure` | gauge | `model`, `version`, `key` |
| `aewatch_feedback_precision` | gauge | `model`, `version` |
| `aewatch_feedback_precision_judged` | gauge | `model`, `version` |
| `aewatch_feedback_key_precision` | gauge | `model`, `version`, `key` |
| `aewatch_feedback_ack_seconds` | histogram | `model`, `version` |
| `aewatch_feedback_waiting` | gauge | |
| `aewatch_feedback_records_total` | counter | `outcome` (joined, waiting, dead_letter) |
| `aewatch_alarm_events_total` | counter | |

Precision covers the alarms emitted in the last `--period-s` that have a verdict; a version (or
key) without one has no precision sample. `..._precision_judged` is how many alarms it covers
(the confirmed, refuted and unsure counts cover every alarm read, whatever its age).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from pipeline.quality.tracker import QualityTracker

__all__ = ["ACK_BUCKETS", "QualityCollector", "QualityMetrics"]

ACK_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 86400.0, 3 * 86400.0)
KEY_LABELS = ["model", "version", "key"]


class QualityCollector(Collector):
    def __init__(
        self, tracker: QualityTracker, lock: threading.Lock, now_ms: Callable[[], int]
    ) -> None:
        self.tracker, self.lock, self.now_ms = tracker, lock, now_ms

    def collect(self):
        with self.lock:
            versions = self.tracker.by_version(self.now_ms())
            waiting = len(self.tracker.waiting)
        doc = "alarms whose latest operator verdict is "
        counts = {
            name: GaugeMetricFamily(
                f"aewatch_feedback_alarms_{name}", doc + verdict, labels=KEY_LABELS
            )
            for name, verdict in (
                ("confirmed", "true_positive"),
                ("refuted", "false_positive"),
                ("unsure", "unsure"),
            )
        }
        precision = GaugeMetricFamily(
            "aewatch_feedback_precision",
            "confirmed / judged alarms emitted in the sliding period",
            labels=["model", "version"],
        )
        judged = GaugeMetricFamily(
            "aewatch_feedback_precision_judged",
            "confirmed and refuted alarms emitted in the sliding period (what precision covers)",
            labels=["model", "version"],
        )
        key_precision = GaugeMetricFamily(
            "aewatch_feedback_key_precision",
            "confirmed / judged alarms of a key emitted in the sliding period",
            labels=KEY_LABELS,
        )
        ack = HistogramMetricFamily(
            "aewatch_feedback_ack_seconds",
            "first verdict's time less the alarm's emission time",
            labels=["model", "version"],
        )
        bounds = np.asarray(ACK_BUCKETS)
        for (model, version), quality in sorted(versions.items()):
            if quality.precision is not None:
                precision.add_metric([model, version], quality.precision)
                judged.add_metric([model, version], quality.recent_judged)
            for key, per_key in sorted(quality.keys.items()):
                labels = [model, version, key]
                counts["confirmed"].add_metric(labels, per_key.confirmed)
                counts["refuted"].add_metric(labels, per_key.refuted)
                counts["unsure"].add_metric(labels, per_key.unsure)
                if per_key.precision is not None:
                    key_precision.add_metric(labels, per_key.precision)
            seconds = np.asarray(quality.ack_seconds)
            cumulative = [int(np.count_nonzero(seconds <= b)) for b in bounds]
            buckets = [(repr(float(b)), c) for b, c in zip(bounds, cumulative, strict=True)]
            buckets.append(("+Inf", len(seconds)))
            ack.add_metric([model, version], buckets, float(seconds.sum()))
        yield from counts.values()
        yield precision
        yield judged
        yield key_precision
        yield ack
        yield GaugeMetricFamily(
            "aewatch_feedback_waiting", "feedback records whose alarm was not read", value=waiting
        )


class QualityMetrics:
    def __init__(
        self,
        tracker: QualityTracker,
        lock: threading.Lock,
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.registry = r = CollectorRegistry()
        r.register(QualityCollector(tracker, lock, now_ms))
        self.records = Counter(
            "aewatch_feedback_records", "feedback records read", ["outcome"], registry=r
        )
        self.alarm_events = Counter(
            "aewatch_alarm_events", "alarm and anomaly events read", registry=r
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

"""`aewatch quality`: the companion process that joins operator feedback to emitted alarms.

It reads the alarm topic (the worker's alarm events, and anomaly window events if the worker
emits them) and the feedback topic from their start, outside any consumer group, feeds both to a
`QualityTracker`, and

- dead-letters feedback records that break the schema (`pipeline.quality.feedback`), with the
  reason in the headers, like the worker's bad readings;
- serves the figures on `/metrics` (see `pipeline.quality.metrics`), `/healthz` and `/readyz`
  (ready once it has read to the end of both topics once);
- every `log_interval_s`, appends each version's live figures to the metric history of the MLflow
  run that produced that version (`live_precision`, `live_alarms_confirmed`,
  `live_alarms_refuted`, `live_alarms_unsure`, `live_ack_seconds_median`; the step is the number
  of alarms judged), so the registry shows how each version does in production.

Its state is the two topics: a restart (or a second replica) reads them again and arrives at the
same figures. Run one replica; it is separate from the workers, so scaling them does not repeat
the join, and nothing it does can slow scoring.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import orjson

from pipeline.errors import ConfigError, RegistryError
from pipeline.events import dead_letter_headers
from pipeline.kafka_io.protocols import Record, Sink, Tail
from pipeline.kafka_io.settings import is_topic_name, not_a_topic_name
from pipeline.quality.feedback import FeedbackError, parse_feedback
from pipeline.quality.metrics import QualityMetrics
from pipeline.quality.tracker import QualityTracker
from pipeline.settings import check, setting

__all__ = ["QualityService", "QualitySettings"]

log = logging.getLogger(__name__)
Partition = tuple[str, int]
POLL_MS = 500
END_CHECK_S = 1.0  # how often a busy tail is asked whether it has read what was there


@dataclass(frozen=True)
class QualitySettings:
    """What `aewatch quality` reads, where bad feedback goes, and how figures are kept."""

    alarm_topic: tuple[str, ...] = setting(
        "topic of the worker's alarm (and anomaly) events (repeatable)", ("aewatch.anomalies",)
    )
    feedback_topic: str = setting("topic of operator feedback records", "aewatch.feedback")
    dlq_topic: str = setting("topic for feedback records that cannot be used", "aewatch.dlq")
    period_s: float = setting(
        "sliding period of the live precision, by alarm emission time", 7 * 86400.0, minimum=1
    )
    log_interval_s: float = setting(
        "how often each version's figures go to its MLflow run (0: never)", 60.0, minimum=0
    )
    http_host: str = setting("address of /metrics, /healthz and /readyz", "0.0.0.0")
    http_port: int = setting(
        "port of /metrics (0: any free port, -1: off)", 8081, minimum=-1, maximum=65535
    )
    stop_after_idle_s: float = setting(
        "exit after this long without records (0: never)", 0.0, minimum=0
    )

    def __post_init__(self) -> None:
        check(self)
        if not self.alarm_topic:
            raise ConfigError("alarm_topic", "give at least one --alarm-topic")
        named = [("alarm_topic", t) for t in self.alarm_topic]
        for name, topic in [
            *named,
            ("feedback_topic", self.feedback_topic),
            ("dlq_topic", self.dlq_topic),
        ]:
            if not is_topic_name(topic):
                raise ConfigError(name, not_a_topic_name(topic))
        if self.feedback_topic in self.alarm_topic or self.dlq_topic == self.feedback_topic:
            raise ConfigError("feedback_topic", "must differ from the alarm and DLQ topics")


# (model name, version) -> run id, or None when the version names no run
RunLookup = Callable[[str, str], str | None]
MetricLogger = Callable[[str, dict[str, float], int, int], None]  # run id, metrics, step, ms


class QualityService:
    def __init__(
        self,
        settings: QualitySettings,
        tail: Tail,
        sink: Sink,
        *,
        run_of: RunLookup | None = None,
        log_metrics: MetricLogger | None = None,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings, self.tail, self.sink = settings, tail, sink
        self.run_of, self.log_metrics = run_of, log_metrics
        self.wall_ms, self.clock = wall_ms, clock
        self.lock = threading.Lock()
        self.tracker = QualityTracker(int(settings.period_s * 1000))
        self.metrics = QualityMetrics(self.tracker, self.lock, wall_ms)
        self.caught_up = False
        self.last_turn = clock()
        self._end_asked = float("-inf")
        self._stop = False
        self._logged: dict[tuple[str, str], int] = {}  # judged count last logged, per version
        self._runs: dict[tuple[str, str], str | None] = {}
        self._last_log = clock()

    # -- health ----------------------------------------------------------------------------------
    def liveness(self) -> tuple[bool, dict]:
        age = self.clock() - self.last_turn
        return age < 60.0, {"loop_age_s": round(age, 3)}

    def readiness(self) -> tuple[bool, dict]:
        live, detail = self.liveness()
        return live and self.caught_up, {**detail, "caught_up": self.caught_up}

    def stop(self) -> None:
        self._stop = True

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> None:
        idle_since = self.clock()
        try:
            while not self._stop:
                polled = self.tail.poll(POLL_MS)
                now = self.last_turn = self.clock()
                if polled:
                    self.take(polled)
                    idle_since = now
                # ready once what was there has been read: asked after polls that brought
                # records too (a busy alarm topic never gives an empty one), once a second
                if not self.caught_up and (not polled or now - self._end_asked >= END_CHECK_S):
                    self._end_asked = now
                    self.caught_up = self.tail.reached_end()
                interval = self.settings.log_interval_s
                if interval and now - self._last_log >= interval:
                    self.log_history()
                idle = self.settings.stop_after_idle_s
                if idle and now - idle_since >= idle:
                    log.info("no records for %.1fs; stopping", idle)
                    break
        finally:
            if self.settings.log_interval_s:
                self.log_history()
            self.sink.flush()

    def take(self, polled: Mapping[Partition, Sequence[Record]]) -> None:
        """Take one poll's records of both topics."""
        dead = False
        with self.lock:
            for (topic, _), records in polled.items():
                for record in records:
                    if topic == self.settings.feedback_topic:
                        dead |= self._feedback(record)
                    else:
                        self._event(record)
        if dead:
            self.sink.flush()

    def _event(self, record: Record) -> None:
        try:
            event = orjson.loads(record.value or b"")
        except orjson.JSONDecodeError:
            return  # not ours to judge: the alarm topic is the worker's
        if isinstance(event, dict) and self.tracker.event(event, int(record.timestamp)):
            self.metrics.alarm_events.inc()

    def _feedback(self, record: Record) -> bool:
        """True if the record was dead-lettered."""
        if record.value is None:
            return False  # a tombstone: compaction's way of deleting a key
        try:
            feedback = parse_feedback(record.value)
        except FeedbackError as exc:
            headers = list(record.headers or []) + dead_letter_headers(
                exc.reason, exc.detail, record.topic, record.partition, record.offset
            )
            self.sink.send(self.settings.dlq_topic, record.key, record.value, headers)
            self.metrics.records.labels("dead_letter").inc()
            log.warning("feedback at %s:%d dead-lettered: %s", record.topic, record.offset, exc)
            return True
        joined = self.tracker.feedback(feedback)
        self.metrics.records.labels("joined" if joined else "waiting").inc()
        return False

    # -- MLflow history --------------------------------------------------------------------------
    def log_history(self) -> None:
        """Each version's figures, if its judged alarms changed since they were last logged, as
        one point of its run's metric history."""
        self._last_log = self.clock()
        if self.run_of is None or self.log_metrics is None:
            return
        now = self.wall_ms()
        with self.lock:
            versions = self.tracker.by_version(now)
        for (model, version), quality in sorted(versions.items()):
            judged = quality.confirmed + quality.refuted + quality.unsure
            if not model or self._logged.get((model, version)) == judged:
                continue
            try:
                if (model, version) not in self._runs:
                    self._runs[(model, version)] = self.run_of(model, version)
                run_id = self._runs[(model, version)]
                if run_id is None:
                    continue
                figures = {
                    "live_alarms_confirmed": quality.confirmed,
                    "live_alarms_refuted": quality.refuted,
                    "live_alarms_unsure": quality.unsure,
                    "live_ack_seconds_median": float(np.median(quality.ack_seconds)),
                }
                if quality.precision is not None:
                    figures["live_precision"] = quality.precision
                self.log_metrics(run_id, figures, judged, now)
            except RegistryError as exc:
                log.warning("live figures of %s v%s not logged: %s", model, version, exc)
                continue
            self._logged[(model, version)] = judged

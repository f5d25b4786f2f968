"""The join of operator feedback to the alarms the worker emitted, and the figures it gives.

An *alarm* here is what an operator can judge: an alarm episode (its `aewatch.alarm.opened` and
`.resolved` events share an episode id) or, for workers that emit window events, one anomalous
window event. `QualityTracker` takes the events of the alarm topic and the records of the
feedback topic in any order (feedback for an alarm not read yet waits for it) and keeps, per
alarm, the model version that raised it, its key, when it was emitted (the Kafka timestamp of its
opening event), and the latest verdict on it (by the verdict's `time`; a later verdict replaces
an earlier one). From these:

- confirmed / refuted / unsure: alarms whose latest verdict is true_positive / false_positive /
  unsure, per model version and key;
- precision over a sliding period: confirmed / (confirmed + refuted) among the alarms emitted in
  the last `period_ms` that have a verdict other than unsure, per model version and per key;
- time to acknowledge: the first verdict's `time` less the alarm's emission time.

Everything is derived from the two topics, so the state after a restart is rebuilt by reading
them again from their start (the feedback topic is compacted; the alarm topic is kept by its
retention). The tracker is not thread-safe: its owner serialises calls.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

from pipeline.events import ALARM_TYPES, EVENT_TYPE
from pipeline.quality.feedback import Feedback, parse_time_ms

__all__ = ["Alarm", "QualityTracker", "VersionQuality"]

OPENED, RESOLVED = ALARM_TYPES["opened"], ALARM_TYPES["resolved"]
log = logging.getLogger(__name__)


@dataclass
class Alarm:
    target: str  # the episode id, or the window event's id
    model: str
    version: str
    key: str
    emitted_ms: int
    start_ms: int
    end_ms: int | None
    peak_score: float
    threshold: float
    verdict: Feedback | None = None
    first_verdict_ms: int | None = None


@dataclass
class VersionQuality:
    """What the feedback says of one model version (and, in `keys`, of each of its keys)."""

    confirmed: int = 0
    refuted: int = 0
    unsure: int = 0
    recent_confirmed: int = 0
    recent_refuted: int = 0
    ack_seconds: list[float] = field(default_factory=list)
    keys: dict[str, VersionQuality] = field(default_factory=dict)

    @property
    def recent_judged(self) -> int:
        """Confirmed and refuted alarms of the sliding period."""
        return self.recent_confirmed + self.recent_refuted

    @property
    def precision(self) -> float | None:
        """Precision over the sliding period; None without judged alarms in it."""
        judged = self.recent_judged
        return self.recent_confirmed / judged if judged else None

    def add(self, alarm: Alarm, since_ms: int) -> None:
        verdict = alarm.verdict.verdict
        recent = alarm.emitted_ms >= since_ms
        if verdict == "true_positive":
            self.confirmed += 1
            self.recent_confirmed += recent
        elif verdict == "false_positive":
            self.refuted += 1
            self.recent_refuted += recent
        else:
            self.unsure += 1
        self.ack_seconds.append(max(0.0, (alarm.first_verdict_ms - alarm.emitted_ms) / 1000.0))


def _model(event: dict) -> tuple[str, str]:
    model = (event.get("data") or {}).get("model") or {}
    return str(model.get("name", "")), str(model.get("version", ""))


class QualityTracker:
    def __init__(self, period_ms: int) -> None:
        self.period_ms = period_ms
        self.alarms: dict[str, Alarm] = {}  # by target id
        self.targets: dict[str, str] = {}  # event id -> target id
        self.waiting: dict[str, Feedback] = {}  # feedback whose alarm was not read yet
        self._first_waiting: dict[str, int] = {}  # ... and the time of its first verdict

    # -- input -----------------------------------------------------------------------------------
    def event(self, event: dict, emitted_ms: int) -> bool:
        """Take one event of the alarm topic; False if it is not an alarm (ignored)."""
        kind, data = event.get("type"), event.get("data")
        if not isinstance(data, dict) or not isinstance(event.get("id"), str):
            return False
        if kind in (OPENED, RESOLVED):
            target = data.get("episode_id")
        elif kind == EVENT_TYPE and data.get("is_anomaly"):
            target = event["id"]
        else:
            return False
        if not isinstance(target, str):
            return False
        alarm = self.alarms.get(target)
        try:  # an event whose fields are not of the documented types is passed over
            known = alarm or self._alarm(target, kind, event, data, emitted_ms)
            if kind == RESOLVED:
                end = _ms(data.get("end"), known.end_ms)
                peak = _number(data.get("peak_score", known.peak_score))
        except (TypeError, ValueError, AttributeError) as exc:
            log.debug("event %s passed over: %r", event.get("id"), exc)
            return False
        if alarm is None:
            alarm = self.alarms[target] = known
        elif kind == OPENED:
            alarm.emitted_ms = min(alarm.emitted_ms, emitted_ms)
        if kind == RESOLVED:
            alarm.end_ms, alarm.peak_score = end, peak
        self.targets[event["id"]] = target
        for waiting_id in (target, event["id"]):
            feedback = self.waiting.pop(waiting_id, None)
            if feedback is not None:
                self._judge(alarm, feedback, self._first_waiting.pop(waiting_id))
        return True

    @staticmethod
    def _alarm(target: str, kind: str, event: dict, data: dict, emitted_ms: int) -> Alarm:
        name, version = _model(event)
        if kind == EVENT_TYPE:
            window = data.get("window") or {}
            start = _ms(window.get("start"), None)
            end = _ms(window.get("end"), None) or _ms(event.get("time"), emitted_ms)
            peak = _number(data.get("score", 0.0))
        else:
            start = _ms(data.get("start"), None)
            end = _ms(data.get("end"), None)
            peak = _number(data.get("peak_score", 0.0))
        return Alarm(
            target=target,
            model=name,
            version=version,
            key=str(data.get("key", event.get("subject", ""))),
            emitted_ms=emitted_ms,
            start_ms=start if start is not None else (end or emitted_ms),
            end_ms=end,
            peak_score=peak,
            threshold=_number(data.get("threshold", 0.0)),
        )

    def feedback(self, feedback: Feedback) -> bool:
        """Take one feedback record; True if its alarm is known (else it waits for it)."""
        alarm = self.find(feedback)
        if alarm is None:
            target = feedback.target
            current = self.waiting.get(target)
            if current is None or feedback.time_ms >= current.time_ms:
                self.waiting[target] = feedback
            first = self._first_waiting.get(target, feedback.time_ms)
            self._first_waiting[target] = min(first, feedback.time_ms)
            return False
        self._judge(alarm, feedback)
        return True

    def find(self, feedback: Feedback) -> Alarm | None:
        for ident in (feedback.episode_id, feedback.event_id):
            if ident:
                target = ident if ident in self.alarms else self.targets.get(ident)
                if target is not None:
                    return self.alarms[target]
        return None

    @staticmethod
    def _judge(alarm: Alarm, feedback: Feedback, first_ms: int | None = None) -> None:
        """The latest verdict judges the alarm; the earliest (`first_ms`: of verdicts that
        waited for it) times its acknowledgement."""
        if alarm.verdict is None or feedback.time_ms >= alarm.verdict.time_ms:
            alarm.verdict = feedback
        first = feedback.time_ms if first_ms is None else min(first_ms, feedback.time_ms)
        if alarm.first_verdict_ms is None or first < alarm.first_verdict_ms:
            alarm.first_verdict_ms = first

    # -- output ----------------------------------------------------------------------------------
    def by_version(self, now_ms: int) -> dict[tuple[str, str], VersionQuality]:
        """Per (model name, version), with per-key figures in `keys`."""
        since = now_ms - self.period_ms
        out: dict[tuple[str, str], VersionQuality] = defaultdict(VersionQuality)
        for alarm in self.alarms.values():
            if alarm.verdict is None:
                continue
            quality = out[(alarm.model, alarm.version)]
            quality.add(alarm, since)
            quality.keys.setdefault(alarm.key, VersionQuality()).add(alarm, since)
        return dict(out)

    def judged(self) -> list[Alarm]:
        """Alarms with a verdict, in the order of their start."""
        return sorted(
            (a for a in self.alarms.values() if a.verdict is not None),
            key=lambda a: (a.start_ms, a.target),
        )


def _number(value) -> float:
    """A JSON number as float; TypeError for anything else (text, a boolean, null)."""
    if value.__class__ not in (int, float):
        raise TypeError(f"not a number: {value!r}"[:100])
    return float(value)


def _ms(text, default):
    if not isinstance(text, str):
        return default
    try:
        return parse_time_ms(text)
    except ValueError:
        return default

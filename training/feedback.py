"""Operator verdicts as labelled data for the model's life: a threshold from judged alarms.

The judged alarms come from the Kafka topics `aewatch quality` reads (the alarm topic and the
feedback topic, read from their start to their end) or from a file of JSON lines holding both
kinds of record (alarm events as `aewatch alerts --json` prints them, and feedback records); the
join is `pipeline.quality.tracker.QualityTracker`, the same as the live one.

The threshold rule, written down before any labels are looked at: an alarm episode is raised at a
threshold t only if its peak score is above t, so raising the threshold to t removes the judged
alarms whose peak is at or below t. The rule removes the refuted alarms it can without losing a
confirmed one: with `c` the lowest peak of a confirmed alarm (infinite when none is confirmed),
the refuted alarms below `c` are removable, and the new threshold is halfway between the highest
removable refuted peak and `c` (just above that peak when nothing is confirmed). With nothing
removable the feedback gives no threshold. Verdicts `unsure` do not count. The rule only ever
raises a threshold, and `recalibrate` never puts it below the threshold calibrated for the target
false-positive rate unless asked to (and then says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from pipeline.errors import ConfigError
from pipeline.quality.feedback import FEEDBACK_VERSION, FeedbackError, parse_feedback
from pipeline.quality.tracker import Alarm, QualityTracker

__all__ = [
    "FeedbackSource",
    "FeedbackThreshold",
    "feedback_labels",
    "judged_alarms",
    "labelled_copy",
    "threshold_from_feedback",
]


@dataclass(frozen=True)
class FeedbackSource:
    """A JSON-lines file, or a feedback topic with its alarm topic on a cluster."""

    feedback: str  # a file path, or a topic name when `bootstrap_servers` is given
    alarm_topic: str | None = None
    bootstrap_servers: str | None = None
    model_name: str | None = None  # only alarms of this model (all versions)


@dataclass(frozen=True)
class FeedbackThreshold:
    value: float | None  # None: the verdicts give no threshold
    confirmed: int
    refuted: int
    removed_refuted: int
    removed_confirmed: int
    reason: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def judged_alarms(source: FeedbackSource) -> list[Alarm]:
    """The alarms operators judged, each with its latest verdict."""
    tracker = QualityTracker(period_ms=1)
    if source.bootstrap_servers:
        if not source.alarm_topic:
            raise ConfigError("alarm_topic", "reading feedback from a topic needs --alarm-topic")
        from pipeline.kafka_io import open_client
        from pipeline.kafka_io.settings import KafkaConnection

        kafka = open_client(KafkaConnection(source.bootstrap_servers))
        kafka.check()
        for record in kafka.read_all(source.alarm_topic):
            _event(tracker, record.value, int(record.timestamp))
        for record in kafka.read_all(source.feedback):
            try:
                tracker.feedback(parse_feedback(record.value))
            except FeedbackError:
                continue  # `aewatch quality` dead-letters these
    else:
        path = Path(source.feedback)
        if not path.is_file():
            raise ConfigError("feedback", f"no such file: {path} (or give --bootstrap-servers)")
        lines = path.read_bytes().splitlines()
        if not any(line.strip() for line in lines):
            raise ConfigError("feedback", f"{path} holds no records (alarm events and verdicts)")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                raise ConfigError("feedback", f"{path}:{number}: not JSON") from None
            if isinstance(record, dict) and record.get("schema") == FEEDBACK_VERSION:
                try:
                    tracker.feedback(parse_feedback(line))
                except FeedbackError as exc:
                    raise ConfigError("feedback", f"{path}:{number}: {exc.detail}") from None
            else:
                _event(tracker, line, 0)
    judged = tracker.judged()
    if source.model_name:
        judged = [a for a in judged if a.model == source.model_name]
    return judged


def _event(tracker: QualityTracker, value: bytes | None, emitted_ms: int) -> None:
    try:
        event = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return
    if isinstance(event, dict):
        tracker.event(event, emitted_ms)


def threshold_from_feedback(alarms: list[Alarm]) -> FeedbackThreshold:
    """The threshold the rule of the module notes gives for these judged alarms."""
    peaks = {
        verdict: np.asarray(
            [a.peak_score for a in alarms if a.verdict.verdict == verdict], dtype=np.float64
        )
        for verdict in ("true_positive", "false_positive")
    }
    confirmed, refuted = peaks["true_positive"], peaks["false_positive"]
    lowest_confirmed = float(confirmed.min()) if len(confirmed) else float("inf")
    removable = refuted[refuted < lowest_confirmed]
    counts = dict(confirmed=len(confirmed), refuted=len(refuted))
    if not len(removable):
        why = (
            "no judged alarm was refuted"
            if not len(refuted)
            else ("every refuted alarm peaks at or above the lowest confirmed one")
        )
        return FeedbackThreshold(None, **counts, removed_refuted=0, removed_confirmed=0, reason=why)
    highest = float(removable.max())
    if np.isfinite(lowest_confirmed):
        value = (highest + lowest_confirmed) / 2
    else:
        value = float(np.nextafter(highest, np.inf))
    return FeedbackThreshold(
        value,
        **counts,
        removed_refuted=int(np.count_nonzero(refuted <= value)),
        removed_confirmed=int(np.count_nonzero(confirmed <= value)),
        reason=f"above {len(removable)} refuted alarm(s), below every confirmed one",
    )


def feedback_labels(
    frame, alarms: list[Alarm], time_col: str, key_col: str | None, source: str = "data"
) -> np.ndarray:
    """0/1 per row of a series table: 1 inside the span of a confirmed alarm of the row's key
    (the operator's corrected span when given, else the alarm's start to end), 0 elsewhere
    (refuted alarms, and time no alarm covered, count as normal). The rows' times are read as
    tables read them (ISO-8601 text or epoch ms) and compared in epoch ms, the alarms' unit."""
    from training.data.columns import parse_times

    if time_col not in frame.columns or (key_col and key_col not in frame.columns):
        raise ConfigError("feedback", f"the data needs the columns {time_col!r} and {key_col!r}")
    times = parse_times(frame[time_col], source, time_col).view(np.int64) // 1_000_000
    keys = frame[key_col].astype(str).to_numpy() if key_col else None
    labels = np.zeros(len(frame), dtype=np.int8)
    for alarm in alarms:
        if alarm.verdict.verdict != "true_positive":
            continue
        start, end = alarm.verdict.span or (alarm.start_ms, alarm.end_ms or alarm.start_ms)
        inside = (times >= start) & (times <= end)
        if keys is not None:
            inside &= keys == alarm.key
        labels[inside] = 1
    return labels


def labelled_copy(data, source: FeedbackSource, folder: Path):
    """A copy of a series `DataSource` whose label column (`feedback_label`) comes from the
    operators' verdicts, for `evaluate` and `promote`."""
    import dataclasses

    from training.data.columns import PARQUET_SUFFIXES, read_table

    path = Path(data.path)
    parquet = path.is_dir() or path.name.lower().endswith(PARQUET_SUFFIXES)
    frame = read_table(path, data.path, time_col=data.time_col, key_col=data.key_col, sep=None)
    alarms = judged_alarms(source)
    if not alarms:  # every reading would be labelled normal, and the metrics read as if so
        whose = f" of model {source.model_name}" if source.model_name else ""
        raise ConfigError(
            "feedback",
            f"no verdict in {source.feedback} judges an alarm event{whose} it holds: give the "
            "alarm topic's events with the verdicts",
        )
    labels = feedback_labels(frame, alarms, data.time_col, data.key_col, data.path)
    frame["feedback_label"] = labels
    out = folder / f"feedback-labelled{'.parquet' if parquet else '.csv'}"
    frame.to_parquet(out) if parquet else frame.to_csv(out, index=False)
    return dataclasses.replace(data, path=str(out), label_col="feedback_label")

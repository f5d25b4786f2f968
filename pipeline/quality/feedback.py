"""Operator feedback records: the schema `aewatch.feedback.v1`, checked without a schema library.

A record names the alarm it judges, by the episode id of its alarm events or by an event id (an
alarm event's, meaning its episode, or an anomaly window event's), and gives a verdict:

    {"schema": "aewatch.feedback.v1", "episode_id": "...", "verdict": "false_positive",
     "who": "alice", "time": "2026-01-05T10:00:00Z", "note": "valve maintenance"}

Optional: `span` (`start`, `end`: the fault as the operator saw it), `key`, `note`. The JSON
Schema is `pipeline/schemas/feedback.v1.schema.json`; `parse_feedback` applies the same rules
(the tests check both agree) and says, for a record that breaks them, which reason the
dead-letter queue gets: `malformed_json` (not a JSON object) or `invalid_feedback` (with the
field). The Kafka key of a record is its target id, so on a compacted topic the latest verdict
on an alarm is the one kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

from pipeline.events import iso_ms

__all__ = [
    "FEEDBACK_SCHEMA",
    "FEEDBACK_VERSION",
    "VERDICTS",
    "Feedback",
    "FeedbackError",
    "feedback_record",
    "parse_feedback",
    "parse_time_ms",
]

FEEDBACK_VERSION = "aewatch.feedback.v1"
FEEDBACK_SCHEMA = "feedback.v1.schema.json"
VERDICTS = ("true_positive", "false_positive", "unsure")
FIELDS = {"schema", "episode_id", "event_id", "verdict", "span", "key", "who", "time", "note"}
MAX_ID, MAX_WHO, MAX_NOTE = 200, 200, 4000


class FeedbackError(ValueError):
    """A record that is not valid feedback: `reason` for the DLQ header, `detail` for people."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Feedback:
    verdict: str
    who: str
    time_ms: int
    episode_id: str | None = None
    event_id: str | None = None
    span: tuple[int, int] | None = None
    key: str | None = None
    note: str | None = None

    @property
    def target(self) -> str:
        """The id judged: the episode id when given, else the event id."""
        return self.episode_id or self.event_id

    def to_json(self) -> dict:
        record = {"schema": FEEDBACK_VERSION}
        if self.episode_id:
            record["episode_id"] = self.episode_id
        if self.event_id:
            record["event_id"] = self.event_id
        record.update(verdict=self.verdict, who=self.who, time=iso_ms(self.time_ms))
        if self.span is not None:
            record["span"] = {"start": iso_ms(self.span[0]), "end": iso_ms(self.span[1])}
        if self.key is not None:
            record["key"] = self.key
        if self.note:
            record["note"] = self.note
        return record


# the feedback schema's pattern: what datetime.fromisoformat takes beyond it (a time without
# seconds, basic format, week dates, a zone without a colon) other consumers refuse
_DATE_TIME = r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
_NO_ZONE = re.compile(_DATE_TIME)
RFC3339 = re.compile(_DATE_TIME + r"([Zz]|[+-][0-9]{2}:[0-9]{2})")


def parse_time_ms(text: object, field: str = "time") -> int:
    """Epoch milliseconds of an RFC 3339 date-time (a zone is required)."""
    if not isinstance(text, str) or RFC3339.fullmatch(text) is None:
        if isinstance(text, str) and _NO_ZONE.fullmatch(text):
            raise FeedbackError(
                "invalid_feedback", f"{field}: the date-time needs a zone: {text!r}"
            )
        raise FeedbackError("invalid_feedback", f"{field}: not an RFC 3339 date-time: {text!r}")
    try:
        parsed = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise FeedbackError(
            "invalid_feedback", f"{field}: not an RFC 3339 date-time: {text!r}"
        ) from None
    try:
        return int(round(parsed.astimezone(UTC).timestamp() * 1000))
    except (OverflowError, OSError):  # its zone puts it before year 1 or after 9999 in UTC
        raise FeedbackError(
            "invalid_feedback", f"{field}: outside the years 1 to 9999 in UTC: {text!r}"
        ) from None


def _text(record: dict, field: str, limit: int, *, required: bool = False) -> str | None:
    value = record.get(field)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        raise FeedbackError("invalid_feedback", f"{field}: a non-empty string is required")
    if len(value) > limit:
        raise FeedbackError("invalid_feedback", f"{field}: longer than {limit} characters")
    return value


def parse_feedback(value: bytes | None) -> Feedback:
    """A feedback record from its bytes, or `FeedbackError` saying what is wrong."""
    try:
        record = orjson.loads(value or b"")
    except orjson.JSONDecodeError as exc:
        raise FeedbackError("malformed_json", f"not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise FeedbackError("malformed_json", "not a JSON object")
    unknown = sorted(set(record) - FIELDS)
    if unknown:
        raise FeedbackError("invalid_feedback", f"unknown fields: {', '.join(unknown)}")
    if record.get("schema") != FEEDBACK_VERSION:
        raise FeedbackError(
            "invalid_feedback",
            f"schema: must be {FEEDBACK_VERSION!r}, got {record.get('schema')!r}",
        )
    episode_id = _text(record, "episode_id", MAX_ID)
    event_id = _text(record, "event_id", MAX_ID)
    if not episode_id and not event_id:
        raise FeedbackError("invalid_feedback", "episode_id or event_id: one is required")
    verdict = record.get("verdict")
    if verdict not in VERDICTS:
        raise FeedbackError(
            "invalid_feedback", f"verdict: one of {', '.join(VERDICTS)}, got {verdict!r}"
        )
    who = _text(record, "who", MAX_WHO, required=True)
    time_ms = parse_time_ms(record.get("time"))
    span = record.get("span")
    if span is not None:
        if not isinstance(span, dict) or set(span) != {"start", "end"}:
            raise FeedbackError("invalid_feedback", "span: an object of start and end")
        span = (parse_time_ms(span["start"], "span.start"), parse_time_ms(span["end"], "span.end"))
        if span[1] < span[0]:
            raise FeedbackError("invalid_feedback", "span: end before start")
    key = record.get("key")
    if key is not None and not isinstance(key, str):
        raise FeedbackError("invalid_feedback", "key: a string is required")
    return Feedback(
        verdict=verdict,
        who=who,
        time_ms=time_ms,
        episode_id=episode_id,
        event_id=event_id,
        span=span,
        key=key,
        note=_text(record, "note", MAX_NOTE),
    )


def feedback_record(feedback: Feedback) -> tuple[bytes, bytes]:
    """The Kafka key (the target id) and value of a feedback record."""
    return feedback.target.encode(), orjson.dumps(feedback.to_json())

"""`aewatch alerts`: tail an event topic in a readable form, or as JSON lines.

With `--interactive`, each alarm that opens (and each anomalous window event) is followed by a
prompt on the terminal; the answer (`t` true positive, `f` false positive, `u` unsure, then an
optional note; an empty line skips) goes to the feedback topic as an `aewatch.feedback.v1` record
(see `pipeline.quality.feedback`).
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time

import orjson

from pipeline.events import ALARM_TYPES, DRIFT_TYPE, EVENT_TYPE
from pipeline.kafka_io.settings import add_connection_arguments, connection_from_args, topic_name
from pipeline.settings import count, non_negative

__all__ = ["ANSWERS", "answer_feedback", "format_event", "read_event", "register_alerts"]

ANSWERS = {"t": "true_positive", "f": "false_positive", "u": "unsure"}
# the words each answer may be given as (a word merely starting with one, "tbd", is none)
_SPELLINGS = {
    spelled: verdict
    for letter, verdict in ANSWERS.items()
    for spelled in (letter, {"t": "true", "f": "false", "u": "unsure"}[letter], verdict)
} | {"tp": "true_positive", "fp": "false_positive"}
PROMPT = "  verdict? t(rue) / f(alse) / u(nsure) [note], empty skips: "


def answer_feedback(event: dict, answer: str, who: str, now_ms: int):
    """The feedback record an operator's answer to an event gives (None: skipped or not an
    answer)."""
    from pipeline.quality.feedback import Feedback

    word, _, note = answer.strip().partition(" ")
    verdict = _SPELLINGS.get(word.lower())
    if verdict is None:
        return None
    data = event.get("data")
    if not isinstance(data, dict):  # not an event anyone can judge
        return None
    episode = data.get("episode_id")
    return Feedback(
        verdict=verdict,
        who=who,
        time_ms=now_ms,
        episode_id=episode,
        event_id=None if episode else event.get("id"),
        key=data.get("key"),
        note=note.strip() or None,
    )


def _judgeable(event: dict) -> bool:
    kind, data = event.get("type"), event.get("data")
    if not isinstance(data, dict):  # another producer's record, or a field of another type
        return False
    return kind == ALARM_TYPES["opened"] or (kind == EVENT_TYPE and data.get("is_anomaly") is True)


def read_event(value: bytes | None, offset: int, as_json: bool = False) -> tuple[dict | None, str]:
    """(the event or None, its line): a record that is not an aewatch event, or one whose fields
    are not of the documented types, gets a line that says so, and the tail goes on."""
    try:
        event = orjson.loads(value)
        return event, value.decode() if as_json else format_event(event)
    except (ValueError, AttributeError, TypeError, KeyError, IndexError):
        return None, f"(not an aewatch event at offset {offset})"


def format_event(event: dict) -> str:
    """The line of an aewatch event, by its type: an alarm opened or resolved, a drift event, a
    window event (anomalous, or normal with `--emit-all`). Anything else raises `ValueError`."""
    kind = event.get("type")
    if kind not in (DRIFT_TYPE, EVENT_TYPE, *ALARM_TYPES.values()):
        raise ValueError(f"not an aewatch event type: {kind!r}")
    data = event["data"]
    model = data.get("model", {})
    identity = f"model {model.get('name')} v{model.get('version')}"
    if kind == DRIFT_TYPE:
        return (
            f"{event.get('time')}  DRIFT    {event.get('subject')}  {data.get('scope')} PSI "
            f"{data['value']:.3g} (limit {data['limit']:.3g}) over {data.get('windows')} windows"
            f"  {identity}"
        )
    features = ",".join(f["name"] for f in data.get("top_features", []))
    if kind in ALARM_TYPES.values():
        span = f"since {data.get('start')}"
        if data.get("end"):
            span = f"{data.get('start')} .. {data.get('end')}"
        return (
            f"{event.get('time')}  {kind.rsplit('.', 1)[-1].upper():8s} {event.get('subject')}"
            f"  {span}  peak {data.get('peak_score', 0):.4g}"
            f" (x{data.get('severity', 0):.1f} threshold)  features {features}  {identity}"
        )
    anomalous = data.get("is_anomaly", True)  # the worker sends anomalous windows by default
    if not isinstance(anomalous, bool):
        raise TypeError(f"is_anomaly is {anomalous!r}")
    label = "ANOMALY" if anomalous else "normal "
    if "image" in data:
        regions = data["image"].get("top_regions") or [{}]
        return (
            f"{event.get('time')}  {label}  {event.get('subject')}  score "
            f"{data.get('score', 0):.4g} (x{data.get('severity', 0):.1f} threshold)  "
            f"hottest region row {regions[0].get('row')} col {regions[0].get('col')}  {identity}"
        )
    return (
        f"{data.get('window', {}).get('end', event.get('time'))}  {label}  "
        f"{event.get('subject')}  score {data.get('score', 0):.4g} "
        f"(x{data.get('severity', 0):.1f} threshold, p={data.get('p_value', 0):.2g})  "
        f"features {features}  {identity}"
    )


def register_alerts(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "alerts", help="tail anomaly and alarm events from a Kafka topic"
    )
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic", type=topic_name, default="aewatch.anomalies")
    parser.add_argument("--from-beginning", action="store_true")
    parser.add_argument("--json", action="store_true", help="one JSON event per line")
    parser.add_argument("--max", type=count, help="stop after this many events")
    parser.add_argument("--timeout", type=non_negative, help="stop after this many idle seconds")
    parser.add_argument(
        "--read-committed",
        action="store_true",
        help="only events of committed transactions (workers run with --exactly-once)",
    )
    parser.add_argument(
        "--interactive",
        action="store_true",
        help="after each alarm, ask for a verdict and write it to --feedback-topic",
    )
    parser.add_argument("--feedback-topic", type=topic_name, default="aewatch.feedback")
    parser.add_argument("--who", help="who answers (default: the user name)")
    add_connection_arguments(parser)
    parser.set_defaults(handler=_run_alerts)


def _run_alerts(args: argparse.Namespace) -> int:
    from pipeline.kafka_io import open_client

    kafka = open_client(connection_from_args(args, args.bootstrap_servers))
    kafka.check()
    ask = None
    if args.interactive:
        ask = _Asker(kafka, args.feedback_topic, args.who or getpass.getuser())
    consumer = kafka.tail(
        [args.topic], from_beginning=args.from_beginning, read_committed=args.read_committed
    )
    seen, last = 0, time.monotonic()
    try:
        while args.max is None or seen < args.max:
            polled = consumer.poll(500)
            if not polled and args.timeout and time.monotonic() - last > args.timeout:
                break
            # one loop over the records of every partition of the poll: --max ends it
            for record in (record for records in polled.values() for record in records):
                last = time.monotonic()
                seen += 1
                event, line = read_event(record.value, record.offset, args.json)
                print(line, flush=True)
                if ask is not None and isinstance(event, dict) and _judgeable(event):
                    ask(event)
                if args.max is not None and seen >= args.max:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
        if ask is not None:
            ask.close()
    sys.stdout.flush()
    return 0


class _Asker:
    """Asks for a verdict on the terminal and writes it to the feedback topic."""

    def __init__(self, kafka, topic: str, who: str) -> None:
        from pipeline.quality.cli import FEEDBACK_TOPIC_CONFIG

        kafka.ensure_topics({topic: FEEDBACK_TOPIC_CONFIG})
        self.sink, self.topic, self.who = kafka.sink(), topic, who

    def __call__(self, event: dict) -> None:
        from pipeline.quality.feedback import FeedbackError, feedback_record, parse_feedback

        print(PROMPT, end="", file=sys.stderr, flush=True)
        answer = sys.stdin.readline()
        feedback = answer_feedback(event, answer, self.who, int(time.time() * 1000))
        if feedback is None:
            if answer.strip():  # an answer that is no verdict is told, not taken as one
                word = answer.split()[0]
                print(f"  not sent: {word!r} is not t, f or u", file=sys.stderr, flush=True)
            return
        if feedback.episode_id is None and feedback.event_id is None:
            print("  not sent: the event has no id to judge", file=sys.stderr, flush=True)
            return
        key, value = feedback_record(feedback)
        try:  # what `aewatch feedback` and the quality service would refuse is not sent
            parse_feedback(value)
        except FeedbackError as exc:
            print(f"  not sent: {exc}", file=sys.stderr, flush=True)
            return
        self.sink.send(self.topic, key=key, value=value)
        self.sink.flush()
        print(f"  {feedback.verdict} -> {self.topic}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.sink.close()

"""`aewatch feedback` (write one verdict, or a file of them) and `aewatch quality` (the join).

    aewatch feedback --bootstrap-servers B --episode-id ID --verdict false_positive --who alice
    aewatch feedback --bootstrap-servers B --file verdicts.jsonl
    aewatch quality --bootstrap-servers B --alarm-topic aewatch.alarms --http-port 8081

Both check records against `aewatch.feedback.v1` before anything is sent: a bad record is
refused with a one-line error naming the field (records written by other producers are checked by
`aewatch quality`, which dead-letters them).
"""

from __future__ import annotations

import argparse
import getpass
import logging
import signal
import time
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.kafka_io.settings import (
    add_connection_arguments,
    connection_from_args,
    topic_name,
)
from pipeline.quality.feedback import (
    VERDICTS,
    Feedback,
    FeedbackError,
    feedback_record,
    parse_feedback,
    parse_time_ms,
)
from pipeline.settings import add_arguments, build, read

__all__ = ["FEEDBACK_TOPIC_CONFIG", "register_feedback", "register_quality", "send_feedback"]

log = logging.getLogger(__name__)
FEEDBACK_TOPIC_CONFIG = {"topic_configs": {"cleanup.policy": "compact"}}


def send_feedback(kafka, topic: str, records: list[Feedback]) -> None:
    """Write feedback records to `topic` (made compacted if missing) and wait for the broker."""
    kafka.ensure_topics({topic: FEEDBACK_TOPIC_CONFIG})
    sink = kafka.sink()
    try:
        for feedback in records:
            key, value = feedback_record(feedback)
            sink.send(topic, key=key, value=value)
        sink.flush()
    finally:
        sink.close()


def register_feedback(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "feedback",
        help="write an operator verdict on an alarm to the feedback topic",
        description="Writes aewatch.feedback.v1 records (see the README's feedback section).",
    )
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument(
        "--topic", type=topic_name, default="aewatch.feedback", help="the feedback topic"
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--episode-id", help="the alarm episode judged")
    target.add_argument("--event-id", help="the event judged (alarm or anomaly window event)")
    target.add_argument("--file", type=Path, help="JSON lines of feedback records to write")
    parser.add_argument("--verdict", choices=VERDICTS)
    parser.add_argument("--who", help="who judged (default: the user name)")
    parser.add_argument("--note", help="free text")
    parser.add_argument("--key", help="the entity key (optional)")
    parser.add_argument("--time", help="when judged, RFC 3339 (default: now)")
    parser.add_argument("--span-start", help="start of the fault as seen, RFC 3339")
    parser.add_argument("--span-end", help="end of the fault as seen, RFC 3339")
    add_connection_arguments(parser)
    parser.set_defaults(handler=_run_feedback)


def _records(args: argparse.Namespace) -> list[Feedback]:
    if args.file is not None:
        try:
            text = args.file.read_bytes()
        except OSError as exc:
            raise ConfigError("file", f"{args.file}: {exc.strerror or exc}") from None
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1)]
        records = []
        for number, line in lines:
            if line.strip():
                try:
                    records.append(parse_feedback(line))
                except FeedbackError as exc:
                    raise ConfigError("file", f"{args.file}:{number}: {exc.detail}") from None
        if not records:
            raise ConfigError("file", f"{args.file}: no feedback records")
        return records
    if args.verdict is None:
        raise ConfigError("verdict", f"give --verdict ({', '.join(VERDICTS)})")
    try:
        span = None
        if args.span_start or args.span_end:
            if not (args.span_start and args.span_end):
                raise FeedbackError("invalid_feedback", "span: give --span-start and --span-end")
            span = (
                parse_time_ms(args.span_start, "span-start"),
                parse_time_ms(args.span_end, "span-end"),
            )
        record = Feedback(
            verdict=args.verdict,
            who=args.who or getpass.getuser(),
            time_ms=parse_time_ms(args.time) if args.time else int(time.time() * 1000),
            episode_id=args.episode_id,
            event_id=args.event_id,
            span=span,
            key=args.key,
            note=args.note,
        )
        # the same checks as every reader applies
        return [parse_feedback(feedback_record(record)[1])]
    except FeedbackError as exc:
        raise ConfigError("feedback", exc.detail) from None


def _run_feedback(args: argparse.Namespace) -> int:
    from pipeline.kafka_io import open_client

    records = _records(args)
    kafka = open_client(connection_from_args(args, args.bootstrap_servers))
    kafka.check()
    send_feedback(kafka, args.topic, records)
    for record in records:
        print(f"{record.verdict} {record.target} -> {args.topic}")
    return 0


def register_quality(subparsers: argparse._SubParsersAction) -> None:
    from pipeline.quality.service import QualitySettings

    parser = subparsers.add_parser(
        "quality",
        help="join operator feedback to emitted alarms: live precision, MLflow history",
        description="Reads the alarm and feedback topics from their start (its state), serves "
        "the live figures on /metrics and appends them to each version's MLflow run.",
    )
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)",
    )
    add_arguments(parser, QualitySettings, env=False)
    add_connection_arguments(parser)
    parser.set_defaults(handler=_run_quality)


def _run_quality(args: argparse.Namespace) -> int:
    from pipeline.cli import tracking_uri_from
    from pipeline.kafka_io import open_client
    from pipeline.quality.service import QualityService, QualitySettings
    from pipeline.registry.client import log_run_metrics, version_run_id
    from pipeline.registry.reach import probe
    from pipeline.worker.http_server import WorkerHttpServer, check_bindable

    settings = build(QualitySettings, read(QualitySettings, args, {}))
    # where the worker looks too; a store MLflow cannot open, or a server that does not answer,
    # is refused before any Kafka I/O
    uri = tracking_uri_from(args)
    probe(uri)
    if settings.http_port > 0:  # a port in use: before any topic is made
        check_bindable(settings.http_host, settings.http_port)
    kafka = open_client(connection_from_args(args, args.bootstrap_servers))
    kafka.check()
    kafka.ensure_topics(
        {settings.feedback_topic: FEEDBACK_TOPIC_CONFIG, settings.dlq_topic: {}}
        | {topic: {} for topic in settings.alarm_topic}
    )
    service = QualityService(
        settings,
        kafka.tail([*settings.alarm_topic, settings.feedback_topic], from_beginning=True),
        kafka.sink(),
        run_of=lambda name, version: version_run_id(name, version, tracking_uri=uri),
        log_metrics=lambda run, figures, step, ms: log_run_metrics(
            run, figures, step=step, timestamp_ms=ms, tracking_uri=uri
        ),
    )
    http = None
    if settings.http_port >= 0:
        http = WorkerHttpServer(
            settings.http_host,
            settings.http_port,
            metrics=service.metrics.exposition,
            live=service.liveness,
            ready=service.readiness,
        ).start()
        log.info("quality metrics on port %d", http.port)

    def _stop(signum, _frame) -> None:
        service.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        service.run()
    finally:
        service.tail.close()
        service.sink.close()
        if http is not None:
            http.close()
    return 0

"""`aewatch alerts`: tail an event topic in a readable form, or as JSON lines."""

from __future__ import annotations

import argparse
import sys
import time

import orjson

from pipeline.kafka_io.settings import add_connection_arguments, connection_from_args

__all__ = ["format_event", "register_alerts"]


def format_event(event: dict) -> str:
    data = event.get("data", {})
    model = data.get("model", {})
    features = ",".join(f["name"] for f in data.get("top_features", []))
    kind = event.get("type", "?")
    if kind.startswith("aewatch.alarm"):
        span = f"since {data.get('start')}"
        if data.get("end"):
            span = f"{data.get('start')} .. {data.get('end')}"
        return (
            f"{event.get('time')}  {kind.rsplit('.', 1)[-1].upper():8s} {event.get('subject')}"
            f"  {span}  peak {data.get('peak_score', 0):.4g}"
            f" (x{data.get('severity', 0):.1f} threshold)  features {features}  "
            f"model {model.get('name')} v{model.get('version')}"
        )
    if "image" in data:
        regions = data["image"].get("top_regions") or [{}]
        return (
            f"{event.get('time')}  ANOMALY  {event.get('subject')}  score "
            f"{data.get('score', 0):.4g} (x{data.get('severity', 0):.1f} threshold)  "
            f"hottest region row {regions[0].get('row')} col {regions[0].get('col')}  "
            f"model {model.get('name')} v{model.get('version')}"
        )
    return (
        f"{data.get('window', {}).get('end', event.get('time'))}  ANOMALY  "
        f"{event.get('subject')}  score {data.get('score', 0):.4g} "
        f"(x{data.get('severity', 0):.1f} threshold, p={data.get('p_value', 0):.2g})  "
        f"features {features}  model {model.get('name')} v{model.get('version')}"
    )


def register_alerts(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "alerts", help="tail anomaly and alarm events from a Kafka topic"
    )
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic", default="aewatch.anomalies")
    parser.add_argument("--from-beginning", action="store_true")
    parser.add_argument("--json", action="store_true", help="one JSON event per line")
    parser.add_argument("--max", type=int, help="stop after this many events")
    parser.add_argument("--timeout", type=float, help="stop after this many idle seconds")
    parser.add_argument(
        "--read-committed",
        action="store_true",
        help="only events of committed transactions (workers run with --exactly-once)",
    )
    add_connection_arguments(parser)
    parser.set_defaults(handler=_run_alerts)


def _run_alerts(args: argparse.Namespace) -> int:
    from pipeline.kafka_io import open_client

    kafka = open_client(connection_from_args(args, args.bootstrap_servers))
    kafka.check()
    consumer = kafka.tail(
        [args.topic], from_beginning=args.from_beginning, read_committed=args.read_committed
    )
    seen, last = 0, time.monotonic()
    try:
        while args.max is None or seen < args.max:
            polled = consumer.poll(500)
            if not polled and args.timeout and time.monotonic() - last > args.timeout:
                break
            for records in polled.values():
                for record in records:
                    last = time.monotonic()
                    seen += 1
                    try:
                        event = orjson.loads(record.value)
                        line = record.value.decode() if args.json else format_event(event)
                    except (orjson.JSONDecodeError, AttributeError, TypeError):
                        line = f"(not an aewatch event at offset {record.offset})"
                    print(line, flush=True)
                    if args.max is not None and seen >= args.max:
                        break
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    sys.stdout.flush()
    return 0

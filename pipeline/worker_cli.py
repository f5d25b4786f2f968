"""`aewatch worker`: settings from flags and AEWATCH_ variables, the model, Kafka, signals."""

from __future__ import annotations

import argparse
import logging
import os
import signal

from pipeline.config import WorkerSettings, add_worker_arguments, settings_from_args

__all__ = ["build_worker", "register_worker"]

log = logging.getLogger(__name__)


def register_worker(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="score Kafka readings with a registered detector and emit anomaly events",
        description="A Kafka consumer-group member: windows readings per key, scores them in "
        "micro-batches, produces CloudEvents for anomalies and dead-letters bad "
        "records. Every flag can also be set as an AEWATCH_ environment variable.",
    )
    add_worker_arguments(parser)
    parser.set_defaults(handler=_run_worker)


def build_worker(settings: WorkerSettings):
    """Load the model, make sure the topics exist, and wire the worker to Kafka."""
    from pipeline import kafka_io
    from pipeline.registry import load_model
    from pipeline.state import KafkaStateStore
    from pipeline.worker import Worker

    detector, ref = load_model(
        settings.model,
        tracking_uri=settings.tracking_uri,
        device=settings.device,
        require_calibrated=True,
    )
    security = settings.kafka_security()
    kafka_io.ensure_topics(
        settings.bootstrap_servers,
        {
            settings.output_topic: {},
            settings.dlq_topic: {},
            settings.state_topic_name: {"topic_configs": {"cleanup.policy": "compact"}},
        },
        security,
    )
    sink = kafka_io.KafkaSink(settings)

    def read_latest(topic, keys):
        return kafka_io.read_latest(settings.bootstrap_servers, topic, keys, security)

    state = KafkaStateStore(sink, read_latest, settings.state_topic_name)
    worker = Worker(settings, detector, ref.identity(), sink, state)
    worker.attach(kafka_io.KafkaSource(settings, worker.on_assigned, worker.on_revoked))
    log.info(
        "worker ready: model %s on %s; settings %s", ref.label, detector.device, settings.redacted()
    )
    return worker


def _run_worker(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, os.environ)
    worker = build_worker(settings)

    def _stop(signum, _frame) -> None:
        log.info("signal %d: finishing the batch, committing, leaving the group", signum)
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stats = worker.run()
    worker.source.close()
    worker.sink.close()
    log.info("stopped: %s", stats.snapshot())
    return 0

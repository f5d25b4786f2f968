"""`aewatch worker`: settings from flags and AEWATCH_ variables, the model, Kafka, signals."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from pipeline.worker.settings import WorkerSettings, add_worker_arguments, settings_from_args

__all__ = ["build_worker", "close_worker", "register_worker", "worker_command"]

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


def worker_command(settings: WorkerSettings, *, log_format: str = "json") -> list[str]:
    """The command line of `aewatch worker` with these settings, in this Python (secrets are
    left to AEWATCH_ variables, see `WorkerSettings.to_argv`)."""
    return [sys.executable, "-m", "pipeline.cli", "--log-format", log_format, "worker"] + (
        settings.to_argv()
    )


def build_worker(settings: WorkerSettings):
    """Load the model, make sure the topics exist, and wire the worker to Kafka, the registry
    (hot reload) and its HTTP port. Call `close_worker` when it has stopped."""
    from pipeline.kafka_io import open_client
    from pipeline.registry.client import parse_model_uri
    from pipeline.worker.loop import Worker
    from pipeline.worker.metrics import WorkerMetrics
    from pipeline.worker.state import KafkaStateStore

    detector, ref = _load_with_retries(settings)
    registry, topics = settings.registry, settings.topics
    kafka = open_client(settings.kafka)
    wanted = {
        topics.output_topic: {},
        topics.dlq_topic: {},
        settings.state_topic_name: {"topic_configs": {"cleanup.policy": "compact"}},
    }
    wanted.setdefault(topics.alarm_topic_name, {})
    kafka.ensure_topics(wanted)
    metrics = WorkerMetrics()
    max_bytes = settings.records.max_record_bytes
    transaction_timeout_ms = max(10_000, 4 * settings.loop.commit_interval_ms)
    sink = kafka.sink(
        max_record_bytes=max_bytes,
        transaction_timeout_ms=transaction_timeout_ms if settings.kafka.exactly_once else None,
    )

    follower = None
    parsed = parse_model_uri(registry.model)
    if parsed is not None and parsed[1] is not None and registry.reload_interval_s > 0:
        from pipeline.registry.follower import ModelFollower

        follower = ModelFollower(
            registry.model,
            detector,
            ref,
            tracking_uri=registry.tracking_uri,
            device=settings.batching.device,
            interval_s=registry.reload_interval_s,
            on_outcome=lambda outcome, reason: metrics.reloads.labels(outcome, reason).inc(),
        )
    state = KafkaStateStore(sink, kafka.read_latest, settings.state_topic_name)
    worker = Worker(
        settings, detector, ref.identity(), sink, state, metrics=metrics, follower=follower
    )
    worker.attach(kafka.source(topics.input_topic, topics.input_pattern, worker))
    worker.http = None
    if settings.http.http_port >= 0:
        from pipeline.worker.http_server import WorkerHttpServer

        worker.http = WorkerHttpServer(
            settings.http.http_host,
            settings.http.http_port,
            metrics=metrics.exposition,
            live=worker.liveness,
            ready=worker.readiness,
            on_alias_created=follower.trigger if follower else None,
            webhook_secret=settings.http.webhook_secret,
        ).start()
    if follower is not None:
        follower.start()
    log.info(
        "worker ready: model %s on %s; settings %s", ref.label, detector.device, settings.redacted()
    )
    return worker


def _load_with_retries(settings: WorkerSettings):
    """The model to serve; an unreachable registry is retried for `registry_wait_s`."""
    from pipeline.errors import RegistryError
    from pipeline.registry.client import fail_fast_http, load_model

    fail_fast_http()
    deadline = time.monotonic() + settings.registry.registry_wait_s
    delay = 1.0
    while True:
        try:
            return load_model(
                settings.registry.model,
                tracking_uri=settings.registry.tracking_uri,
                device=settings.batching.device,
                require_calibrated=True,
            )
        except RegistryError as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            log.warning("registry not ready (%s); retrying for %.0f s more", exc, left)
            time.sleep(min(delay, left))
            delay = min(delay * 2, 10.0)


def close_worker(worker) -> None:
    """Leave the group and release the producer, the follower thread and the HTTP port."""
    if worker.follower is not None:
        worker.follower.close()
    worker.source.close()
    worker.sink.close()
    if getattr(worker, "http", None) is not None:
        worker.http.close()


def _run_worker(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, os.environ)
    worker = build_worker(settings)

    def _stop(signum, _frame) -> None:
        log.info("signal %d: finishing the batch, committing, leaving the group", signum)
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        stats = worker.run()
    finally:
        close_worker(worker)
    log.info("stopped: %s", stats.snapshot())
    return 0

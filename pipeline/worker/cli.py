"""`aewatch worker`: settings from flags and AEWATCH_ variables, the environment MLflow reads,
signals; the rest is `WorkerApp`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import MutableMapping

from pipeline.worker.settings import WorkerSettings, add_worker_arguments, settings_from_args

__all__ = ["register_worker", "worker_command", "worker_environment"]

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


def worker_environment(environ: MutableMapping[str, str] = os.environ) -> None:
    """What the worker's process sets before MLflow's client reads it: one attempt per registry
    request, since the worker paces its own retries (`registry_wait_s`, the follower's backoff)
    and MLflow's client would otherwise retry for minutes before raising."""
    environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def _run_worker(args: argparse.Namespace) -> int:
    from pipeline.worker.app import WorkerApp

    settings = settings_from_args(args, os.environ)
    worker_environment()
    if settings.loop.processes > 1:
        from pipeline.worker.supervisor import supervise

        return supervise(settings, dict(os.environ), log_format=args.log_format)
    app = WorkerApp.build(settings)

    def _stop(signum, _frame) -> None:
        log.info("signal %d: finishing the batch, committing, leaving the group", signum)
        app.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with app:
        stats = app.run()
    log.info("stopped: %s", stats.snapshot())
    return 0

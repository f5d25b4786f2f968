"""The demo's quieter logging: warnings from aewatch and MLflow, errors from kafka-python, for as
long as the demo runs."""

from __future__ import annotations

import logging
from contextlib import contextmanager

__all__ = ["logs_restored", "quiet_logs"]

_NOISY = ("pipeline", "training", "mlflow", "alembic")


class _QuietKafka(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("kafka") or record.levelno >= logging.ERROR


_QUIET_KAFKA = _QuietKafka()


def quiet_logs() -> None:
    """Only warnings from aewatch and MLflow, only errors from kafka-python (again after each
    sub-command, which configures logging afresh)."""
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QUIET_KAFKA)


@contextmanager
def logs_restored():
    """The demo's quieter logging for its duration only: the levels it changes go back, and its
    filter leaves the handlers, when it ends (so a process that goes on logs as before)."""
    levels = {name: logging.getLogger(name).level for name in _NOISY}
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for handler in logging.getLogger().handlers:
            handler.removeFilter(_QUIET_KAFKA)

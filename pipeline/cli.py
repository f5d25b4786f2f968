"""The `aewatch` command line.

Sub-commands are plugins found through the `aewatch.commands` entry-point group, so the scoring
side never imports the training side. Each plugin is a function `register(subparsers)` that adds
one parser and sets `handler` to a function taking the parsed namespace and returning an exit code.
Logging is configured here, once; nothing below the CLI reads the environment. So is how long a
command keeps trying an unreachable tracking server (`--registry-retry-s`, default 15 s): the
probe of `pipeline.registry.reach` and MLflow's own retry variables get the same budget (the
worker paces its own retries and keeps one attempt per request).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import entry_points

from pipeline import __version__
from pipeline.config_file import load_config_file
from pipeline.errors import AewatchError, ConfigError

__all__ = ["build_parser", "configure_logging", "main", "process_state"]

log = logging.getLogger(__name__)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


NOISY_LOGGERS = ("kafka", "mlflow", "alembic", "urllib3", "git")  # WARNING unless DEBUG


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once: human-readable text or one JSON object per line."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class Parser(argparse.ArgumentParser):
    """argparse, with an error in one line (and where to find the usage) instead of the usage
    block first; each subcommand's parser is one too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def tracking_uri_from(args: argparse.Namespace) -> str:
    """The tracking URI of the command line, the environment or the default, checked to be one
    MLflow can open before anything else is done (`check_uri`)."""
    from pipeline.registry.reach import check_uri, default_tracking_uri

    uri = (
        getattr(args, "tracking_uri", None)
        or os.environ.get("MLFLOW_TRACKING_URI")
        or default_tracking_uri()
    )
    check_uri(uri)
    return uri


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="aewatch",
        description="Streaming anomaly detection with autoencoders.",
    )
    parser.add_argument("--version", action="version", version=f"aewatch {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    parser.add_argument(
        "--registry-retry-s",
        default=None,
        help="how long a command keeps trying an unreachable MLflow tracking server "
        "(default: AEWATCH_REGISTRY_RETRY_S or 15)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group="aewatch.commands"), key=lambda e: e.name):
        ep.load()(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    configure_logging(args.log_level, args.log_format)
    with _process_settings():
        return _run(parser, argv, args)


# What a command sets for its own process: MLflow reads these variables when it makes a request.
_PROCESS_VARIABLES = (
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
    "MLFLOW_DISABLE_TELEMETRY",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
)


@contextmanager
def process_state(variables: Sequence[str] = _PROCESS_VARIABLES) -> Iterator[None]:
    """These environment variables and the registry retry budget, put back as they were when
    the block ends."""
    from pipeline.registry import reach

    saved = {name: os.environ.get(name) for name in variables}
    budget = reach.retry_budget()
    try:
        yield
    finally:
        reach.set_retry_budget(budget)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _process_settings() -> Iterator[None]:
    """MLflow's variables and the registry retry budget a command sets hold while it runs and
    are put back when it returns, so a caller of `main` in its own process goes on as before."""
    with process_state():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        yield


def _run(parser: argparse.ArgumentParser, argv, args: argparse.Namespace) -> int:
    try:
        _registry_budget(args)
        if getattr(args, "config", None) and getattr(args, "config_parser", None):
            # A config file sets the command's defaults; flags given on the command line win.
            args.config_parser.set_defaults(**load_config_file(args.config, args.config_parser))
            args = parser.parse_args(argv)
        return int(args.handler(args) or 0)
    except AewatchError as exc:
        print(f"aewatch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _registry_budget(args: argparse.Namespace) -> None:
    """The retry budget for an unreachable tracking server, from the flag or the variable."""
    from pipeline.registry.reach import DEFAULT_RETRY_BUDGET_S, client_environment, set_retry_budget

    given = args.registry_retry_s or os.environ.get("AEWATCH_REGISTRY_RETRY_S")
    try:
        budget = DEFAULT_RETRY_BUDGET_S if given in (None, "") else float(given)
    except ValueError:
        budget = float("nan")
    if not budget >= 0 or budget == float("inf"):
        raise ConfigError("registry_retry_s", f"must be a number of seconds >= 0, got {given!r}")
    if args.command == "worker":  # paces its own retries: one attempt per request
        set_retry_budget(0.0)
        return
    set_retry_budget(budget)
    for key, value in client_environment(budget).items():
        os.environ.setdefault(key, value)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Flags several training commands share, and the settings objects they become.

`--model` with its registry and device (`ModelSource`), `--data` with how to read it
(`DataSource`), and the tracking URI: the flag, else `MLFLOW_TRACKING_URI`, else a sqlite store in
the working directory. This is the command line: the one place of `training` that reads the
environment.
"""

from __future__ import annotations

import argparse
import contextlib

from pipeline.cli import tracking_uri_from
from pipeline.errors import ConfigError
from training.data.columns import FILL_POLICIES
from training.data.for_detector import DataSource
from training.sources import ModelSource

__all__ = [
    "DEFAULT_FRACTIONS",
    "DEFAULT_WINDOW",
    "add_data_arguments",
    "add_score_arguments",
    "add_split_arguments",
    "add_model_arguments",
    "data_source",
    "model_source",
    "tracking_uri_from",
]

DEFAULT_WINDOW, DEFAULT_FRACTIONS = 32, "0.6,0.15,0.15,0.1"  # aewatch train's split


def add_split_arguments(group) -> None:
    """`--window` and `--fractions` of `aewatch train`: without both, a short series gets a
    split that fits (`training.data.splits.plan_short_series`)."""
    group.add_argument("--window", type=int, help=f"window length W (default: {DEFAULT_WINDOW})")
    group.add_argument(
        "--fractions",
        help=f"train,validation,calibration,test fractions (default: {DEFAULT_FRACTIONS})",
    )


def add_score_arguments(group) -> None:
    """`--score` and `--score-aggregation` of `aewatch train` (see `training.score_stats`)."""
    from pipeline.detector.scoring import AGGREGATIONS
    from training.score_stats import SCORE_CHOICES

    group.add_argument(
        "--score",
        default="auto",
        choices=SCORE_CHOICES,
        help="raw: mean reconstruction error; terms: per-feature error, spread, roughness and "
        "spectral centroid; auto (default): terms for series, raw for images",
    )
    group.add_argument(
        "--score-aggregation",
        default="max",
        choices=AGGREGATIONS,
        help="terms: how features' contributions make the window's score (default: %(default)s)",
    )


def add_data_arguments(
    parser: argparse.ArgumentParser, *, labels: bool = True, required: bool = True
) -> None:
    """The flags that say how to read `--data` for a detector (see `DataSource`)."""
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=required, help="CSV/Parquet series or an image source")
    group.add_argument("--time-col", default="ts", help="timestamp column (default: %(default)s)")
    group.add_argument("--key-col", help="entity column")
    group.add_argument("--fill", default="error", choices=FILL_POLICIES)
    if labels:
        group.add_argument("--label-col", help="0/1 anomaly label column (series)")
        group.add_argument("--normal-class", help="images: the normal class (others anomalous)")
        group.add_argument("--labels", dest="labels_path", help="images: a labels file")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model` (a folder or a registry URI), where the registry is, and the device."""
    parser.add_argument(
        "--model",
        required=True,
        help="a detector folder, or models:/NAME@ALIAS or models:/NAME/VERSION",
    )
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--device", default="cpu", help="auto, cpu or cuda[:N]")


def model_source(args: argparse.Namespace) -> ModelSource:
    return ModelSource(args.model, tracking_uri_from(args), args.device)


def data_source(args: argparse.Namespace) -> DataSource | None:
    """The `--data` flags as a `DataSource` (None without `--data`)."""
    if not getattr(args, "data", None):
        return None
    return DataSource(
        path=args.data,
        time_col=args.time_col,
        key_col=args.key_col,
        fill=args.fill,
        label_col=getattr(args, "label_col", None),
        normal_class=getattr(args, "normal_class", None),
        labels_path=getattr(args, "labels_path", None),
    )


def add_feedback_arguments(parser: argparse.ArgumentParser, use: str) -> None:
    """`--feedback TOPIC|FILE` and where a feedback topic's alarms are; `use` ends its help."""
    parser.add_argument(
        "--feedback",
        metavar="TOPIC|FILE",
        help="operator verdicts: a feedback topic (with --bootstrap-servers and --alarm-topic) "
        "or a JSON-lines file of alarm events and feedback records; " + use,
    )
    parser.add_argument("--alarm-topic", help="with a feedback topic: the workers' alarm topic")
    parser.add_argument("--bootstrap-servers", help="with a feedback topic: the Kafka cluster")


def feedback_source(args: argparse.Namespace):
    """The `--feedback` flags as a `FeedbackSource` (None without `--feedback`)."""
    from training.feedback import FeedbackSource

    if not getattr(args, "feedback", None):
        return None
    return FeedbackSource(args.feedback, args.alarm_topic, args.bootstrap_servers)


@contextlib.contextmanager
def labelled_data_source(args: argparse.Namespace):
    """`--data`, labelled by the operators' verdicts when `--feedback` is given: a copy in a
    temporary folder, removed when the block ends."""
    import tempfile
    from pathlib import Path

    from training.feedback import labelled_copy

    data, feedback = data_source(args), feedback_source(args)
    if data is None and (feedback is not None or getattr(args, "label_col", None)):
        raise ConfigError("data", "--feedback and --label-col label the readings of --data")
    if feedback is None or data is None:
        yield data
        return
    with tempfile.TemporaryDirectory(prefix="aewatch-feedback-") as folder:
        yield labelled_copy(data, feedback, Path(folder))

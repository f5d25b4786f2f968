"""`aewatch train`: flags, an optional config file whose keys mirror the flags, and the run.

This is the edge of the training job: it reads the environment (`MLFLOW_TRACKING_URI`, and the
rank variables a torchrun launcher sets), builds one frozen `TrainJob` (what to train, where to
record it, on how many ranks) and hands it to `training.runner.run_job`: to this process, to ranks
it launches itself (`--nproc-per-node`, `--nnodes`), or, under torchrun, to this process as one
rank. `run_rank_process` is where a launched rank's process begins.
"""

from __future__ import annotations

import argparse
import json
import os

from pipeline.detector.models import (
    ACTIVATIONS,
    BACKBONES,
    CORRUPTIONS,
    LOSSES,
    MODEL_KINDS,
    ModelConfig,
)
from pipeline.detector.scaler import SCALER_KINDS
from pipeline.errors import ConfigError
from pipeline.settings import finite_float, non_empty, random_seed
from training.calibrate import CALIBRATION_METHODS
from training.cli import args as shared
from training.cli.args import tracking_uri_from
from training.cli.summary import describe as _describe
from training.data.columns import FILL_POLICIES
from training.distributed import BACKENDS
from training.evaluate import POINT_RULES

__all__ = [
    "build_train_parser",
    "launch_settings_from_args",
    "register_train",
    "run_rank_process",
    "settings_from_args",
]


def _csv(value) -> tuple[str, ...]:
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value)
    return tuple(v.strip() for v in str(value).split(",") if v.strip())


def _csv_numbers(name: str, value, kind=float) -> tuple:
    try:
        return tuple(kind(v) for v in _csv(value))
    except ValueError:
        raise ConfigError(name, f"expected comma-separated numbers, got {value!r}") from None


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="CSV/Parquet series, image array/IDX/folder, or 'digits'")
    data.add_argument("--input-kind", default="auto", choices=["auto", "series", "image"])
    data.add_argument("--time-col", help="timestamp column (series)")
    data.add_argument("--key-col", help="entity column: each key is its own series")
    data.add_argument("--features", help="comma-separated feature columns (default: all numeric)")
    data.add_argument("--label-col", help="0/1 anomaly label column; never used as a feature")
    data.add_argument(
        "--fill",
        default="error",
        choices=FILL_POLICIES,
        help="what to do with NaN gaps (default: %(default)s)",
    )
    shared.add_split_arguments(data)
    data.add_argument(
        "--stride", type=int, default=1, help="window stride S (default: %(default)s)"
    )
    data.add_argument(
        "--key-baselines",
        action="store_true",
        help="with --key-col: standardise each key by its own train statistics, kept in the "
        "detector (a fleet whose machines each have their own normal level)",
    )
    data.add_argument("--train-until", help="timestamp: training data ends here")
    data.add_argument(
        "--calendar",
        default="off",
        choices=("auto", "off"),
        help="auto: time of day (sin, cos) as inputs when the training rows span 2 days or more, "
        "day of week when 14 days or more; made from timestamps by the worker too "
        "(default: %(default)s)",
    )
    data.add_argument("--normal-class", help="images: the class that is normal")
    data.add_argument("--labels", dest="labels_path", help="images: a labels file (.npy or IDX)")
    data.add_argument(
        "--scaler",
        default="auto",
        choices=["auto", *SCALER_KINDS],
        help="auto: standard for series, minmax for images and bce",
    )

    model = parser.add_argument_group("model")
    model.add_argument("--kind", default="undercomplete", choices=MODEL_KINDS)
    model.add_argument("--backbone", default="dense", choices=BACKBONES)
    model.add_argument(
        "--hidden",
        help="layer widths (conv: channels), encoder order (default: 256,128 for dense images, "
        "else 64,32)",
    )
    model.add_argument("--code-size", type=int, default=8)
    model.add_argument("--loss", default="mse", choices=LOSSES)
    model.add_argument("--activation", default="relu", choices=ACTIVATIONS)
    model.add_argument("--corruption", default="gaussian", choices=CORRUPTIONS)
    model.add_argument("--corruption-level", type=finite_float, default=0.1)
    model.add_argument("--sparsity", default="l1", choices=["l1", "kl"])
    model.add_argument("--sparsity-weight", type=finite_float, default=1e-3)
    model.add_argument("--sparsity-target", type=finite_float, default=0.05)
    model.add_argument("--contractive-weight", type=finite_float, default=1e-3)
    model.add_argument(
        "--beta",
        type=finite_float,
        default=0.1,
        help="KL weight per input element (default: %(default)s)",
    )
    model.add_argument("--vae-score", default="reconstruction", choices=["reconstruction", "elbo"])

    calib = parser.add_argument_group("calibration and evaluation")
    calib.add_argument(
        "--calibration",
        default="quantile",
        choices=CALIBRATION_METHODS,
        help="threshold method (default: %(default)s)",
    )
    calib.add_argument(
        "--target-fpr",
        type=finite_float,
        default=0.01,
        help="target false-positive rate per window (default: %(default)s)",
    )
    calib.add_argument("--mad-k", type=finite_float, default=3.0, help="k of median + k * MAD")
    calib.add_argument(
        "--pot-initial-quantile",
        type=finite_float,
        default=0.95,
        help="where the POT tail starts (default: %(default)s)",
    )
    calib.add_argument(
        "--threshold-margin",
        type=finite_float,
        default=1.0,
        help="multiply the calibrated threshold by this factor (default: %(default)s)",
    )
    shared.add_score_arguments(calib)
    calib.add_argument(
        "--point-rule",
        default="end",
        choices=POINT_RULES,
        help="how window decisions become point decisions (default: %(default)s)",
    )

    fit = parser.add_argument_group("fit")
    fit.add_argument("--epochs", type=int, default=50, help="at least this many epochs")
    fit.add_argument(
        "--batch-size", type=int, default=0, help="0: min(n, clamp(n // 16, 16, 256)) (default)"
    )
    fit.add_argument(
        "--min-steps", type=int, default=2000, help="at least this many optimizer steps (0: off)"
    )
    fit.add_argument("--max-steps", type=int, default=0, help="at most this many steps (0: none)")
    fit.add_argument("--lr", type=finite_float, default=1e-3)
    fit.add_argument("--weight-decay", type=finite_float, default=1e-4)
    fit.add_argument("--patience", type=int, default=5, help="early stopping patience (0: off)")
    fit.add_argument("--seed", type=random_seed, default=0)
    fit.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    fit.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")

    out = parser.add_argument_group("output")
    out.add_argument("--out", default="detector", help="artifact folder (default: %(default)s)")
    out.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)",
    )
    out.add_argument(
        "--overwrite", action="store_true", help="replace the detector already in --out"
    )
    out.add_argument("--experiment", type=non_empty, default="aewatch")
    out.add_argument("--run-name")
    out.add_argument(
        "--register",
        metavar="NAME",
        help="register the detector as a new version of NAME, alias challenger",
    )
    out.add_argument("--json", action="store_true", help="print the result as JSON")
    out.add_argument("--no-progress", action="store_true")

    scale = parser.add_argument_group("scale (see README: Training at scale)")
    scale.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        help="ranks to start on this machine (default: %(default)s, no process group)",
    )
    scale.add_argument("--nnodes", type=int, default=1, help="machines in the job")
    scale.add_argument("--rdzv-endpoint", help="HOST:PORT where the machines meet (c10d)")
    scale.add_argument("--rdzv-id", help="job id shared by the machines (default: random)")
    scale.add_argument(
        "--dist-backend",
        default="auto",
        choices=BACKENDS,
        help="auto: nccl on CUDA, gloo on CPU (default: %(default)s)",
    )
    scale.add_argument(
        "--out-of-core",
        action="store_true",
        help="read a Parquet file or directory in record batches instead of loading it",
    )
    scale.add_argument(
        "--batch-rows",
        type=int,
        default=65_536,
        help="out of core: rows per record batch (default: %(default)s)",
    )
    scale.add_argument(
        "--shuffle-windows",
        type=int,
        default=65_536,
        help="out of core: training windows shuffled together (default: %(default)s)",
    )


def build_train_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from pipeline.cli import Parser

    parser = parser or Parser(prog="aewatch train")
    parser.add_argument("--config", help="TOML or YAML file whose keys mirror the flags")
    add_train_arguments(parser)
    return parser


def settings_from_args(args: argparse.Namespace):
    from training.fit import FitConfig
    from training.job import CalibrationSettings, TrainSettings
    from training.model_defaults import default_hidden, is_image_input

    if not args.data:
        raise ConfigError("data", "--data is required (flag or config file)")
    fractions = _csv_numbers("fractions", args.fractions or shared.DEFAULT_FRACTIONS)
    if len(fractions) != 4:
        raise ConfigError("fractions", "give four numbers: train,validation,calibration,test")
    model = ModelConfig(
        kind=args.kind,
        backbone=args.backbone,
        hidden=_csv_numbers("hidden", args.hidden, int)
        if args.hidden is not None
        else default_hidden(
            image=is_image_input(args.input_kind, args.data), backbone=args.backbone
        ),
        code_size=args.code_size,
        loss=args.loss,
        activation=args.activation,
        corruption=args.corruption,
        corruption_level=args.corruption_level,
        sparsity=args.sparsity,
        sparsity_weight=args.sparsity_weight,
        sparsity_target=args.sparsity_target,
        contractive_weight=args.contractive_weight,
        beta=args.beta,
        vae_score=args.vae_score,
    )
    fit = FitConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        min_steps=args.min_steps,
        max_steps=args.max_steps,
        lr=args.lr,
        weight_decay=args.weight_decay,
        patience=args.patience,
        seed=args.seed,
        amp=not args.no_amp,
    )
    return TrainSettings(
        data=args.data,
        out=args.out,
        overwrite=args.overwrite,
        input_kind=args.input_kind,
        time_col=args.time_col,
        key_col=args.key_col,
        features=_csv(args.features) if args.features else None,
        label_col=args.label_col,
        fill=args.fill,
        window=shared.DEFAULT_WINDOW if args.window is None else args.window,
        stride=args.stride,
        key_baselines=args.key_baselines,
        train_until=args.train_until,
        calendar=args.calendar,
        normal_class=args.normal_class,
        labels_path=args.labels_path,
        fractions=fractions,
        scaler=args.scaler,
        model=model,
        fit=fit,
        calibration=CalibrationSettings(
            method=args.calibration,
            target_fpr=args.target_fpr,
            mad_k=args.mad_k,
            pot_initial_quantile=args.pot_initial_quantile,
            margin=args.threshold_margin,
        ),
        point_rule=args.point_rule,
        score=args.score,
        score_aggregation=args.score_aggregation,
        adapt_split=args.window is None and args.fractions is None,
        device=args.device,
        out_of_core=args.out_of_core,
        batch_rows=args.batch_rows,
        shuffle_windows=args.shuffle_windows,
    )


def launch_settings_from_args(args: argparse.Namespace):
    from training.distributed import LaunchSettings

    return LaunchSettings(
        nproc_per_node=args.nproc_per_node,
        nnodes=args.nnodes,
        rdzv_endpoint=args.rdzv_endpoint,
        rdzv_id=args.rdzv_id,
        backend=args.dist_backend,
    )


def register_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fit an autoencoder on normal data and write a detector artifact",
        description="Fit an autoencoder (or PCA) on normal windows or images, write a "
        "pickle-free detector artifact, and record the run in MLflow.",
    )
    build_train_parser(parser)
    parser.set_defaults(handler=_run_train, config_parser=parser)


def run_rank_process(settings, options) -> dict | None:
    """Where a rank launched by `aewatch train --nproc-per-node` begins: a process of its own,
    which reads its place in the job from the environment the launcher set."""
    from pipeline.cli import configure_logging
    from training.distributed import RankContext
    from training.runner import run_rank

    configure_logging(options.log_level, options.log_format)
    context = RankContext.from_environment(os.environ)
    if context is None:
        raise RuntimeError("a rank needs the environment of a torch.distributed launcher")
    return run_rank(settings, options, context)


def _run_train(args: argparse.Namespace) -> int:
    from training.distributed import RankContext
    from training.runner import RunOptions, TrainJob, run_job

    job = TrainJob(
        train=settings_from_args(args),
        options=RunOptions(
            tracking_uri=tracking_uri_from(args),
            experiment=args.experiment,
            run_name=args.run_name,
            register=args.register,
            progress=not (args.no_progress or args.json),
            backend=args.dist_backend,
            log_level=getattr(args, "log_level", "INFO"),
            log_format=getattr(args, "log_format", "text"),
        ),
        launch=launch_settings_from_args(args),
    )
    summary = run_job(job, RankContext.from_environment(os.environ), run_rank_process)
    if summary is None:  # another rank (or node) holds rank 0
        return 0
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        print(_describe(summary, job.options.tracking_uri, args.register))
    return 0

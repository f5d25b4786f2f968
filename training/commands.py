"""`aewatch score`, `evaluate`, `recalibrate` and `promote`: working with a trained detector."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from pipeline.errors import ConfigError
from training.calibrate import CALIBRATION_METHODS
from training.evaluate import POINT_RULES

__all__ = [
    "add_data_arguments",
    "add_model_arguments",
    "load_from_args",
    "register_evaluate",
    "register_promote",
    "register_recalibrate",
    "register_score",
]


def add_data_arguments(
    parser: argparse.ArgumentParser, *, labels: bool = True, required: bool = True
) -> None:
    """The flags that say how to read `--data` for a detector (see `training.inputs.load_for`)."""
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=required, help="CSV/Parquet series or an image source")
    group.add_argument("--time-col", default="ts", help="timestamp column (default: %(default)s)")
    group.add_argument("--key-col", help="entity column")
    group.add_argument("--fill", default="error", choices=["ffill", "interpolate", "drop", "error"])
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


def load_from_args(args: argparse.Namespace, *, require_calibrated: bool = True):
    """The detector and its `ModelRef` that `--model` names, resolved as the worker does."""
    from pipeline.registry.client import load_model
    from training.cli import tracking_uri_from

    return load_model(
        args.model,
        tracking_uri=tracking_uri_from(args),
        device=args.device,
        require_calibrated=require_calibrated,
    )


# -- score ---------------------------------------------------------------------------------------
def register_score(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score",
        help="score a file with a detector: one row per window",
        description="Score series windows (or images) with a trained detector, using the same "
        "code as the streaming worker. Writes key, window start and end, score, "
        "threshold, p-value, is_anomaly and the top features per window.",
    )
    add_model_arguments(parser)
    add_data_arguments(parser, labels=False)
    parser.add_argument("--out", required=True, help="output .csv or .parquet")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.set_defaults(handler=_run_score)


def _run_score(args: argparse.Namespace) -> int:
    from pipeline.batch import score_images, score_window_set
    from training.inputs import load_for
    from training.outputs import table_out, write_table

    out = table_out(args.out)
    detector, ref = load_from_args(args)
    data = load_for(detector, args)
    if data.windows is not None:
        frame = score_window_set(detector, data.windows, top_k=args.top_k, model=ref.identity())
    else:
        frame = score_images(detector, data.images)
    write_table(frame, out)
    summary = {
        "model": ref.label,
        "rows": int(len(frame)),
        "anomalies": int(frame["is_anomaly"].sum()),
        "threshold": detector.threshold.value,
        "out": str(out),
    }
    print(
        json.dumps(summary)
        if args.json
        else f"{summary['rows']} windows scored with {ref.label}: {summary['anomalies']} above the "
        f"threshold {summary['threshold']:.5g}; written to {out}"
    )
    return 0


# -- evaluate ------------------------------------------------------------------------------------
def register_evaluate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a detector on labelled data",
        description="AUROC, AUPRC, precision/recall/F1 at the threshold, point-wise FAR and MAR, "
        "event recall, detection delay and false alarms per day.",
    )
    add_model_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--point-rule", default="end", choices=POINT_RULES)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_images, evaluate_series
    from training.inputs import load_for

    detector, ref = load_from_args(args)
    data = load_for(detector, args)
    if data.labels is None:
        raise ConfigError("label_col", "evaluation needs labels: --label-col or --normal-class")
    scores = detector.score(data.raw, attribution=False).scores
    threshold = detector.threshold.require()
    if data.windows is not None:
        result = evaluate_series(
            data.points(),
            data.windows.keys,
            data.windows.end_times,
            detector.input.window.length,
            scores,
            threshold,
            rule=args.point_rule,
        )
    else:
        result = evaluate_images(data.image_labels, scores, threshold)
    result = {"model": ref.label, "threshold": threshold, **result}
    if args.json:
        print(json.dumps(result, default=str))
    else:
        for key, value in result.items():
            print(f"{key:26s} {value}")
    return 0


# -- recalibrate ---------------------------------------------------------------------------------
def register_recalibrate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "recalibrate",
        help="new threshold, same weights: registers a new version",
        description="Calibrate a registered detector's threshold on new normal data and register "
        "the result as a new version (alias challenger) with identical weights.",
    )
    add_model_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--method", default="quantile", choices=CALIBRATION_METHODS)
    parser.add_argument("--target-fpr", type=float, default=0.01)
    parser.add_argument("--mad-k", type=float, default=3.0)
    parser.add_argument("--pot-initial-quantile", type=float, default=0.95)
    parser.add_argument(
        "--holdout",
        type=float,
        default=0.3,
        help="last share of the data kept to measure the FPR (default: %(default)s)",
    )
    parser.add_argument("--experiment", default="aewatch")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_run_recalibrate)


def _run_recalibrate(args: argparse.Namespace) -> int:
    import mlflow

    from pipeline.detector import save_detector
    from pipeline.registry.client import TAG_PREFIX, parse_model_uri
    from training.calibrate import estimate_fpr, make_calibrator
    from training.cli import tracking_uri_from
    from training.inputs import load_for
    from training.register import register_version
    from training.tracking import tracking_run

    parsed = parse_model_uri(args.model)
    if parsed is None:
        raise ConfigError("model", "recalibrate registers a version: give models:/NAME@ALIAS")
    detector, ref = load_from_args(args)
    calibration, holdout = load_for(detector, args).split(args.holdout)
    calibrator = make_calibrator(
        args.method,
        target_fpr=args.target_fpr,
        mad_k=args.mad_k,
        pot_initial_quantile=args.pot_initial_quantile,
    )
    scores = detector.score(calibration.raw, attribution=False).scores
    if args.method == "f1":
        calibrator.update(scores, calibration.labels)
    else:
        calibrator.update(scores[calibration.normal])
    detector.threshold = calibrator.compute()
    held = detector.score(holdout.raw, attribution=False).scores[holdout.normal]
    fpr = estimate_fpr(held, detector.threshold.value)
    detector.info = {
        **detector.info,
        "calibration": {
            "fpr_estimate": fpr.to_dict(),
            "recalibrated_from": ref.label,
            "data": str(args.data),
        },
    }
    out = Path(tempfile.mkdtemp(prefix="aewatch-recal-")) / "detector"
    save_detector(detector.to("cpu"), out)
    # The weights file must stay byte-identical: the same weights, a new threshold.
    shutil.copyfile(ref.directory / "weights.pt", out / "weights.pt")
    params = {
        "recalibrated_from": ref.label,
        "method": args.method,
        "target_fpr": str(args.target_fpr),
        "data": str(args.data),
    }
    with tracking_run(
        tracking_uri_from(args), args.experiment, f"recalibrate {ref.label}", params
    ) as run:
        mlflow.log_metrics(
            {
                "threshold": detector.threshold.value,
                "fpr_estimate": fpr.rate,
                "fpr_ci_low": fpr.ci_low,
                "fpr_ci_high": fpr.ci_high,
            }
        )
        version = register_version(
            detector, out, ref.name, extra_tags={TAG_PREFIX + "recalibrated_from": ref.version}
        )
    summary = {
        "run_id": run.info.run_id,
        "name": ref.name,
        "version": version,
        "from_version": ref.version,
        "threshold": detector.threshold.value,
        "method": args.method,
        "fpr_estimate": fpr.to_dict(),
    }
    print(
        json.dumps(summary)
        if args.json
        else f"{ref.name} v{version} (from v{ref.version}): threshold "
        f"{detector.threshold.value:.5g} by {args.method}; held-out FPR {fpr.rate:.4f} "
        f"(95% CI {fpr.ci_low:.4f}-{fpr.ci_high:.4f}); alias @challenger"
    )
    return 0


# -- promote -------------------------------------------------------------------------------------
def register_promote(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "promote",
        help="move @champion to @challenger if the gates pass, or roll back",
        description="Compare champion and challenger side by side (on --data when given, else on "
        "the figures recorded at training) and move the champion alias only if the "
        "gates pass. --rollback moves it back to the previous champion.",
    )
    parser.add_argument("name", help="registered model name")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--data", help="score both versions on this data")
    parser.add_argument("--time-col", default="ts")
    parser.add_argument("--key-col")
    parser.add_argument("--label-col")
    parser.add_argument("--normal-class")
    parser.add_argument("--labels", dest="labels_path")
    parser.add_argument(
        "--fill", default="error", choices=["ffill", "interpolate", "drop", "error"]
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="allowed AUROC loss against the champion (default: %(default)s)",
    )
    parser.add_argument(
        "--max-fpr",
        type=float,
        default=0.01,
        help="FPR target when the version records none (default: %(default)s)",
    )
    parser.add_argument("--dry-run", action="store_true", help="compare only; change nothing")
    parser.add_argument("--rollback", action="store_true", help="restore the previous champion")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_run_promote)


def _run_promote(args: argparse.Namespace) -> int:
    from training.cli import tracking_uri_from
    from training.inputs import load_for
    from training.promote import apply_promotion, compare, rollback

    tracking_uri = tracking_uri_from(args)
    if args.rollback:
        current, previous = rollback(args.name, tracking_uri=tracking_uri)
        print(
            json.dumps({"from": current, "to": previous})
            if args.json
            else f"{args.name}: @champion moved back from v{current} to v{previous}"
        )
        return 0
    load_data = (lambda detector: load_for(detector, args)) if args.data else None
    report = compare(
        args.name,
        tracking_uri=tracking_uri,
        load_data=load_data,
        tolerance=args.tolerance,
        max_fpr=args.max_fpr,
    )
    promoted = False if args.dry_run else apply_promotion(report, tracking_uri=tracking_uri)
    if args.json:
        print(
            json.dumps(
                {**report.to_dict(), "promoted": promoted, "dry_run": args.dry_run}, default=str
            )
        )
    else:
        print(report.table())
        verdict = (
            "dry run: nothing changed"
            if args.dry_run
            else f"@champion -> v{report.challenger}"
            if promoted
            else "not promoted"
        )
        print(verdict, file=sys.stdout)
    return 0 if report.passed else 1

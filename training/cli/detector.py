"""`aewatch score`, `evaluate`, `recalibrate` and `promote`: working with a trained detector.

Each command turns its flags into one frozen settings object and calls one library function:
`training.scoring.score_file` / `evaluate_file`, `training.recalibrate.recalibrate`,
`training.promote.promote` / `rollback`; what is printed is decided here.
"""

from __future__ import annotations

import argparse
import json
import os

from pipeline.settings import add_arguments, build, finite_float, non_empty, read, whole
from pipeline.worker.settings import AdaptiveStageSettings, BaselineSettings
from training.calibrate import CALIBRATION_METHODS, CalibrationSettings
from training.cli.args import (
    add_data_arguments,
    add_feedback_arguments,
    add_model_arguments,
    data_source,
    feedback_source,
    labelled_data_source,
    model_source,
    tracking_uri_from,
)
from training.data.columns import FILL_POLICIES
from training.evaluate import POINT_RULES

__all__ = ["register_evaluate", "register_promote", "register_recalibrate", "register_score"]


def _print(args: argparse.Namespace, summary: dict, line: str) -> None:
    print(json.dumps(summary, default=str) if args.json else line)


def _add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("streaming stages")
    group.add_argument(
        "--stream",
        action="store_true",
        help="replay the windows through the worker's streaming stages in each key's time order: "
        "the adaptive stage's surprise, likelihood and detections, and the worker's decision",
    )
    add_arguments(group, AdaptiveStageSettings, env=False)


def _stream_settings(args: argparse.Namespace) -> AdaptiveStageSettings | None:
    """The worker's adaptive settings from the same flags (defaults as the worker's)."""
    if not args.stream:
        return None
    return build(AdaptiveStageSettings, read(AdaptiveStageSettings, args, {}))


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
    parser.add_argument(
        "--top-k", type=whole, default=3, help="features named per window, by error (0: none)"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    add_arguments(
        parser.add_argument_group("per-key baselines (as the worker's)"), BaselineSettings
    )
    _add_stream_arguments(parser)
    parser.set_defaults(handler=_run_score)


def _run_score(args: argparse.Namespace) -> int:
    from training.scoring import ScoreSettings, score_file

    baselines = build(BaselineSettings, read(BaselineSettings, args, os.environ)).config()
    settings = ScoreSettings(
        model_source(args),
        data_source(args),
        args.out,
        args.top_k,
        baselines,
        _stream_settings(args),
    )
    s = score_file(settings)
    line = (
        f"{s['rows']} windows scored with {s['model']}: {s['anomalies']} above the "
        f"threshold {s['threshold']:.5g}; written to {s['out']}"
    )
    _print(args, s, line)
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
    add_feedback_arguments(parser, "--data is labelled by them (1 inside confirmed alarms)")
    parser.add_argument("--json", action="store_true")
    _add_stream_arguments(parser)
    parser.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from training.scoring import EvaluateSettings, evaluate_file

    with labelled_data_source(args) as data:
        settings = EvaluateSettings(
            model_source(args), data, args.point_rule, _stream_settings(args)
        )
        result = evaluate_file(settings)
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
    parser.add_argument("--target-fpr", type=finite_float, default=0.01)
    parser.add_argument("--mad-k", type=finite_float, default=3.0)
    parser.add_argument("--pot-initial-quantile", type=finite_float, default=0.95)
    parser.add_argument(
        "--holdout",
        type=finite_float,
        default=0.3,
        help="last share of the data kept to measure the FPR (default: %(default)s)",
    )
    parser.add_argument("--experiment", type=non_empty, default="aewatch")
    add_feedback_arguments(parser, "they move the threshold")
    parser.add_argument(
        "--allow-below-calibration",
        action="store_true",
        help="let the verdicts put the threshold below the one calibrated for --target-fpr",
    )
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_run_recalibrate)


def _run_recalibrate(args: argparse.Namespace) -> int:
    from training.recalibrate import RecalibrateSettings, recalibrate

    calibration = CalibrationSettings(
        method=args.method,
        target_fpr=args.target_fpr,
        mad_k=args.mad_k,
        pot_initial_quantile=args.pot_initial_quantile,
    )
    feedback = feedback_source(args)
    settings = RecalibrateSettings(
        model_source(args),
        data_source(args),
        calibration,
        args.holdout,
        args.experiment,
        feedback=feedback,
        allow_below_calibration=args.allow_below_calibration,
    )
    s = recalibrate(settings)
    fpr = s["fpr_estimate"]
    line = (
        f"{s['name']} v{s['version']} (from v{s['from_version']}): threshold "
        f"{s['threshold']:.5g} by {s['method']}; held-out FPR {fpr['rate']:.4f} "
        f"(95% CI {fpr['ci_low']:.4f}-{fpr['ci_high']:.4f}); alias @challenger"
    )
    if "feedback" in s:
        line += f"\n  feedback: {s['feedback']['note']}"
    _print(args, s, line)
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
    parser.add_argument("--fill", default="error", choices=FILL_POLICIES)
    add_feedback_arguments(parser, "--data is labelled by them (1 inside confirmed alarms)")
    parser.add_argument(
        "--tolerance",
        type=finite_float,
        default=0.01,
        help="allowed AUROC loss against the champion (default: %(default)s)",
    )
    parser.add_argument(
        "--max-fpr",
        type=finite_float,
        default=0.01,
        help="FPR target when the version records none (default: %(default)s)",
    )
    parser.add_argument(
        "--no-pca-gate",
        action="store_true",
        help="promote a challenger even if its PCA baseline ranked its test split better",
    )
    parser.add_argument("--dry-run", action="store_true", help="compare only; change nothing")
    parser.add_argument(
        "--allow-high-fpr",
        action="store_true",
        help="promote even if the false-positive rate is far above its target (recorded as a "
        "tag on the version)",
    )
    parser.add_argument("--rollback", action="store_true", help="restore the previous champion")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_run_promote)


def _run_promote(args: argparse.Namespace) -> int:
    from training.promote import PromoteSettings, promote, rollback

    tracking_uri = tracking_uri_from(args)
    if args.rollback:
        current, previous = rollback(args.name, tracking_uri=tracking_uri, dry_run=args.dry_run)
        line = f"{args.name}: @champion moved back from v{current} to v{previous}"
        if args.dry_run:
            line = f"{args.name}: @champion would move back from v{current} to v{previous}"
            line += " (dry run: nothing changed)"
        _print(args, {"from": current, "to": previous, "dry_run": args.dry_run}, line)
        return 0
    with labelled_data_source(args) as data:
        settings = PromoteSettings(
            args.name,
            tracking_uri,
            data,
            tolerance=args.tolerance,
            max_fpr=args.max_fpr,
            pca_gate=not args.no_pca_gate,
            dry_run=args.dry_run,
            allow_high_fpr=args.allow_high_fpr,
        )
        report, promoted = promote(settings)
    if args.json:
        summary = {**report.to_dict(), "promoted": promoted, "dry_run": args.dry_run}
        print(json.dumps(summary, default=str))
    else:
        print(report.table())
        if args.dry_run:
            print("dry run: nothing changed")
        else:
            print(f"@champion -> v{report.challenger}" if promoted else "not promoted")
    return 0 if report.passed else 1

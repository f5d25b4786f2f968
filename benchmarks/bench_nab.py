"""NAB (Numenta Anomaly Benchmark v1.1, standard profile) through the worker's own stages.

Per series, read once in order, NAB's protocol:
  1. the probation rows P (15 %, at most 750; `benchmarks.nab_scorer`) train a model: a standard
     scaler on them, windows of 16 (stride 1) that end inside them (the last 20 % in time order
     for early stopping); with calendar inputs (default) the `--calendar auto` rule of training
     (time of day from 2 days of rows, day of week from 14) picks the phase columns;
  2. every reading goes, as a JSON record, through the worker's series intake (decoder, calendar
     columns from the timestamp, `StreamWindower`), its windows through `Detector.score`, and the
     scores through the worker's `AdaptiveStage` (surprise against the key's own history, scale =
     the median training score) with the worker's defaults; row t gets what the window ending at
     t got;
  3. NAB's scorer: one threshold for the whole corpus, chosen by the benchmark as NAB's optimiser
     does (best corpus score):
       off       today's decision: severity s / q99(training scores), every distinct value swept;
       on+rule   the adaptive stage's detection rule (`DetectionRule`, worker defaults but its
                 threshold), the threshold swept over a grid on the surprise (0.5 ... 20);
       on+rule@5 the same at the worker's default threshold 5 (one for every series; the stage's
                 defaults, 5 among them, were tuned on these series: see below).
Models: PCA, undercomplete and denoising autoencoders (dense 64-32, code 4), medians over seeds
(PCA is deterministic). The scorer's checks run first: null 0, perfect 100, NAB's windowed
Gaussian (28.16 on the 24 series given). Targets (from the issue): >= 70 with the adaptive stages,
the autoencoders above PCA.

The stage's defaults were chosen on two disjoint halves of these same series (each half's choice
scored on the other: 64.8 and 67.1, the held-out figures; a development procedure that this
benchmark does not run), so the figures reported here are in-sample for those defaults; see the
README.

    python -m benchmarks.bench_nab --out results [--nab ../shared/datasets/nab] [--seeds 0 1 2]

`--nab` takes a folder holding `combined_windows.json` beside the category folders, or NAB's own
repository (`labels/combined_windows.json` and `data/`), or its `data/` folder; the table has a
column per category with a labelled window, and "all" over every series (a series without a
window only adds false positives).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import torch

from benchmarks.common import md_table, write_results
from benchmarks.nab_scorer import (
    DEFAULT_ROOT,
    NabFile,
    category_table,
    corpus_sweep,
    load_corpus,
    null_scores,
    perfect_scores,
    score_detections,
    windowed_gaussian_scores,
)

WINDOW = 16
MODELS = {  # fixed before any run: code W/4, the product's hidden layers and corruption
    "pca": dict(kind="pca", hidden=(), code_size=4),
    "undercomplete": dict(kind="undercomplete", hidden=(64, 32), code_size=4),
    "denoising": dict(kind="denoising", hidden=(64, 32), code_size=4),
}
THRESHOLDS = np.round(np.r_[np.arange(0.5, 10.0, 0.25), np.arange(10.0, 20.5, 0.5)], 4)
DEFAULT_S = 5.0
TARGET = 70.0
PARTITION = ("nab", 0)


@dataclass
class _Record:
    offset: int
    key: bytes
    value: bytes
    topic: str = "nab"
    partition: int = 0
    headers: tuple = ()
    timestamp: int = 0


def _epoch_ms(f: NabFile) -> np.ndarray:
    """The rows' times, epoch ms; a time that does not increase (14 rows of 4 files repeat or go
    back) is moved 1 ms after the previous row's: the worker takes a key's readings in time order
    and refuses the others."""
    ts = f.timestamps.astype("datetime64[ms]").astype(np.int64)
    return np.maximum.accumulate(ts - np.arange(len(ts))) + np.arange(len(ts))


def train_detector(f: NabFile, kind: str, seed: int, calendar: bool):
    """A detector of the series' probation rows, built from the product's pieces."""
    from pipeline.detector import (
        Detector,
        InputSpec,
        ModelConfig,
        Scaler,
        Threshold,
        WindowSpec,
        build_model,
        cut_windows,
    )
    from pipeline.detector.calendar import auto_calendar, calendar_columns, calendar_names
    from training.fit import FitConfig, fit
    from training.objectives import make_objective

    ts = _epoch_ms(f)
    p = max(WINDOW + 10, f.probation)
    kinds = auto_calendar(int(ts[p - 1] - ts[0])) if calendar else ()
    values = np.hstack([f.values[:, None], calendar_columns(ts, kinds)])
    features = ("value", *calendar_names(kinds))
    spec = WindowSpec(WINDOW, 1)
    scaler = Scaler.fit("standard", values[:p].astype(np.float32))
    train = cut_windows([("k", ts[:p], values[:p], None)], spec).windows
    cfg = ModelConfig(input_shape=(WINDOW, len(features)), **MODELS[kind])
    torch.manual_seed(seed)
    model = build_model(cfg)
    detector = Detector(InputSpec("series", features, spec, calendar=kinds), scaler, cfg, model)
    x = torch.from_numpy(detector.prepare(train))
    if kind == "pca":
        model.fit(x)
    else:
        n_val = max(1, int(0.2 * len(x)))
        settings = FitConfig(
            epochs=200,
            min_steps=0,
            schedule="constant",
            patience_steps=0,
            batch_size=32,
            lr=1e-3,
            patience=10,
            seed=seed,
            amp=False,
        )
        fit(model, cfg, make_objective(cfg), x[:-n_val], x[-n_val:], settings)
    model.eval()
    train_scores = np.sort(detector.score(train, attribution=False).scores)
    detector.threshold = Threshold(
        value=float(np.quantile(train_scores, 0.99)),
        method="quantile",
        n=len(train_scores),
        calibration_scores=tuple(train_scores.tolist()),
    )
    return detector


def stream_series(
    f: NabFile, detector, chunk: int = 2048, stage_settings: dict | None = None
) -> dict[str, np.ndarray]:
    """Raw score, surprise and detection per row, through the worker's intake, scorer and
    adaptive stage (worker defaults, or these `AdaptiveStageSettings` fields)."""
    from pipeline.detector.adaptive_stage import (
        AdaptiveStage,
        range_features,
        score_reference,
        window_extremes,
    )
    from pipeline.modalities import modality_of
    from pipeline.modalities.windowing import ReadyWindows
    from pipeline.worker.settings import AdaptiveStageSettings

    adaptive = AdaptiveStageSettings(**(stage_settings or {}))
    refs = [score_reference(detector.threshold)]
    stage = AdaptiveStage(adaptive.stage(), adaptive.rule(), refs, "nab", range_features(detector))
    intake = modality_of(detector.input).intake(1 << 20)
    ts = _epoch_ms(f)
    records = [
        _Record(i, b"k", orjson.dumps({"key": "k", "ts": t, "values": {"value": v}}))
        for i, (t, v) in enumerate(zip(ts.tolist(), f.values.tolist(), strict=True))
    ]
    rows = {name: np.zeros(len(f)) for name in ("raw", "surprise", "detection", "beyond")}
    for start in range(0, len(records), chunk):
        pending = ReadyWindows()
        intake.take(PARTITION, records[start : start + chunk], pending, _refuse)
        if not len(pending):
            continue
        windows = np.concatenate(pending.windows)
        scores = detector.score(windows, attribution=False).scores
        end_ts = np.concatenate(pending.end_ts)
        bounds = np.cumsum([0, *pending.counts])
        groups = [
            (key, part, slice(int(a), int(b)))
            for key, part, a, b in zip(
                pending.keys, pending.partitions, bounds[:-1], bounds[1:], strict=True
            )
        ]
        extremes = window_extremes(windows) if stage.range is not None else None
        out = stage.update(groups, end_ts, scores, extremes)
        at = np.searchsorted(ts, end_ts)
        rows["raw"][at], rows["surprise"][at] = scores, out.surprise
        rows["detection"][at], rows["beyond"][at] = out.detection, out.beyond
    first = WINDOW - 1  # rows before the first window (in probation) take its values
    for values in rows.values():
        values[:first] = values[first]
    return rows


def _refuse(record, rejection) -> None:
    raise SystemExit(f"NAB row {record.offset} refused by the intake: {rejection}")


def rule_grid(surprise: np.ndarray) -> np.ndarray:
    """The worker's detection rule at every threshold of the grid at once: bool [rows, G]."""
    from pipeline.detector.adaptive import DetectionRule, RuleSettings

    rule = DetectionRule(RuleSettings(), capacity=len(THRESHOLDS))
    rule.threshold[:] = THRESHOLDS
    slots = np.arange(len(THRESHOLDS))
    out = np.zeros((len(surprise), len(THRESHOLDS)), bool)
    for t, s in enumerate(surprise.tolist()):
        out[t] = rule.step(slots, np.full(len(THRESHOLDS), s))
    return out


def evaluate(
    files: list[NabFile], kind: str, seed: int, calendar: bool, stage: dict | None = None
) -> dict:
    from pipeline.detector.adaptive import lifted

    raws, grids, fixed = {}, {}, {}
    for f in files:
        detector = train_detector(f, kind, seed, calendar)
        rows = stream_series(f, detector, stage_settings=stage)
        severity = rows["raw"] / max(detector.threshold.value, 1e-12)
        raws[f.name] = np.nan_to_num(severity / (1.0 + severity), nan=1.0)
        # a window beyond its key's range counts as a surprise of at least any threshold
        grids[f.name] = rule_grid(lifted(rows["surprise"], rows["beyond"] > 0))
        fixed[f.name] = rows["detection"].astype(bool)
        at_default = int(np.flatnonzero(THRESHOLDS == DEFAULT_S)[0])
        if not (grids[f.name][:, at_default] == fixed[f.name]).all():
            raise SystemExit(f"{f.name}: the stage's detections differ from its rule's at 5")
    off, _, _ = corpus_sweep(files, raws)
    best, best_g = None, None
    for g in range(len(THRESHOLDS)):
        result = score_detections(
            files, {n: d[:, g] for n, d in grids.items()}, threshold=THRESHOLDS[g]
        )
        if best is None or result.raw > best.raw:
            best, best_g = result, g
    at5 = score_detections(files, fixed, threshold=DEFAULT_S)
    return {
        "off": _summary(files, off),
        "on+rule": _summary(files, best) | {"threshold": float(THRESHOLDS[best_g])},
        "on+rule@5": _summary(files, at5),
    }


def categories(files: list[NabFile]) -> list[str]:
    """The corpus's categories with a scored window, in name order (a category without one,
    such as artificialNoAnomaly, only adds false positives, which "all" counts)."""
    return sorted({f.category for f in files if f.scored_windows})


def _summary(files, result) -> dict:
    cats = category_table(files, result)
    out = {cat: _clean(cats[cat]["score"]) for cat in (*categories(files), "all")}
    return out | {
        "windows_found": int(result.tp),
        "false_positives": int(result.fp),
        "threshold": float(result.threshold),
    }


def _clean(x: float) -> float | None:
    return None if x != x else round(float(x), 2)


def scorer_checks(files: list[NabFile]) -> dict:
    out = {}
    for name, fn in (
        ("null", null_scores),
        ("perfect", perfect_scores),
        ("windowed_gaussian", windowed_gaussian_scores),
    ):
        result, _, _ = corpus_sweep(files, {f.name: fn(f) for f in files})
        out[name] = round(float(result.normalised), 2)
    return out


def _median(runs: list[dict], mode: str, column: str):
    values = [r[mode][column] for r in runs if r[mode][column] is not None]
    return round(statistics.median(values), 2) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--nab",
        type=Path,
        default=DEFAULT_ROOT,
        help="NAB corpus: a folder with combined_windows.json, or NAB's repository",
    )
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--kinds", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--calendar", choices=("auto", "off"), default="auto")
    for name in ("freeze", "range"):
        parser.add_argument(
            f"--adaptive-{name}",
            type=float,
            default=None,
            help=f"the stage's --adaptive-{name} (default: the worker's)",
        )
    args = parser.parse_args(argv)
    stage = {
        f"adaptive_{name}": getattr(args, f"adaptive_{name}")
        for name in ("freeze", "range")
        if getattr(args, f"adaptive_{name}") is not None
    }
    try:
        files = load_corpus(args.nab)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"bench_nab: {exc}; pass --nab DIR") from None
    torch.set_num_threads(1)
    checks = scorer_checks(files)
    ok_checks = checks["null"] == 0.0 and checks["perfect"] == 100.0
    results: dict[str, dict] = {}
    started = time.perf_counter()
    for kind in args.kinds:
        seeds = [0] if kind == "pca" else args.seeds
        runs = [evaluate(files, kind, seed, args.calendar == "auto", stage) for seed in seeds]
        results[kind] = {
            "seeds": seeds,
            "runs": runs,
            "median": {
                mode: {c: _median(runs, mode, c) for c in runs[0][mode]} for mode in runs[0]
            },
        }
        print(kind, results[kind]["median"], f"{time.perf_counter() - started:.0f}s", flush=True)
    best = {k: results[k]["median"]["on+rule"]["all"] for k in results}
    ae_best = max((v for k, v in best.items() if k != "pca"), default=None)
    targets = {
        "scorer_checks": bool(ok_checks),
        "nab_70_with_adaptive_stages": bool(ae_best is not None and ae_best >= TARGET),
        "autoencoder_above_pca": bool(
            "pca" in best and ae_best is not None and ae_best > best["pca"]
        ),
    }
    rows = []
    for kind, r in results.items():
        for mode, m in r["median"].items():
            rows.append(
                [kind, mode, *(m[c] for c in (*categories(files), "all")), m["windows_found"]]
                + [m["false_positives"]]
            )
    headers = ["detector", "mode", *categories(files), f"all {len(files)}", "windows found", "FP"]
    markdown = "\n".join(
        [
            f"# NAB standard profile, {len(files)} series, "
            f"{sum(len(f.scored_windows) for f in files)} windows (medians over seeds "
            f"{args.seeds}; PCA one run; calendar {args.calendar})",
            "",
            f"Scorer checks: null {checks['null']}, perfect {checks['perfect']}, windowed "
            f"Gaussian {checks['windowed_gaussian']}.",
            "",
            md_table(headers, rows),
            "",
            f"Targets: >= {TARGET:g} with the adaptive stages: "
            f"{'met' if targets['nab_70_with_adaptive_stages'] else 'NOT met'} (best "
            f"autoencoder {ae_best}); autoencoder above PCA: "
            f"{'yes' if targets['autoencoder_above_pca'] else 'no'}.",
        ]
    )
    payload = {
        "corpus": str(args.nab),
        "seeds": args.seeds,
        "calendar": args.calendar,
        "stage_settings": stage,
        "thresholds_on_surprise": THRESHOLDS.tolist(),
        "scorer_checks": checks,
        "results": results,
        "targets": targets,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_results(args.out, "nab", payload, markdown)
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""False drift events on stationary streams, and the statistic on shifted ones.

A detector is trained on the normal history of a simulated fleet (the worker tests' generator);
its next readings, with no injected anomaly, are the stationary streams (`--seeds` successive
stretches of the fleet's future, `--readings` per machine each), and the same readings with every sensor moved by 0.5, 1 and 1.5 of its
standard deviation after the first third are the shifted ones. Each stream is scored by the
detector and fed, in batches of 16 windows per key as the worker would, to the worker's drift
stage (`pipeline.worker.drift.DriftStage`, `drift_window` 500). Reported: drift events per hour of
stream (per key-hour for the per-key statistic) at the default pooled limit 0.25 and at per-key
limits 0.25, 1, 2 and 3, and the highest PSI seen. Target: no pooled event on the stationary
streams at the default limit, and every shifted stream raises the pooled event.

    python -m benchmarks.bench_drift --out results
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import machine, md_table, write_results
from pipeline.detector.windows import sliding_windows
from pipeline.tools.simulate import simulate_fleet
from pipeline.worker.drift import DriftStage

KEYS, FEATURES, HISTORY, WINDOW = 4, 4, 6000, 500
KEY_LIMITS = (0.25, 1.0, 2.0, 3.0)
SHIFTS = (0.5, 1.0, 1.5)


def _detector(root: Path):
    from pipeline.detector import ModelConfig
    from training.fit import FitConfig
    from training.job import CalibrationSettings, TrainSettings, train

    clean = simulate_fleet(keys=KEYS, readings_per_key=HISTORY, features=FEATURES, anomalies=())
    frame = pd.DataFrame(clean.values, columns=list(clean.features))
    frame.insert(0, "key", clean.keys)
    frame.insert(0, "ts", pd.to_datetime(clean.ts_ms, unit="ms"))
    frame.to_csv(root / "clean.csv", index=False)
    settings = TrainSettings(
        data=str(root / "clean.csv"), time_col="ts", key_col="key", window=16, stride=4,
        out=str(root / "detector"), fractions=(0.6, 0.1, 0.25, 0.05),
        model=ModelConfig(hidden=(64,), code_size=8),
        fit=FitConfig(
            epochs=15,
            min_steps=0,
            schedule="constant",
            patience_steps=0,
            batch_size=64,
            patience=3,
        ),
        calibration=CalibrationSettings(method="quantile", target_fpr=0.002), device="cpu",
    )  # fmt: skip
    return train(settings).detector


def _scores(detector, seed: int, readings: int, shift: float) -> dict[str, np.ndarray]:
    stream = simulate_fleet(
        keys=KEYS, readings_per_key=readings, features=FEATURES, anomalies=(),
        skip=HISTORY + (seed - 1) * readings, warmup=100,
    )  # fmt: skip
    out = {}
    for key in sorted(set(stream.keys.tolist())):
        _, values, _ = stream.key_series(key)
        values = values.astype(np.float32).copy()
        third = len(values) // 3
        values[third:] += shift * values[:third].std(axis=0)
        out[key] = detector.score(sliding_windows(values, detector.input.window)).scores
    return out


def _run(detector, scores: dict[str, np.ndarray], key_limit: float) -> dict:
    stage = DriftStage(detector.threshold.calibration_scores, WINDOW, 0.25, key_limit)
    bins = {k: stage.bins(v) for k, v in scores.items()}
    pooled_events = key_events = 0
    max_key = max_pooled = 0.0
    for i in range(0, min(len(b) for b in bins.values()), 16):
        for key, b in bins.items():
            value, crossing = stage.update(key, ("bench", 0), b[i : i + 16], 0)
            max_key = max(max_key, value or 0.0)
            key_events += crossing is not None
        if stage.pooled.sum() >= WINDOW:
            value, crossing = stage._judge("*", stage, stage.pooled, 0)
            max_pooled = max(max_pooled, value)
            pooled_events += crossing is not None
    return dict(pooled=pooled_events, keys=key_events, max_pooled=max_pooled, max_key=max_key)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="results")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--readings", type=int, default=15000, help="per key and stream")
    args = parser.parse_args()
    detector = _detector(Path(tempfile.mkdtemp(prefix="aewatch-bench-drift-")))
    stride_s = detector.input.window.stride  # one reading a second
    rows, stationary, shifted = [], [], []
    for seed in range(1, args.seeds + 1):
        for shift in (0.0, *SHIFTS):
            scores = _scores(detector, seed, args.readings, shift)
            hours = min(len(s) for s in scores.values()) * stride_s / 3600
            for key_limit in KEY_LIMITS:
                r = _run(detector, scores, key_limit)
                row = dict(seed=seed, shift=shift, key_limit=key_limit, hours=hours, **r)
                rows.append(row)
                (stationary if shift == 0 else shifted).append(row)
    hours = sum(r["hours"] for r in stationary if r["key_limit"] == KEY_LIMITS[0])
    pooled_rate = sum(r["pooled"] for r in stationary if r["key_limit"] == KEY_LIMITS[0]) / hours
    per_key = {
        str(limit): sum(r["keys"] for r in stationary if r["key_limit"] == limit) / (hours * KEYS)
        for limit in KEY_LIMITS
    }
    caught = all(r["pooled"] >= 1 for r in shifted)
    payload = {
        "machine": machine(),
        "drift_window": WINDOW,
        "stationary_hours": hours,
        "pooled_false_events_per_hour": pooled_rate,
        "per_key_false_events_per_key_hour": per_key,
        "every_shift_raises_the_pooled_event": caught,
        "target_met": pooled_rate == 0 and caught,
        "rows": rows,
    }
    table = md_table(
        ["seed", "shift (sd)", "per-key limit", "hours", "pooled events", "per-key events",
         "max pooled PSI", "max key PSI"],
        [[r["seed"], r["shift"], r["key_limit"], round(r["hours"], 2), r["pooled"], r["keys"],
          round(r["max_pooled"], 3), round(r["max_key"], 3)] for r in rows],
    )  # fmt: skip
    markdown = (
        f"# Drift events\n\nStationary streams: {hours:.1f} h of a {KEYS}-machine fleet; pooled "
        f"drift events per hour at the default limit 0.25: {pooled_rate:.3f}; per-key events per "
        f"key-hour by limit: {per_key}. Every shifted stream raises the pooled event: {caught}."
        f"\n\n{table}\n"
    )
    write_results(Path(args.out), "drift", payload, markdown)
    print(markdown)
    return 0 if payload["target_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

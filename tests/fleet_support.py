"""A small synthetic fleet for per-key baseline tests: machines at their own levels, with
injected level-shift episodes, and detectors trained on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.tools.synthetic import normal_series

FEATURES = 4
START_MS = 1_767_225_600_000


def machine(k: int, n: int, *, level: float, seed: int = 0, skip: int = 0) -> np.ndarray:
    """Readings [n, F] of machine k with every sensor moved by `level` of its own spread,
    after `skip` readings of its history."""
    values = normal_series(skip + n, FEATURES, seed=1000 * seed + k).astype(np.float64)
    sd = values.std(axis=0)
    return (values[skip:] + level * sd).astype(np.float32)


def with_episodes(values: np.ndarray, starts, length: int, size: float = 4.0, feature: int = 0):
    """A level shift of `size` of the sensor's spread over `length` readings at each start;
    returns (values, labels)."""
    out = values.copy()
    labels = np.zeros(len(values), np.int64)
    sd = values[:, feature].std()
    for start in starts:
        out[start : start + length, feature] += size * sd
        labels[start : start + length] = 1
    return out, labels


def fleet_frame(series: dict[str, np.ndarray], start_ms: int = START_MS, labels=None):
    """One table (ts, machine, s0..): the keys' readings one second apart, each from start."""
    frames = []
    for key, values in series.items():
        frame = pd.DataFrame(values, columns=[f"s{i}" for i in range(values.shape[1])])
        frame.insert(0, "machine", key)
        frame.insert(0, "ts", pd.to_datetime(start_ms + 1000 * np.arange(len(values)), unit="ms"))
        if labels is not None:
            frame["label"] = labels[key]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def train_on(frame: pd.DataFrame, root: Path, name: str, *, keyed: bool, window: int = 16, **kw):
    from pipeline.detector import ModelConfig
    from training.fit import FitConfig
    from training.job import CalibrationSettings, TrainSettings, train

    path = root / f"{name}.csv"
    frame.to_csv(path, index=False)
    settings = TrainSettings(
        data=str(path),
        out=str(root / name),
        time_col="ts",
        key_col="machine" if "machine" in frame.columns else None,
        key_baselines=keyed,
        window=window,
        stride=kw.pop("stride", 1),
        model=ModelConfig(hidden=(32,), code_size=4),
        fit=FitConfig(
            epochs=kw.pop("epochs", 6), min_steps=0, schedule="constant", batch_size=64, patience=0
        ),
        calibration=CalibrationSettings(method="quantile", target_fpr=0.01),
        device="cpu",
        **kw,
    )
    return train(settings)


def records_of(series: dict[str, np.ndarray], topic: str, partitions: int, start_ms=START_MS):
    """Reading records per partition, keys interleaved one reading at a time."""
    import orjson

    from tests.worker_support import Record

    out: dict = {(topic, p): [] for p in range(partitions)}
    names = sorted(series)
    longest = max(len(v) for v in series.values())
    for t in range(longest):
        for i, key in enumerate(names):
            values = series[key]
            if t >= len(values):
                continue
            p = i % partitions
            payload = {
                "key": key,
                "ts": start_ms + 1000 * t,
                "values": {f"s{j}": float(x) for j, x in enumerate(values[t])},
            }
            records = out[(topic, p)]
            records.append(Record(topic, p, len(records), key.encode(), orjson.dumps(payload)))
    return out

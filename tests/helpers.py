"""Seeded synthetic data shared by the tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.synthetic import Injection, inject, normal_series


def series_frame(
    n_keys: int = 3, n: int = 2000, n_features: int = 6, *, seed: int = 0, start="2026-01-01"
) -> pd.DataFrame:
    frames = []
    for k in range(n_keys):
        values = normal_series(n, n_features, seed=seed * 100 + k)
        frame = pd.DataFrame(values, columns=[f"s{i}" for i in range(n_features)])
        frame.insert(0, "machine", f"m{k}")
        frame.insert(0, "ts", pd.date_range(start, periods=n, freq="s"))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def write_series_csv(path: Path, **kwargs) -> Path:
    series_frame(**kwargs).to_csv(path, index=False)
    return path


def anomalous_windows(
    values: np.ndarray, kind: str, window: int, count: int, *, seed: int = 0
) -> np.ndarray:
    """`count` windows of `values` each holding one injected anomaly of `kind` throughout."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        start = int(rng.integers(0, len(values) - window))
        feature = int(rng.integers(values.shape[1]))
        broken = inject(values, Injection(kind, start, window, feature), rng=rng)
        out.append(broken[start : start + window])
    return np.stack(out)


def labelled_series_csv(path: Path, *, n_keys: int = 2, n: int = 3000, seed: int = 0) -> Path:
    """Series with a labelled level shift on one sensor of key m1 near the end."""
    frame = series_frame(n_keys=n_keys, n=n, seed=seed)
    frame["label"] = 0
    rows = frame.index[(frame["machine"] == "m1")][n - 300 : n - 240]
    frame.loc[rows, "s2"] += 4 * frame["s2"].std()
    frame.loc[rows, "label"] = 1
    frame.to_csv(path, index=False)
    return path


def train_series_detector(data: Path, out: Path, **model):
    """A small detector trained and calibrated on `data` (columns ts, machine, s*, label)."""
    from pipeline.detector import ModelConfig
    from training.fit import FitConfig
    from training.job import CalibrationSettings, TrainSettings, train

    settings = TrainSettings(
        data=str(data),
        time_col="ts",
        key_col="machine",
        label_col="label",
        window=8,
        stride=2,
        out=str(out),
        model=ModelConfig(**{"hidden": (32,), "code_size": 8, **model}),
        fit=FitConfig(epochs=8, batch_size=64, patience=0),
        calibration=CalibrationSettings(method="quantile", target_fpr=0.01),
        device="cpu",
    )
    return train(settings)


def register_result(tracking_uri: str, result, name: str) -> str:
    from training.register import register_version
    from training.tracking import tracking_run

    with tracking_run(tracking_uri, "tests", None, {"kind": result.detector.config.kind}):
        return register_version(result.detector, result.artifact_dir, name, data=result.data)


def metric_values(text: str) -> dict:
    """Prometheus text exposition as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def wait_until(condition, timeout_s: float, what: str, poll_s: float = 0.05) -> float:
    """Seconds until `condition()` holds; fails the test after `timeout_s`."""
    import time

    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what} did not happen in {timeout_s}s"
        time.sleep(poll_s)
    return time.monotonic() - started


class HostilePickle:
    """Pickled, it runs a shell command when loaded: what a hostile weights file would do."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_parquet_series(
    root: Path,
    *,
    n_keys: int = 3,
    n: int = 2000,
    n_features: int = 6,
    days: int = 4,
    row_group_size: int = 16_384,
    label_every: int = 0,
    seed: int = 0,
) -> Path:
    """A hive-partitioned Parquet series dataset, `root/date=YYYY-MM-DD/mK.parquet`: each key's
    `n` readings (one a second, sines plus noise) spread over `days` partitions, so every key's
    series crosses file boundaries. With `label_every`, every such reading is labelled 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, n, days + 1).astype(int)
    phase = np.arange(n)[:, None] * (2 * np.pi / np.linspace(50, 400, n_features))
    for k in range(n_keys):
        values = np.sin(phase + k) + 0.1 * rng.standard_normal((n, n_features))
        times = pd.date_range("2026-01-01", periods=n, freq="s").to_numpy()
        for day, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            columns = {"ts": times[lo:hi], "machine": np.full(hi - lo, f"m{k}")}
            columns.update({f"s{i}": values[lo:hi, i] for i in range(n_features)})
            if label_every:
                columns["label"] = (np.arange(lo, hi) % label_every == label_every - 1).astype(int)
            folder = root / f"date=2026-01-{day + 1:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(
                pa.table(columns), folder / f"m{k}.parquet", row_group_size=row_group_size
            )
    return root

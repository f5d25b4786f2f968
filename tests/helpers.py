"""Seeded synthetic data shared by the tests."""

from __future__ import annotations

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

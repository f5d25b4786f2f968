"""Seeded synthetic multi-sensor series with injected anomalies of named kinds.

Normal behaviour: a few shared latent drivers (daily-like seasonality, a slower cycle, a random
walk) mixed into every sensor with sensor-specific weights, so sensors are correlated, plus
independent noise. Anomalies break either a sensor's own values or its relation to the others.
Used by tests, benchmarks, `aewatch simulate` and the demo.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["ANOMALY_KINDS", "Injection", "inject", "normal_series", "write_parquet_series"]

ANOMALY_KINDS = ("spike", "level_shift", "drift", "stuck", "noise_burst", "frequency_change")


def normal_series(
    n: int, n_features: int, *, seed: int = 0, period: int = 50, noise: float = 0.05
) -> np.ndarray:
    """[n, n_features] float32 readings of one machine in normal operation.

    The machine (phases, mixing weights, offsets) is fixed by `seed`, and the random draws are
    consumed one time step at a time, so `normal_series(n + m, ...)[:n]` equals
    `normal_series(n, ...)`: a longer series is the same machine's future.
    """
    from scipy.signal import lfilter

    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    mixing = rng.normal(size=(3, n_features))
    mixing[0] = np.abs(mixing[0]) + 0.5  # every sensor follows the main cycle
    offsets = rng.uniform(-2, 2, size=n_features)
    draws = rng.normal(size=(n, 1 + n_features))
    t = np.arange(n, dtype=np.float64)
    # a slow mean-reverting wander (AR(1)), shared by all sensors
    wander = lfilter([0.02], [1.0, -0.995], draws[:, 0])
    drivers = np.stack(
        [
            np.sin(2 * np.pi * t / period + phase[0]),
            0.5 * np.sin(2 * np.pi * t / (period * 3.7) + phase[1]),
            wander,
        ],
        axis=1,
    )
    values = drivers @ mixing + offsets + noise * draws[:, 1:]
    return values.astype(np.float32)


@dataclass(frozen=True)
class Injection:
    kind: str
    start: int
    length: int
    feature: int


def inject(
    values: np.ndarray, injection: Injection, *, rng: np.random.Generator, magnitude: float = 1.0
) -> np.ndarray:
    """A copy of `values` with one anomaly of `injection.kind` on one feature."""
    out = values.copy()
    s, e, f = injection.start, injection.start + injection.length, injection.feature
    column = out[:, f]
    scale = float(values[:, f].std()) or 1.0
    m = magnitude * scale
    if injection.kind == "spike":
        column[s:e] += 6.0 * m * rng.choice([-1.0, 1.0])
    elif injection.kind == "level_shift":
        column[s:e] += 3.0 * m
    elif injection.kind == "drift":
        column[s:e] += np.linspace(0, 5.0 * m, e - s)
    elif injection.kind == "stuck":
        column[s:e] = column[s]
    elif injection.kind == "noise_burst":
        column[s:e] += rng.normal(0, 2.0 * m, size=e - s)
    elif injection.kind == "frequency_change":
        local = values[s:e, f] - values[s:e, f].mean()
        # three times the frequency; the swing grows with the magnitude (1.5x at the default)
        column[s:e] = values[s:e, f].mean() + np.resize(local[::3], e - s) * (1 + magnitude / 3)
    else:
        raise ValueError(f"unknown anomaly kind {injection.kind!r}; choose from {ANOMALY_KINDS}")
    return out


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
    import pandas as pd
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

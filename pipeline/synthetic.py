"""Seeded synthetic multi-sensor series with injected anomalies of named kinds.

Normal behaviour: a few shared latent drivers (daily-like seasonality, a slower cycle, a random
walk) mixed into every sensor with sensor-specific weights, so sensors are correlated, plus
independent noise. Anomalies break either a sensor's own values or its relation to the others.
Used by tests, benchmarks, `aewatch simulate` and the demo.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ANOMALY_KINDS", "Injection", "inject", "normal_series"]

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

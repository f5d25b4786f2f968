"""Per-key baselines at training time: the statistics `pipeline.detector.baselines` describes.

rho is measured on every series trained in memory (keys not seen in training use it when they
warm up in a stream). With `key_baselines` each key's train-part readings give its own statistics
by the scaler's rule (standard), and the model is trained on each key standardised by them (see
`SeriesSplits.scaling`). The detector keeps a scaler for keys it has no statistics of: with one
key it is that key's own, so the detector scores exactly as one trained without per-key
baselines; with several, the center of all train readings and the pooled within-key spread.
"""

from __future__ import annotations

import numpy as np

from pipeline.detector import Scaler
from pipeline.detector.baselines import KeyStats, fit_key_stats
from pipeline.errors import ConfigError

__all__ = ["key_baselines"]


def key_baselines(settings, kind: str, train, scaler: Scaler) -> tuple[Scaler, KeyStats | None]:
    """(the detector's scaler, its KeyStats) from the train part `train` (a SeriesTable)."""
    per_key = bool(getattr(settings, "key_baselines", False))
    if per_key and not settings.key_col:
        raise ConfigError("key_baselines", "per-key baselines need --key-col")
    if per_key and kind != "standard":
        raise ConfigError(
            "key_baselines", f"per-key baselines need the standard scaler, not {kind}"
        )
    rows = {
        key: frame[list(train.features)].to_numpy(dtype=np.float32)
        for key, frame in train.groups()
        if len(frame)
    }
    if not rows:
        return scaler, None

    def own(values: np.ndarray):
        fitted = Scaler.fit(kind, values)
        return fitted.center, fitted.scale

    stats = fit_key_stats(rows, settings.window, per_key=per_key, scale_of=own)
    if per_key and len(rows) > 1:
        counts = np.array([len(v) for v in rows.values()], np.float64)
        variances = np.array([np.asarray(s, np.float64) ** 2 for _, s, _ in stats.keys.values()])
        pooled = np.sqrt((variances * counts[:, None]).sum(axis=0) / counts.sum())
        scaler = Scaler(kind, scaler.center, tuple(map(float, pooled)))
    return scaler, stats

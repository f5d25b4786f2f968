"""Per-key baselines stored with a detector: each training key's own scaler statistics, and rho.

A fleet's machines each have their own normal level. With per-key baselines a key k is scored on

    z = (x - mean_k) / scale_k                                           (1)

instead of the detector's one scaler `(x - c) / s`. This module holds what training learns for
that (`KeyStats`, in the manifest under `baselines`); `pipeline.detector.key_baselines` keeps the
per-key state of a stream (keys not seen in training learn theirs in a warm-up).

- Keys seen in training (`aewatch train --key-col K --key-baselines`): mean_k and scale_k are the
  standard scaler's statistics of that key's train-split rows, and the model was trained on each
  key standardised by its own statistics. With one key they are the detector's scaler itself, so
  such a detector scores bit for bit as one trained without them.
- rho, per feature and per span N (readings): the pooled standard deviation of the training rows
  within spans of N consecutive readings of a key, divided by that key's overall standard
  deviation (pooled over keys), at most 1. A warm-up of N readings sees only short-span spread;
  dividing it by rho gives the long-run spread the model's scaler was fitted on (the `ratio` rule
  of `key_baselines`). Stored for spans of `RHO_SPANS` windows; a warm-up uses the nearest.

The `baselines` part of the manifest carries the SHA-256 of its own canonical JSON: a load
refuses statistics that were edited or damaged, as it refuses weights that differ from their hash.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import ArtifactError

__all__ = ["RHO_SPANS", "KeyStats", "fit_key_stats", "short_span_ratio", "window_scaling"]

# Spans (in windows of the detector) at which rho is stored; the worker's default warm-up is 10.
RHO_SPANS = (2, 5, 10, 20, 50, 100)
_TINY = 1e-12


def short_span_ratio(series: Iterable[np.ndarray], span: int) -> np.ndarray:
    """rho per feature at `span` readings over `series` (one [T, F] array per key, time order;
    each is standardised by its own mean and sd first, so keys weigh by their readings only).
    1 where a feature never varies or no series is as long as one span."""
    within = overall = 0.0
    n_within = n_overall = 0
    width = None
    for values in series:
        values = np.asarray(values, np.float64)
        width = values.shape[1]
        if len(values) < 2:
            continue
        sd = values.std(axis=0)
        z = (values - values.mean(axis=0)) / np.where(sd > _TINY, sd, 1.0)
        overall = overall + z.var(axis=0) * len(z)
        n_overall += len(z)
        usable = (len(z) // span) * span
        if usable:
            parts = z[:usable].reshape(-1, span, z.shape[1])
            within = within + parts.var(axis=1).sum(axis=0) * span
            n_within += usable
    if width is None:
        raise ValueError("short_span_ratio: no series")
    if not n_within:
        return np.ones(width)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.sqrt((within / n_within) / (overall / n_overall))
    return np.where(np.isfinite(rho) & (rho > 0), np.minimum(rho, 1.0), 1.0)


@dataclass(frozen=True)
class KeyStats:
    """rho by span (readings) and, per training key, its (mean, scale, readings)."""

    rho: dict[int, tuple[float, ...]] = field(default_factory=dict)
    keys: dict[str, tuple[tuple[float, ...], tuple[float, ...], int]] = field(default_factory=dict)

    def rho_for(self, span: int, n_features: int) -> np.ndarray:
        """rho at the stored span nearest to `span` (in ratio); ones when none is stored."""
        if not self.rho:
            return np.ones(n_features)
        nearest = min(self.rho, key=lambda s: abs(math.log(s / max(span, 1))))
        return np.asarray(self.rho[nearest], np.float64)

    def _content(self) -> dict:
        return {
            "rho": {str(s): list(v) for s, v in sorted(self.rho.items())},
            "keys": {
                k: {"mean": list(m), "scale": list(s), "n": int(n)}
                for k, (m, s, n) in sorted(self.keys.items())
            },
        }

    def to_dict(self) -> dict:
        content = self._content()
        return {**content, "sha256": _digest(content)}

    @classmethod
    def from_dict(cls, data: dict, n_features: int) -> KeyStats:
        """Checked: the digest, and finite statistics of the detector's width (scales > 0)."""
        try:
            content = {"rho": data["rho"], "keys": data["keys"]}
            if data.get("sha256") != _digest(content):
                raise ArtifactError(
                    "baselines: the statistics do not match their recorded SHA-256; refusing "
                    "edited or damaged per-key baselines",
                    reason="sha256",
                )
            rho = {int(s): _vector(v, n_features, positive=True) for s, v in content["rho"].items()}
            keys = {
                str(k): (
                    _vector(e["mean"], n_features),
                    _vector(e["scale"], n_features, positive=True),
                    int(e["n"]),
                )
                for k, e in content["keys"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"baselines: invalid per-key statistics ({exc})") from exc
        return cls(rho, keys)


def _digest(content: dict) -> str:
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _vector(values, n_features: int, *, positive: bool = False) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if len(out) != n_features or not all(math.isfinite(v) for v in out):
        raise ValueError(f"need {n_features} finite values, got {list(values)[:4]}...")
    if positive and not all(v > 0 for v in out):
        raise ValueError("scales and rho must be > 0")
    return out


def fit_key_stats(
    rows: dict[str, np.ndarray], window: int, *, per_key: bool, scale_of=None
) -> KeyStats:
    """From each key's train-split rows [T, F] (time order): rho at `RHO_SPANS` windows and,
    with `per_key`, each key's statistics by `scale_of(rows) -> (center, scale)` (the scaler's
    own rule, so that one key gives exactly the detector's scaler)."""
    series = list(rows.values())
    rho = {}
    for multiple in RHO_SPANS:
        span = multiple * window
        rho[span] = tuple(float(r) for r in short_span_ratio(series, span))
    keys = {}
    if per_key:
        for key, values in rows.items():
            center, scale = scale_of(values)
            keys[key] = (tuple(map(float, center)), tuple(map(float, scale)), len(values))
    return KeyStats(rho, keys)


def window_scaling(
    stats: KeyStats | None, center, scale, keys
) -> tuple[np.ndarray, np.ndarray] | None:
    """Per window of `keys`: the (center, scale) [N, F] float32 its key was trained with, the
    scaler's `center` and `scale` for keys not seen in training; None when no key has its own."""
    if stats is None or not stats.keys:
        return None
    keys = np.asarray(keys, dtype=object).astype(str)
    known = [k for k in np.unique(keys) if k in stats.keys]
    if not known:
        return None
    centers = np.tile(np.asarray(center, np.float32), (len(keys), 1))
    scales = np.tile(np.asarray(scale, np.float32), (len(keys), 1))
    for key in known:
        rows = keys == key
        mean, sd, _ = stats.keys[key]
        centers[rows], scales[rows] = mean, sd
    return centers, scales

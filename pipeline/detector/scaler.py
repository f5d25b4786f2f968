"""Feature scaling fitted on the training split only, stored in the detector manifest.

`transform(x) = (x - center) / scale` along the feature axis. A feature whose spread is zero in the
training data keeps scale 1, so it neither divides by zero nor amplifies later noise. Scaled values
are held within +-`SCALED_LIMIT`: a reading within float32's range (3e38) but thousands of
billions of spreads from normal would overflow the model's arithmetic into a score that is not a
number; held there, its window's score is far above any threshold and finite (measured: a value
at the limit gives a mean error near 2e22, float32 holds 3e38).

`ScalerFit` is the one fitting rule, an accumulator: `update(samples)` as often as needed, then
`compute()`. Fitted in one `update`, it gives exactly what the in-memory `Scaler.fit` always gave;
fed in chunks (data larger than memory), `standard` merges chunk statistics (Chan et al.) and
`minmax` keeps running extremes, in constant memory. `robust` needs every sample for its
percentiles, so it keeps them: `STREAMING_KINDS` names the kinds that fit in constant memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError, DataError

__all__ = ["SCALED_LIMIT", "SCALER_KINDS", "STREAMING_KINDS", "Scaler", "ScalerFit"]

SCALER_KINDS = ("standard", "minmax", "robust", "none")
STREAMING_KINDS = ("standard", "minmax", "none")
"""The kinds `ScalerFit` fits in constant memory, whatever the number of samples."""
_TINY = 1e-12
SCALED_LIMIT = 1e12


@dataclass(frozen=True)
class Scaler:
    kind: str
    center: tuple[float, ...]
    scale: tuple[float, ...]

    @classmethod
    def fit(cls, kind: str, samples: np.ndarray) -> Scaler:
        """Fit on `samples` [M, F]: one row per reading (series) or per pixel (images)."""
        return ScalerFit(kind).update(samples).compute()

    @property
    def n_features(self) -> int:
        return len(self.center)

    def transform(self, x: np.ndarray, axis: int = -1) -> np.ndarray:
        """Scale `x` along `axis` (the feature or channel axis); returns float32."""
        shape = [1] * x.ndim
        shape[axis] = self.n_features
        center = np.asarray(self.center, dtype=np.float32).reshape(shape)
        scale = np.asarray(self.scale, dtype=np.float32).reshape(shape)
        out = np.subtract(x, center, dtype=np.float32)  # one array the size of x, scaled in place
        np.divide(out, scale, out=out)
        return np.clip(out, -SCALED_LIMIT, SCALED_LIMIT, out=out)

    def inverse_transform(self, x: np.ndarray, axis: int = -1) -> np.ndarray:
        shape = [1] * x.ndim
        shape[axis] = self.n_features
        center = np.asarray(self.center, dtype=np.float32).reshape(shape)
        scale = np.asarray(self.scale, dtype=np.float32).reshape(shape)
        return (np.asarray(x, dtype=np.float32) * scale + center).astype(np.float32, copy=False)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "center": list(self.center), "scale": list(self.scale)}

    @classmethod
    def from_dict(cls, data: dict) -> Scaler:
        if data.get("kind") not in SCALER_KINDS:
            raise ConfigError("scaler.kind", f"unknown kind {data.get('kind')!r}")
        center, scale = tuple(map(float, data["center"])), tuple(map(float, data["scale"]))
        if len(center) != len(scale):
            raise ConfigError("scaler", "center and scale differ in length")
        if not all(map(math.isfinite, center)) or not all(
            math.isfinite(s) and s > 0 for s in scale
        ):  # (a fitted scale is positive, 1 for a constant feature; 0 scores every window inf)
            raise ConfigError("scaler", "centers must be finite and scales finite and positive")
        return cls(data["kind"], center, scale)


class ScalerFit:
    """Accumulates scaler statistics over chunks of samples [M, F]; `compute()` gives the Scaler.

    `standard` keeps the count, mean and variance per feature and merges each chunk's own with
    the pairwise rule of Chan, Golub and LeVeque, so one chunk gives numpy's mean and std exactly
    and many chunks agree with them to rounding. `minmax` keeps running extremes; `none` only
    counts; `robust` keeps the samples (its percentiles need them all).
    """

    def __init__(self, kind: str) -> None:
        if kind not in SCALER_KINDS:
            raise ConfigError("scaler", f"unknown kind {kind!r}; choose one of {SCALER_KINDS}")
        self.kind = kind
        self.count = 0
        self._first: np.ndarray | None = None  # mean (standard) or minimum (minmax)
        self._second: np.ndarray | None = None  # variance (standard) or maximum (minmax)
        self._kept: list[np.ndarray] = []

    def update(self, samples: np.ndarray) -> ScalerFit:
        """Add a chunk of samples [M, F]; an empty chunk is ignored. Returns self."""
        samples = np.asarray(samples, dtype=np.float64)
        if samples.ndim != 2:
            raise DataError(f"scaler: need a [rows, features] array, got {samples.shape}")
        if len(samples) == 0:
            return self
        if not np.isfinite(samples).all():
            row, column = np.argwhere(~np.isfinite(samples))[0]
            raise DataError(
                f"scaler: training data holds NaN or infinite values (feature {column}, sample "
                f"{row + self.count} of the fit: {samples[row, column]!r})"
            )
        if self.count and samples.shape[1] != len(self._first):
            raise DataError(
                f"scaler: chunk has {samples.shape[1]} features, earlier ones {len(self._first)}"
            )
        if self.kind == "standard":
            self._merge_moments(len(samples), samples.mean(axis=0), samples.var(axis=0))
        elif self.kind == "minmax":
            low, high = samples.min(axis=0), samples.max(axis=0)
            if self.count:
                low, high = np.minimum(self._first, low), np.maximum(self._second, high)
            self._first, self._second = low, high
        else:
            if self.kind == "robust":
                self._kept.append(samples)
            self._first = np.zeros(samples.shape[1])
        self.count += len(samples)
        return self

    def _merge_moments(self, n: int, mean: np.ndarray, var: np.ndarray) -> None:
        if not self.count:
            self._first, self._second = mean, var
            return
        total = self.count + n
        delta = mean - self._first
        m2 = self._second * self.count + var * n + delta**2 * (self.count * n / total)
        self._first = self._first + delta * (n / total)
        self._second = m2 / total

    def compute(self) -> Scaler:
        if not self.count:
            raise DataError("scaler: need a non-empty [rows, features] array, got no samples")
        n_features = len(self._first)
        if self.kind == "standard":
            center, scale = self._first, np.sqrt(self._second)
        elif self.kind == "minmax":
            center, scale = self._first, self._second - self._first
        elif self.kind == "robust":
            samples = np.concatenate(self._kept) if len(self._kept) > 1 else self._kept[0]
            q25, q50, q75 = np.percentile(samples, [25, 50, 75], axis=0)
            center, scale = q50, q75 - q25
        else:
            center, scale = np.zeros(n_features), np.ones(n_features)
        scale = np.where(scale > _TINY, scale, 1.0)
        return Scaler(self.kind, tuple(map(float, center)), tuple(map(float, scale)))

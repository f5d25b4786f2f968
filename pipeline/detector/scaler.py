"""Feature scaling fitted on the training split only, stored in the detector manifest.

`transform(x) = (x - center) / scale` along the feature axis. A feature whose spread is zero in the
training data keeps scale 1, so it neither divides by zero nor amplifies later noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError, DataError

__all__ = ["SCALER_KINDS", "Scaler"]

SCALER_KINDS = ("standard", "minmax", "robust", "none")
_TINY = 1e-12


@dataclass(frozen=True)
class Scaler:
    kind: str
    center: tuple[float, ...]
    scale: tuple[float, ...]

    @classmethod
    def fit(cls, kind: str, samples: np.ndarray) -> Scaler:
        """Fit on `samples` [M, F]: one row per reading (series) or per pixel (images)."""
        if kind not in SCALER_KINDS:
            raise ConfigError("scaler", f"unknown kind {kind!r}; choose one of {SCALER_KINDS}")
        samples = np.asarray(samples, dtype=np.float64)
        if samples.ndim != 2 or len(samples) == 0:
            raise DataError(f"scaler: need a non-empty [rows, features] array, got {samples.shape}")
        if not np.isfinite(samples).all():
            raise DataError("scaler: training data holds NaN or infinite values")
        n_features = samples.shape[1]
        if kind == "standard":
            center, scale = samples.mean(axis=0), samples.std(axis=0)
        elif kind == "minmax":
            low, high = samples.min(axis=0), samples.max(axis=0)
            center, scale = low, high - low
        elif kind == "robust":
            q25, q50, q75 = np.percentile(samples, [25, 50, 75], axis=0)
            center, scale = q50, q75 - q25
        else:
            center, scale = np.zeros(n_features), np.ones(n_features)
        scale = np.where(scale > _TINY, scale, 1.0)
        return cls(kind, tuple(map(float, center)), tuple(map(float, scale)))

    @property
    def n_features(self) -> int:
        return len(self.center)

    def transform(self, x: np.ndarray, axis: int = -1) -> np.ndarray:
        """Scale `x` along `axis` (the feature or channel axis); returns float32."""
        shape = [1] * x.ndim
        shape[axis] = self.n_features
        center = np.asarray(self.center, dtype=np.float32).reshape(shape)
        scale = np.asarray(self.scale, dtype=np.float32).reshape(shape)
        return ((np.asarray(x, dtype=np.float32) - center) / scale).astype(np.float32, copy=False)

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
        return cls(data["kind"], center, scale)

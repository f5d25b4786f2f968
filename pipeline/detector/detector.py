"""A detector: what the model expects as input, its scaler, the model, and its threshold.

The training job builds one and saves it as an artifact; batch scoring and the streaming worker
load it and call `score`, so a window scores the same whichever path it takes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pipeline.detector.baselines import KeyStats, window_scaling
from pipeline.detector.calendar import CALENDAR_KINDS, calendar_names
from pipeline.detector.cores import device_problem
from pipeline.detector.models import ModelConfig
from pipeline.detector.scaler import Scaler
from pipeline.detector.scoring import (
    TERMS,
    Scores,
    ScoreStats,
    term_statistics,
    window_errors,
)
from pipeline.detector.threshold import Threshold, anomalous
from pipeline.detector.traced import ScoringPass
from pipeline.detector.windows import SlidingWindows, WindowSpec
from pipeline.errors import ConfigError, DataError, ModelError

__all__ = ["Detector", "InputSpec", "resolve_device"]

INPUT_KINDS = ("series", "image")


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA where there is none is a setting error."""
    problem = device_problem(name)
    if problem:
        raise ConfigError("device", problem)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was asked for but no CUDA device is available")
    return torch.device(name)


@dataclass(frozen=True)
class InputSpec:
    """Series: feature names in model order and the window. Images: shape (C, H, W)."""

    kind: str
    features: tuple[str, ...] = ()
    window: WindowSpec | None = None
    image_shape: tuple[int, int, int] | None = None
    calendar: tuple[str, ...] = ()  # calendar inputs: the last features, made from timestamps

    def __post_init__(self) -> None:
        if self.kind not in INPUT_KINDS:
            raise ConfigError("input.kind", f"unknown {self.kind!r}; use one of {INPUT_KINDS}")
        if self.calendar:
            names = calendar_names(self.calendar)
            if (
                any(k not in CALENDAR_KINDS for k in self.calendar)
                or self.features[len(self.features) - len(names) :] != names
                or len(self.features) <= len(names)
            ):
                raise ConfigError("input.calendar", f"{self.calendar} do not end the features")
        if self.kind == "series" and (self.window is None or not self.features):
            raise ConfigError("input", "a series detector needs features and a window")
        if self.kind == "image" and (self.image_shape is None or len(self.image_shape) != 3):
            raise ConfigError("input", "an image detector needs an image shape (C, H, W)")

    @property
    def data_features(self) -> tuple[str, ...]:
        """The features readings carry (all but the calendar inputs)."""
        return self.features[: len(self.features) - 2 * len(self.calendar)]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        if self.kind == "series":
            return (self.window.length, len(self.features))
        return tuple(self.image_shape)

    @property
    def feature_axis(self) -> int:
        """Axis of a batch that the scaler works along: features (last) or channels (1)."""
        return -1 if self.kind == "series" else 1

    @property
    def n_scaled(self) -> int:
        """How many scaler statistics the input needs: one per feature or per channel."""
        return len(self.features) if self.kind == "series" else self.image_shape[0]

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "features": list(self.features),
            "window": self.window.to_dict() if self.window else None,
            "image_shape": list(self.image_shape) if self.image_shape else None,
            **({"calendar": list(self.calendar)} if self.calendar else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> InputSpec:
        window = data.get("window")
        shape = data.get("image_shape")
        return cls(
            kind=data["kind"],
            features=tuple(data.get("features") or ()),
            window=WindowSpec.from_dict(window) if window else None,
            image_shape=tuple(shape) if shape else None,
            calendar=tuple(data.get("calendar") or ()),
        )


def _host(t: torch.Tensor) -> np.ndarray:
    return (t.float() if t.is_floating_point() else t).cpu().numpy()


def _joined(arrays: list[np.ndarray], dtype) -> np.ndarray:
    """The batches' arrays as one array of `dtype`, copied only where it must be: numpy hands
    the interpreter lock back around a large copy, and on the worker's scoring thread each
    hand-back waits for the loop's thread."""
    joined = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    return joined.astype(dtype, copy=False)


def _inputs(raw) -> np.ndarray | SlidingWindows:
    """Windows or images to score batch by batch: windows cut on demand stay so (each batch is
    copied out as it is scored); anything else as one float32 array."""
    return raw if isinstance(raw, SlidingWindows) else np.asarray(raw, dtype=np.float32)


@dataclass
class Detector:
    input: InputSpec
    scaler: Scaler
    config: ModelConfig
    model: nn.Module
    threshold: Threshold = field(default_factory=Threshold.uncalibrated)
    info: dict = field(default_factory=dict)
    baselines: KeyStats | None = None  # per-key statistics (`pipeline.detector.baselines`)
    score_stats: ScoreStats | None = None  # the `terms` score; None: the raw mean error
    _scaling_cache: tuple | None = field(default=None, init=False, repr=False, compare=False)
    _pass: ScoringPass | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.model.eval()
        stats = self.score_stats
        if stats is not None and (
            self.input.kind != "series" or stats.n_features != len(self.input.features)
        ):
            raise ModelError("the terms score needs a series detector with one column per feature")

    @property
    def score_mode(self) -> str:
        """`terms` when the detector scores with per-feature terms, else `raw`."""
        return "raw" if self.score_stats is None else "terms"

    @property
    def device(self) -> torch.device:
        # the first parameter or buffer (some baselines hold buffers only); asked once per batch,
        # so without building a state dict
        return next(itertools.chain(self.model.parameters(), self.model.buffers())).device

    def to(self, device: str | torch.device) -> Detector:
        self.model.to(resolve_device(device) if isinstance(device, str) else device)
        self._pass = None  # a graph traced on the old device
        return self

    def prepare(self, raw: np.ndarray) -> np.ndarray:
        """Check the shape of raw windows [N, W, F] or images [N, C, H, W] and scale them."""
        raw = np.asarray(raw, dtype=np.float32)
        if raw.shape[1:] != self.input.sample_shape:
            raise DataError(
                f"expected inputs of shape {self.input.sample_shape}, got {raw.shape[1:]}"
            )
        return self.scaler.transform(raw, axis=self.input.feature_axis)

    def _scaling(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaler statistics as tensors on `device`, shaped to broadcast along the feature axis."""
        key = (self.scaler, device)
        if self._scaling_cache is None or self._scaling_cache[0] != key:
            shape = [1] * (len(self.input.sample_shape) + 1)
            shape[self.input.feature_axis] = self.scaler.n_features
            tensors = tuple(
                torch.tensor(values, dtype=torch.float32, device=device).reshape(shape)
                for values in (self.scaler.center, self.scaler.scale)
            )
            self._scaling_cache = (key, tensors)
        return self._scaling_cache[1]

    def key_scaling(self, keys) -> tuple[np.ndarray, np.ndarray] | None:
        """Per window of `keys`: the (center, scale) [N, F] its key was trained with (the
        detector's scaler for keys not seen in training); None when no key has its own."""
        return window_scaling(self.baselines, self.scaler.center, self.scaler.scale, keys)

    def _batches(self, raw: np.ndarray, batch_size: int, scaling=None):
        """Scaled batches of raw windows or images on the model's device: the same float32
        arithmetic as `Scaler.transform`, without a scaled copy of the whole input on the host.
        `scaling`, per-window (center, scale) [N, F] of series windows, replaces the scaler."""
        for batch, center, scale in self._raw_batches(raw, batch_size, scaling):
            yield (batch - center) / scale

    def _raw_batches(self, raw: np.ndarray, batch_size: int, scaling=None):
        """Batches of raw inputs on the model's device, each with the (center, scale) that
        scale it (see `_batches`)."""
        if raw.shape[1:] != self.input.sample_shape:
            raise DataError(
                f"expected inputs of shape {self.input.sample_shape}, got {raw.shape[1:]}"
            )
        device = self.device
        center, scale = self._scaling(device)
        if scaling is not None:
            rows = tuple(np.ascontiguousarray(a, dtype=np.float32) for a in scaling)
            if self.input.kind != "series" or any(
                a.shape != (len(raw), raw.shape[2]) for a in rows
            ):
                raise DataError("per-window scaling needs [N, F] centers and scales of windows")
        for start in range(0, len(raw), batch_size):
            part = np.ascontiguousarray(raw[start : start + batch_size], dtype=np.float32)
            batch = torch.from_numpy(part).to(device)
            if scaling is not None:
                center, scale = (
                    torch.from_numpy(a[start : start + batch_size]).to(device)[:, None, :]
                    for a in rows
                )
            yield batch, center, scale

    def score(
        self,
        raw: np.ndarray,
        *,
        batch_size: int = 8192,
        attribution: bool = True,
        scaling: tuple[np.ndarray, np.ndarray] | None = None,
        extremes: int = 0,
    ) -> Scores:
        """Score raw (unscaled) windows or images in batches of `batch_size`, with the score
        the detector was trained with (`score_mode`).

        Scaling happens on the model's device, batch by batch. `scaling`, per-window (center,
        scale) [N, F] of series windows, replaces the detector's scaler (per-key baselines);
        with the scaler's own values it gives the same scores bit for bit. `extremes`: the pass
        also takes each series window's minimum and maximum of its first `extremes` features
        (`Scores.extremes`, the values of `window_extremes`)."""
        if extremes and self.input.kind != "series":
            raise DataError("window extremes are taken of series windows only")
        raw = _inputs(raw)
        parts: list[tuple] = []
        if self._pass is None:
            self._pass = ScoringPass(self.model, self.config, self.score_stats)
        with torch.inference_mode():
            for batch, center, scale in self._raw_batches(raw, batch_size, scaling):
                out = self._pass(batch, center, scale, attribution, extremes)
                parts.append(tuple(None if t is None else _host(t) for t in out))
        found = {}
        if extremes:
            none = np.zeros((0, min(extremes, raw.shape[2])), np.float32)
            found["extremes"] = tuple(
                _joined([p[i] for p in parts] or [none], np.float32) for i in (4, 5)
            )
        if not parts:
            return Scores(np.zeros(0), None, None, None, **found)
        scores = _joined([p[0] for p in parts], np.float64)
        if not attribution:
            return Scores(scores, **found)
        first = _joined([p[1] for p in parts], np.float32)
        if self.input.kind == "image":
            return Scores(scores, pixel_map=first, **found)
        step = _joined([p[2] for p in parts], np.float32)
        if self.score_stats is None:
            return Scores(scores, per_feature=first, per_step=step, **found)
        terms = _joined([p[3] for p in parts], np.int64)
        return Scores(scores, first, step, None, terms, self.score_stats.terms, **found)

    def term_statistics(
        self,
        raw: np.ndarray,
        terms: tuple[str, ...] = TERMS,
        *,
        batch_size: int = 8192,
        scaling: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """The `terms` score's statistics (before the log) of raw windows: [N, T, F] float64,
        what `fit_score_stats` fits the normalisation on (`scaling` as in `score`)."""
        raw = _inputs(raw)
        parts = []
        with torch.inference_mode():
            for x in self._batches(raw, batch_size, scaling):
                errors = window_errors(self.model, self.config, x)
                parts.append(term_statistics(x, errors, terms).cpu().numpy())
        if not parts:
            return np.zeros((0, len(terms), len(self.input.features)))
        return np.concatenate(parts).astype(np.float64)

    def is_anomaly(self, scores: np.ndarray) -> np.ndarray:
        """The decision (`anomalous`) against the calibrated threshold."""
        return anomalous(scores, self.threshold.require())

    def top_features(self, per_feature: np.ndarray, k: int = 3) -> list[list[str]]:
        """Names of the `k` features with the largest error (with the terms score: the largest
        contribution), per window."""
        names = np.asarray(self.input.features, dtype=object)
        k = min(k, len(names))
        order = np.argsort(-per_feature, axis=1, kind="stable")[:, :k]
        return names[order].tolist()

    def top_terms(self, scored: Scores, k: int = 3) -> list[list[str]]:
        """With the terms score: per window, the deciding term of each of `top_features`."""
        names = np.asarray(scored.term_names, dtype=object)
        k = min(k, scored.per_feature.shape[1])
        order = np.argsort(-scored.per_feature, axis=1, kind="stable")[:, :k]
        return names[np.take_along_axis(scored.terms, order, axis=1)].tolist()

    def encode(self, raw: np.ndarray, *, batch_size: int = 8192, scaling=None) -> np.ndarray:
        """Bottleneck codes [N, code_size] (a VAE gives its latent mean): a compact, non-linear
        reduction of each window or image. `scaling` as in `score` (keys' own baselines)."""
        raw = _inputs(raw)
        batches = self._batches(raw, batch_size, scaling)
        return self._apply(self.model.encode, batches, raw.shape[1:])

    def reconstruct(self, raw: np.ndarray, *, batch_size: int = 8192, scaling=None) -> np.ndarray:
        """The model's reconstruction of raw windows or images, in the input's units (with
        `scaling`, as in `score`, each window's own).

        For a denoising model this is the cleaned-up input; a VAE decodes its latent mean."""
        raw = _inputs(raw)
        batches = self._batches(raw, batch_size, scaling)
        scaled = self._apply(self.model.reconstruct, batches, raw.shape[1:])
        if scaling is None:
            return self.scaler.inverse_transform(scaled, axis=self.input.feature_axis)
        center, scale = (np.asarray(a, np.float32)[:, None, :] for a in scaling)
        return (np.asarray(scaled, np.float32) * scale + center).astype(np.float32, copy=False)

    def decode(self, codes: np.ndarray, *, batch_size: int = 8192) -> np.ndarray:
        """Windows or images, in the input's units, that the decoder makes of `codes`
        [N, code_size]: the way back from `encode`."""
        codes = np.ascontiguousarray(codes, dtype=np.float32)
        if codes.ndim != 2 or codes.shape[1] != self.config.code_size:
            raise DataError(
                f"expected codes of shape [N, {self.config.code_size}], got {codes.shape}"
            )
        batches = (
            torch.from_numpy(codes[start : start + batch_size]).to(self.device)
            for start in range(0, len(codes), batch_size)
        )
        scaled = self._apply(self.model.decode, batches, codes.shape[1:])
        return self.scaler.inverse_transform(scaled, axis=self.input.feature_axis)

    def _apply(
        self, step: Callable[[torch.Tensor], torch.Tensor], batches, sample_shape: tuple
    ) -> np.ndarray:
        """`step` (a tensor function of the model) over `batches` (tensors on the model's
        device, of samples shaped `sample_shape`), gathered as float32 on the host."""
        with torch.inference_mode():
            parts = [step(x).float().cpu().numpy() for x in batches]
            if parts:
                return _joined(parts, np.float32)
            # an empty batch still tells the output shape
            probe = torch.zeros((1, *sample_shape), device=self.device)
            return np.zeros((0, *step(probe).shape[1:]), dtype=np.float32)

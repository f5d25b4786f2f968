"""The anomaly score of a window or image, and where in the input it comes from.

Two scores, chosen when a detector is trained and stored with it:

- `raw`: the mean element-wise reconstruction error under the model's loss (squared error for
  `mse`, absolute for `l1`, cross-entropy for `bce`). A VAE configured with `vae_score="elbo"`
  adds beta * KL / n_inputs, the negative ELBO per input element. Images always score this way.
- `terms` (series): per feature f of a window x [W, F] (scaled) four statistics, in log units,

  | term      | statistic v_f                                   | sided                      |
  |-----------|-------------------------------------------------|----------------------------|
  | error     | log(mean_t e_tf + eps)  (e: the element errors) | above normal only          |
  | variance  | log(std_t x_tf + eps)                           | both (frozen or louder)    |
  | roughness | log(mean_t abs(x_tf - x_(t-1)f) + eps)          | both (stuck, or faster)    |
  | centroid  | log(energy-weighted mean DFT bin, mean removed)  | both (frequency up / down) |

  each put on the scale of its own normal tail (`ScoreStats`, fitted on normal windows the model
  did not train on): u = (v - median) / (q_hi - median) above the median and, two-sided,
  (median - v) / (median - q_lo) below it, so u = 1 is "as far out as the most extreme 1 % of
  normal windows" for every term and feature. A feature's contribution is the sum of its terms'
  u, the window's score the largest contribution over features (`max`; `mean` and `rms` are the
  other aggregations). `per_feature` carries the contributions and `terms` which term weighed
  most, so an event names the feature and why. A sensor stuck inside its normal range, or one
  oscillating at another frequency, moves the variance, roughness and centroid terms where the
  mean error barely moves.

Every statistic is a function of one window: a window scores the same in any batch, and on any
number of threads (the spectrum is a product with a fixed basis, not the CPU FFT).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.detector.models import ModelConfig, kl_divergence
from pipeline.errors import ModelError

__all__ = [
    "AGGREGATIONS",
    "SCORE_MODES",
    "TERMS",
    "ScoreStats",
    "Scores",
    "element_errors",
    "fit_score_stats",
    "score_parts",
    "score_tensor",
    "term_statistics",
    "terms_score",
    "window_errors",
]

SCORE_MODES = ("raw", "terms")
TERMS = ("error", "variance", "roughness", "centroid")
TWO_SIDED = frozenset({"variance", "roughness", "centroid"})
AGGREGATIONS = ("max", "mean", "rms")
_EPS = 1e-6
_OUTSIDE = -math.log(_EPS)
_TINY = 1e-12
# A shape term of a feature that never moved within a training window (all its values 0) has no
# normal spread to measure a change by: the smallest jitter would read as many spreads. Its
# spreads are set this wide, which leaves the term out for that feature (the error term still
# watches it: a feature that starts to move is reconstructed worse).
STILL_SPREAD = 1e9
_STILL = 1e-9


def element_errors(recon: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-element reconstruction error, same shape as the input."""
    if loss == "mse":
        return (recon - target).square()
    if loss == "l1":
        return (recon - target).abs()
    # BCE is defined for targets in [0, 1]. A value a scaler pushed outside (beyond the training
    # range) adds the largest cross-entropy (-log eps) per unit of distance outside, so a spike
    # always scores above the in-range values; inside [0, 1] nothing changes.
    inside = target.clamp(0.0, 1.0)
    bce = F.binary_cross_entropy(recon.clamp(_EPS, 1 - _EPS), inside, reduction="none")
    return bce + (target - inside).abs() * _OUTSIDE


@dataclass(frozen=True)
class Scores:
    """Scores for N inputs plus attribution: per feature and per time step for windows [N, W, F],
    a per-pixel error map [N, H, W] for images (channels averaged). With the `terms` score,
    `per_feature` holds each feature's contribution and `terms` [N, F] the index, in
    `term_names`, of the term that weighed most. `extremes`, when asked for, are the windows'
    minima and maxima [N, F'] of their first F' features."""

    scores: np.ndarray
    per_feature: np.ndarray | None = None
    per_step: np.ndarray | None = None
    pixel_map: np.ndarray | None = None
    terms: np.ndarray | None = None
    term_names: tuple[str, ...] = ()
    extremes: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.scores)


@dataclass(frozen=True, eq=False)
class ScoreStats:
    """What the `terms` score needs besides the model: per term (rows, in `terms` order) and
    feature (columns), the epsilon inside the log, the normal median and the upper and lower
    spreads of the tail normalisation. Plain floats in the manifest, with their SHA-256."""

    terms: tuple[str, ...]
    aggregation: str
    tail: float
    floor: float
    eps: np.ndarray
    center: np.ndarray
    upper: np.ndarray
    lower: np.ndarray

    _ARRAYS = ("eps", "center", "upper", "lower")

    def __post_init__(self) -> None:
        if (
            not self.terms
            or set(self.terms) - set(TERMS)
            or len(set(self.terms)) != len(self.terms)
        ):
            raise ModelError(f"score terms {list(self.terms)}: use distinct terms of {TERMS}")
        if self.aggregation not in AGGREGATIONS:
            raise ModelError(f"score aggregation {self.aggregation!r}: use one of {AGGREGATIONS}")
        shapes = {np.shape(getattr(self, name)) for name in self._ARRAYS}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ModelError(
                "score statistics: eps, center, upper, lower need one [terms, features] shape"
            )
        if next(iter(shapes))[0] != len(self.terms):
            raise ModelError("score statistics: one row per term is needed")
        arrays = [np.asarray(getattr(self, name), dtype=np.float64) for name in self._ARRAYS]
        if not all(np.isfinite(a).all() for a in arrays):
            raise ModelError("score statistics hold NaN or infinite values")
        if (arrays[0] <= 0).any() or (arrays[2] <= 0).any() or (arrays[3] <= 0).any():
            raise ModelError("score statistics: eps and spreads must be positive")

    @property
    def n_features(self) -> int:
        return int(np.shape(self.center)[1])

    def left_out(self) -> list[tuple[str, int]]:
        """(term, feature index) pairs left out: the feature never moved in training."""
        off = np.asarray(self.upper) >= STILL_SPREAD
        return [(self.terms[t], int(f)) for t, f in zip(*np.nonzero(off), strict=True)]

    def _content(self) -> dict:
        out: dict = {
            "terms": list(self.terms),
            "aggregation": self.aggregation,
            "tail": float(self.tail),
            "floor": float(self.floor),
        }
        for name in self._ARRAYS:
            out[name] = np.asarray(getattr(self, name), dtype=np.float64).tolist()
        return out

    def digest(self) -> str:
        canonical = json.dumps(self._content(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_dict(self) -> dict:
        return {**self._content(), "sha256": self.digest()}

    @classmethod
    def from_dict(cls, data: dict) -> ScoreStats:
        """Rebuild and verify: a digest that does not match the content is refused."""
        try:
            stats = cls(
                terms=tuple(str(t) for t in data["terms"]),
                aggregation=str(data["aggregation"]),
                tail=float(data["tail"]),
                floor=float(data["floor"]),
                **{name: np.asarray(data[name], dtype=np.float64) for name in cls._ARRAYS},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"score statistics are incomplete: {exc}") from exc
        if data.get("sha256") != stats.digest():
            raise ModelError("score statistics do not match their recorded SHA-256")
        return stats


# -- the statistics of each term, before the log: [N, F] each ----------------------------------
def _statistic(term: str, series: torch.Tensor, centred, errors: torch.Tensor) -> torch.Tensor:
    """One term's statistic of each feature's series [N, F, W] (contiguous in time; `centred`
    the same with each series' mean removed) and the element errors [N, W, F]."""
    if term == "error":
        return errors.mean(dim=1)
    if term == "variance":  # population std over time, written out (the same in any batch)
        return centred.square().mean(dim=2).sqrt()
    if term == "roughness":
        return (series[..., 1:] - series[..., :-1]).abs().mean(dim=2)
    # centroid: energy-weighted mean frequency bin of the feature, its mean removed
    cos_sin = _dft_basis(centred.shape[2], centred.device, centred.dtype)
    spectrum = centred @ cos_sin  # [N, F, 2 * (W // 2)]: the real and imaginary parts, bins 1..
    half = cos_sin.shape[1] // 2
    power = spectrum[..., :half].square() + spectrum[..., half:].square()
    bins = torch.arange(1, half + 1, device=series.device, dtype=power.dtype)
    return (power * bins).sum(dim=2) / (power.sum(dim=2) + _TINY)  # (not a matmul: batch-invariant)


@functools.lru_cache(maxsize=16)
def _dft_basis(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[W, 2K] cosines then negated sines of bins 1..K = W // 2 (what `torch.fft.rfft` gives past
    its constant bin), made in float64. A product with it is a transform whose result for a
    series does not depend on how many threads compute it (the CPU FFT's does, in the last
    bits)."""
    t = torch.arange(length, dtype=torch.float64)[:, None]
    k = torch.arange(1, length // 2 + 1, dtype=torch.float64)[None, :]
    angle = 2 * math.pi * t * k / length
    return torch.cat([torch.cos(angle), -torch.sin(angle)], dim=1).to(device, dtype)


def term_statistics(x: torch.Tensor, errors: torch.Tensor, terms=TERMS) -> torch.Tensor:
    """The statistics of `terms` (before the log) for scaled windows x [N, W, F] and their
    element errors: [N, T, F]. Computed on each feature's series laid out contiguously: the
    reductions over time then run along memory."""
    series = x.transpose(1, 2).contiguous()
    centred = None
    if "variance" in terms or "centroid" in terms:
        centred = series - series.mean(dim=2, keepdim=True)
    return torch.stack([_statistic(term, series, centred, errors) for term in terms], dim=1)


def fit_score_stats(
    model_values: np.ndarray,
    shape_values: np.ndarray,
    *,
    terms: tuple[str, ...] = TERMS,
    aggregation: str = "max",
    tail: float = 0.99,
    floor: float = 0.1,
) -> ScoreStats:
    """Fit the tail normalisation on normal windows: `model_values` [N, T, F] the statistics
    of windows the model did not train on (the error term is taken from these), `shape_values`
    [M, T, F] those of every normal window at hand (the terms that need no model). Spreads are
    floored at `floor` log units; with fewer than 1 / (1 - tail) windows the quantile is taken
    at 1 - 1 / n. A shape term whose values are all 0 for a feature (constant in every
    window) is left out for it (`STILL_SPREAD`)."""
    terms = tuple(terms)
    rows = []
    for i, term in enumerate(terms):
        values = np.asarray(model_values if term == "error" else shape_values, np.float64)[:, i]
        if len(values) == 0:
            raise ModelError(f"no normal windows to fit the {term} term on")
        eps = 1e-3 * np.median(values, axis=0) + 1e-9
        logs = np.log(values + eps)
        center = np.median(logs, axis=0)
        level = min(tail, 1.0 - 1.0 / max(len(logs), 2))
        upper = np.maximum(np.quantile(logs, level, axis=0) - center, floor)
        lower = np.maximum(center - np.quantile(logs, 1.0 - level, axis=0), floor)
        if term != "error":
            still = np.max(np.abs(values), axis=0) <= _STILL
            upper, lower = (
                np.where(still, STILL_SPREAD, upper),
                np.where(still, STILL_SPREAD, lower),
            )
        rows.append((eps, center, upper, lower))
    eps, center, upper, lower = (np.stack(column) for column in zip(*rows, strict=True))
    return ScoreStats(terms, aggregation, tail, floor, eps, center, upper, lower)


_TENSORS: dict = {}


def _stat_tensors(stats: ScoreStats, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """eps, center, upper, lower [T, F] and the two-sided mask [T, 1] on like's device."""
    key = (id(stats), like.device)
    hit = _TENSORS.get(key)
    if hit is None or hit[0] is not stats:
        two = [[1.0 if t in TWO_SIDED else 0.0] for t in stats.terms]
        arrays = [getattr(stats, name) for name in ScoreStats._ARRAYS] + [two]
        hit = (
            stats,
            *(torch.tensor(np.asarray(a), dtype=torch.float32, device=like.device) for a in arrays),
        )
        if len(_TENSORS) > 64:
            _TENSORS.clear()
        _TENSORS[key] = hit
    return hit[1:]


def terms_score(x: torch.Tensor, errors: torch.Tensor, stats: ScoreStats):
    """The terms score of scaled windows x [N, W, F] with their element errors: (scores [N],
    contributions [N, F], index of the largest term [N, F]); each window's alone."""
    eps, center, upper, lower, two_sided = _stat_tensors(stats, x)
    v = torch.log(term_statistics(x, errors, stats.terms) + eps) - center
    u = torch.maximum((v / upper).clamp_min(0), (-v / lower).clamp_min(0) * two_sided)
    contribution = u.sum(dim=1)
    if stats.aggregation == "max":
        scores = contribution.max(dim=1).values
    elif stats.aggregation == "mean":
        scores = contribution.mean(dim=1)
    else:
        scores = contribution.square().mean(dim=1).sqrt()
    # the deciding term along memory (an argmax across the middle axis is many times slower)
    return scores, contribution, u.transpose(1, 2).contiguous().argmax(dim=2)


def window_errors(model: nn.Module, config: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """Element errors of a scaled batch (a VAE reconstructs from its latent mean)."""
    return _errors(model, config, x)[0]


def _errors(model: nn.Module, config: ModelConfig, x: torch.Tensor):
    """Element errors and, for a VAE, its latent mean and log-variance."""
    if config.kind == "vae":
        mu, logvar = model.encode_distribution(x)
        return element_errors(model.decode(mu), x, config.loss), (mu, logvar)
    return element_errors(model.reconstruct(x), x, config.loss), None


def score_parts(
    model: nn.Module,
    config: ModelConfig,
    x: torch.Tensor,
    *,
    attribution: bool = True,
    stats: ScoreStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Scores [N] with (when asked) the attribution maps and the deciding term, for a scaled
    batch on any device: (scores, map_a, map_b, terms). For windows map_a is per feature
    [N, F] (the errors, or with `stats` the contributions) and map_b per step [N, W]; for
    images map_a is the per-pixel map [N, H, W] and map_b None; `terms` [N, F] only with
    `stats`."""
    errors, latent = _errors(model, config, x)
    if stats is not None:
        scores, contribution, which = terms_score(x, errors, stats)
        if not attribution:
            return scores, None, None, None
        return scores, contribution, errors.mean(dim=2), which
    scores = errors.flatten(1).mean(dim=1)
    if latent is not None and config.vae_score == "elbo":
        scores = scores + config.beta * kl_divergence(*latent) / config.n_inputs
    if not attribution:
        return scores, None, None, None
    if config.is_image:
        return scores, errors.mean(dim=1), None, None
    return scores, errors.mean(dim=1), errors.mean(dim=2), None


def score_tensor(
    model: nn.Module,
    config: ModelConfig,
    x: torch.Tensor,
    *,
    attribution: bool = True,
    stats: ScoreStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`score_parts` without the deciding term: (scores, map_a, map_b)."""
    return score_parts(model, config, x, attribution=attribution, stats=stats)[:3]

"""Which score a detector is trained with, and the statistics of the `terms` score.

`--score auto` (the default) follows a rule written down before any benchmark's test labels
were read: series detectors score with the per-feature `terms` (the reconstruction error plus
variance, roughness and spectral centroid, each on the scale of its own normal tail; see
`pipeline.detector.scoring`), because a sensor stuck inside its normal range or oscillating at
another frequency is what the mean error misses; images keep the `raw` mean error (standardising
each pixel's error made image detectors worse), and so does a VAE scored by its ELBO (the KL part
has no per-feature form). `--score raw` and `--score terms` choose explicitly.

The statistics are fitted on normal windows the model did not fit: the error term on the
validation split's normal windows (the training windows when there is no validation split, with
a warning: their errors are optimistic), the model-free terms on the training and validation
windows together.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.detector import Detector
from pipeline.detector.scoring import AGGREGATIONS, TERMS, ScoreStats, fit_score_stats
from pipeline.errors import ConfigError

__all__ = [
    "MAX_STAT_WINDOWS",
    "SCORE_CHOICES",
    "check_score",
    "fit_stats",
    "normal_term_statistics",
    "score_mode",
]

log = logging.getLogger(__name__)
SCORE_CHOICES = ("auto", "raw", "terms")
MIN_TERMS_WINDOW = 2  # the terms take statistics over a window's readings
MAX_STAT_WINDOWS = 20_000  # windows per split the statistics are fitted on (evenly spaced)


def check_score(
    choice: str, aggregation: str, *, image: bool | None, config, window: int | None = None
) -> None:
    """Refuse a score setting that cannot apply, before any data is read (`image` None: not
    known yet; `window`: a series window's length, where known)."""
    if choice not in SCORE_CHOICES:
        raise ConfigError("score", f"{choice!r} is not one of {', '.join(SCORE_CHOICES)}")
    if aggregation not in AGGREGATIONS:
        raise ConfigError(
            "score_aggregation", f"{aggregation!r} is not one of {', '.join(AGGREGATIONS)}"
        )
    if choice != "terms":
        return
    if image:
        raise ConfigError("score", "terms score series windows; images score the raw mean error")
    if config.kind == "vae" and config.vae_score == "elbo":
        raise ConfigError("score", "terms has no ELBO form; use --vae-score reconstruction")
    if not image and window is not None and window < MIN_TERMS_WINDOW:
        raise ConfigError(
            "score", "terms compare readings within a window, which --window 1 has not; use raw"
        )


def score_mode(choice: str, *, image: bool, config, window: int | None = None) -> str:
    """`raw` or `terms` for `choice` (auto: the rule above, and raw for windows of one
    reading)."""
    check_score(choice, "max", image=image, config=config, window=window)
    if choice != "auto":
        return choice
    elbo = config.kind == "vae" and config.vae_score == "elbo"
    single = not image and window is not None and window < MIN_TERMS_WINDOW
    return "raw" if image or elbo or single else "terms"


def normal_term_statistics(data, detector: Detector, split: str, limit: int) -> np.ndarray:
    """In-memory splits' `term_statistics`: the statistics [N, T, F] of the split's normal
    windows (at most `limit`, evenly spaced), each scaled as the detector scales it."""
    pick = np.flatnonzero(data.normal(split))
    if len(pick) > limit:
        pick = pick[np.linspace(0, len(pick) - 1, limit).astype(np.int64)]
    scaling = data.scaling(detector, split)
    if scaling is not None:
        scaling = tuple(a[pick] for a in scaling)
    return detector.term_statistics(data.raw(split)[pick], scaling=scaling)


def _normal_statistics(detector: Detector, data, split: str) -> np.ndarray:
    values = data.term_statistics(detector, split, MAX_STAT_WINDOWS)
    return values if len(values) else np.zeros((0, len(TERMS), len(detector.input.features)))


def fit_stats(detector: Detector, data, aggregation: str = "max") -> ScoreStats:
    """The `terms` score's statistics for a fitted detector on its prepared `Splits`."""
    train = _normal_statistics(detector, data, "train")
    validation = (
        _normal_statistics(detector, data, "validation") if data.has("validation") else train[:0]
    )
    if len(validation) == 0:
        log.warning(
            "no normal validation windows: the error term's statistics come from the training "
            "windows, whose errors the model was fitted to (optimistic)"
        )
        validation = train
    shape = np.concatenate([train, validation]) if validation is not train else train
    stats = fit_score_stats(validation, shape, terms=TERMS, aggregation=aggregation)
    still = sorted({f for _, f in stats.left_out()})
    if still:
        names = [detector.input.features[f] for f in still]
        log.warning(
            "feature(s) %s never moved within a training window: their shape terms "
            "(variance, roughness, centroid) are left out; the error term still watches them",
            ", ".join(names),
        )
    return stats

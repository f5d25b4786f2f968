"""Reconstruction error: the anomaly score, and where in the input it comes from.

The score of a window or image is the mean element-wise reconstruction error under the model's
loss (squared error for `mse`, absolute for `l1`, cross-entropy for `bce`). A VAE configured with
`vae_score="elbo"` adds beta * KL / n_inputs, the negative ELBO per input element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.detector.models import ModelConfig, kl_divergence

__all__ = ["Scores", "element_errors", "score_tensor"]

_EPS = 1e-6
_OUTSIDE = -math.log(_EPS)


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
    a per-pixel error map [N, H, W] for images (channels averaged)."""

    scores: np.ndarray
    per_feature: np.ndarray | None = None
    per_step: np.ndarray | None = None
    pixel_map: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)


def score_tensor(
    model: nn.Module, config: ModelConfig, x: torch.Tensor, *, attribution: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Scores [N] and, when asked, the two attribution maps for a scaled batch on any device.

    Returns (scores, map_a, map_b): for windows map_a is per feature [N, F] and map_b per step
    [N, W]; for images map_a is the per-pixel map [N, H, W] and map_b is None.
    """
    if config.kind == "vae":
        mu, logvar = model.encode_distribution(x)
        errors = element_errors(model.decode(mu), x, config.loss)
    else:
        errors = element_errors(model.reconstruct(x), x, config.loss)
    scores = errors.flatten(1).mean(dim=1)
    if config.kind == "vae" and config.vae_score == "elbo":
        scores = scores + config.beta * kl_divergence(mu, logvar) / config.n_inputs
    if not attribution:
        return scores, None, None
    if config.is_image:
        return scores, errors.mean(dim=1), None
    return scores, errors.mean(dim=1), errors.mean(dim=2)

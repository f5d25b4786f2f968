"""Autoencoder models, each a pure `nn.Module` built from a frozen `ModelConfig`.

Every model offers `encode(x) -> code`, `decode(code) -> x_hat` and `reconstruct(x) -> x_hat`
(deterministic in eval mode); training objectives live in `training.objectives`.
"""

from __future__ import annotations

from torch import nn

from pipeline.detector.models.autoencoder import Autoencoder
from pipeline.detector.models.config import (
    ACTIVATIONS,
    BACKBONES,
    CORRUPTIONS,
    LOSSES,
    MODEL_KINDS,
    ModelConfig,
)
from pipeline.detector.models.pca import PCAModel
from pipeline.detector.models.vae import VariationalAutoencoder, kl_divergence
from pipeline.errors import ConfigError

__all__ = [
    "ACTIVATIONS",
    "BACKBONES",
    "CORRUPTIONS",
    "LOSSES",
    "MODEL_KINDS",
    "Autoencoder",
    "ModelConfig",
    "PCAModel",
    "VariationalAutoencoder",
    "build_model",
    "kl_divergence",
]


def build_model(config: ModelConfig) -> nn.Module:
    if not config.input_shape:
        raise ConfigError("input_shape", "the model's input shape is not set")
    if config.kind == "pca":
        return PCAModel(config)
    if config.kind == "vae":
        return VariationalAutoencoder(config)
    return Autoencoder(config)

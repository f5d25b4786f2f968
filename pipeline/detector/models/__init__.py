"""Autoencoder models, each a pure `nn.Module` built from a frozen `ModelConfig`.

Every model offers `encode(x) -> code`, `decode(code) -> x_hat` and `reconstruct(x) -> x_hat`
(deterministic in eval mode); training objectives live in `training.objectives`. The config and
its choices import without torch; the modules load on first use.
"""

from __future__ import annotations

from pipeline.detector.models.config import (
    ACTIVATIONS,
    BACKBONES,
    CORRUPTIONS,
    LOSSES,
    MODEL_KINDS,
    ModelConfig,
)
from pipeline.errors import ConfigError
from pipeline.lazy import lazy_getattr

_LAZY = {
    "Autoencoder": "autoencoder",
    "PCAModel": "pca",
    "VariationalAutoencoder": "vae",
    "kl_divergence": "vae",
}

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


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


def build_model(config: ModelConfig):
    """The `nn.Module` for `config` (its input shape must be set)."""
    if not config.input_shape:
        raise ConfigError("input_shape", "the model's input shape is not set")
    if config.kind == "pca":
        from pipeline.detector.models.pca import PCAModel

        return PCAModel(config)
    if config.kind == "vae":
        from pipeline.detector.models.vae import VariationalAutoencoder

        return VariationalAutoencoder(config)
    from pipeline.detector.models.autoencoder import Autoencoder

    return Autoencoder(config)

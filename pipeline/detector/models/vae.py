"""Variational autoencoder: Gaussian latent, reparameterisation, beta-weighted KL.

In training mode the code is sampled, z = mu + sigma * eps; in eval mode it is the mean, so scores
are deterministic.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.detector.models.backbones import build_decoder, build_encoder
from pipeline.detector.models.config import ModelConfig

__all__ = ["VariationalAutoencoder", "kl_divergence"]


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per sample, summed over latent dimensions."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


class VariationalAutoencoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config, 2 * config.code_size)
        self.decoder = build_decoder(config)

    def encode_distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-20.0, 20.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The latent mean: the code used for scoring and dimensionality reduction."""
        return self.encode_distribution(x)[0]

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return self.decoder(code)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction, latent mean and log-variance."""
        mu, logvar = self.encode_distribution(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decode(z), mu, logvar

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

"""The deterministic autoencoder shared by the undercomplete, denoising, sparse and contractive
kinds. They differ only in how they are trained (see `training.objectives`), not in structure."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.detector.models.backbones import activation, build_decoder, build_encoder
from pipeline.detector.models.config import ModelConfig

__all__ = ["Autoencoder"]


class Autoencoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config, config.code_size)
        self.code_activation = activation(config.code_activation)
        self.decoder = build_decoder(config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.code_activation(self.encoder(x))

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return self.decoder(code)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and code."""
        code = self.encode(x)
        return self.decode(code), code

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

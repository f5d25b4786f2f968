"""PCA as a linear autoencoder with fixed weights: the baseline every kind is compared with.

Fitted in closed form (SVD of the centred training inputs) by the training job; held as buffers
so it saves, loads and scores through exactly the same path as the neural kinds.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.detector.models.config import ModelConfig

__all__ = ["PCAModel"]


class PCAModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        n = config.n_inputs
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("components", torch.zeros(config.code_size, n))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> PCAModel:
        flat = x.reshape(len(x), -1).to(torch.float64)
        mean = flat.mean(dim=0)
        _, _, vh = torch.linalg.svd(flat - mean, full_matrices=False)
        self.mean.copy_(mean.to(self.mean.dtype))
        self.components.copy_(vh[: self.config.code_size].to(self.components.dtype))
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) - self.mean) @ self.components.T

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return (code @ self.components + self.mean).reshape(-1, *self.config.input_shape)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.encode(x)
        return self.decode(code), code

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

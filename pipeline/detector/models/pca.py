"""PCA as a linear autoencoder with fixed weights: the baseline every kind is compared with.

Fitted in closed form by the training job: the leading eigenvectors of the training inputs'
covariance, summed chunk by chunk in float64, so the fit holds a [D, D] matrix besides its input
(up to `GRAM_MAX_INPUTS` inputs; wider ones, and fewer samples than inputs, take the SVD of the
centred inputs, which holds copies of them). Held as buffers so it saves, loads and scores through
exactly the same path as the neural kinds.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.detector.models.config import ModelConfig

__all__ = ["PCAModel"]

# Widest input fitted through its covariance ([D, D] float64: 128 MiB at 4,096 inputs).
GRAM_MAX_INPUTS = 4096
# Samples per chunk of the covariance sum.
GRAM_CHUNK = 4096


class PCAModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        n = config.n_inputs
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("components", torch.zeros(config.code_size, n))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> PCAModel:
        flat = x.reshape(len(x), -1)
        n, d = flat.shape
        k = self.config.code_size
        if d > GRAM_MAX_INPUTS or n <= d:
            centred = flat.to(torch.float64)
            mean = centred.mean(dim=0)
            _, _, vh = torch.linalg.svd(centred - mean, full_matrices=False)
            components = vh[:k]
        else:
            chunks = flat.split(GRAM_CHUNK)
            mean = sum(chunk.to(torch.float64).sum(dim=0) for chunk in chunks) / n
            gram = torch.zeros(d, d, dtype=torch.float64, device=flat.device)
            for chunk in chunks:
                centred = chunk.to(torch.float64) - mean
                gram.addmm_(centred.T, centred)
            _, vectors = torch.linalg.eigh(gram)  # eigenvalues ascending
            components = vectors[:, -k:].flip(1).T
        self.mean.copy_(mean.to(self.mean.dtype))
        self.components.copy_(components.to(self.components.dtype))
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

"""PCA as a linear autoencoder with fixed weights: the baseline every kind is compared with.

Fitted in closed form by the training job, in float64, in one of three ways by the input's size
(N samples of D inputs), none of which holds a float64 copy of a large input:

- D up to `GRAM_MAX_INPUTS` and N > D: the leading eigenvectors of the covariance, summed chunk
  by chunk (a [D, D] matrix);
- N x D up to `SVD_MAX_ELEMENTS`: the SVD of the centred inputs (a copy of them);
- otherwise: a randomized range finder with power iterations (Halko, Martinsson and Tropp 2011),
  chunk by chunk, seeded ([N, K + oversampling] and [D, K + oversampling] matrices).

Held as buffers so it saves, loads and scores through exactly the same path as the neural kinds.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.detector.models.config import ModelConfig
from pipeline.errors import DataError

__all__ = ["PCAModel"]

# Widest input fitted through its covariance ([D, D] float64: 128 MiB at 4,096 inputs).
GRAM_MAX_INPUTS = 4096
# Samples per chunk of the sums over the input.
GRAM_CHUNK = 4096
# Largest input (N x D) whose exact SVD is taken when the covariance does not apply (256 MiB).
SVD_MAX_ELEMENTS = 1 << 25
# The randomized fit's extra directions and power iterations.
OVERSAMPLING = 10
POWER_ITERATIONS = 6


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
        if k > min(n, d):
            raise DataError(
                f"a PCA of code size {k} needs at least {k} training windows, there are {n}: "
                "lower --code-size or give more data"
            )
        mean = sum(chunk.to(torch.float64).sum(dim=0) for chunk in flat.split(GRAM_CHUNK)) / n
        if d <= GRAM_MAX_INPUTS and n > d:
            gram = torch.zeros(d, d, dtype=torch.float64, device=flat.device)
            for chunk in flat.split(GRAM_CHUNK):
                centred = chunk.to(torch.float64) - mean
                gram.addmm_(centred.T, centred)
            _, vectors = torch.linalg.eigh(gram)  # eigenvalues ascending
            components = vectors[:, -k:].flip(1).T
        elif n * d <= SVD_MAX_ELEMENTS:
            _, _, vh = torch.linalg.svd(flat.to(torch.float64) - mean, full_matrices=False)
            components = vh[:k]
        else:
            components = _randomized_components(flat, mean, k)
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


def _randomized_components(flat: torch.Tensor, mean: torch.Tensor, k: int) -> torch.Tensor:
    """The leading `k` right singular vectors of `flat - mean` [N, D], approximated through a
    seeded random range of `k + OVERSAMPLING` directions sharpened by power iterations."""
    n, d = flat.shape
    width = min(k + OVERSAMPLING, n, d)
    seeded = torch.Generator().manual_seed(0)
    omega = torch.randn(d, width, generator=seeded, dtype=torch.float64).to(flat.device)
    basis = _orthonormal(_times(flat, mean, omega))
    for _ in range(POWER_ITERATIONS):
        basis = _orthonormal(_times(flat, mean, _orthonormal(_times_t(flat, mean, basis))))
    _, _, vh = torch.linalg.svd(_times_t(flat, mean, basis).T, full_matrices=False)
    return vh[:k]


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y).Q


def _times(flat: torch.Tensor, mean: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(flat - mean) @ m, chunk by chunk: [N, W]."""
    return torch.cat([(c.to(torch.float64) - mean) @ m for c in flat.split(GRAM_CHUNK)])


def _times_t(flat: torch.Tensor, mean: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(flat - mean).T @ m, chunk by chunk: [D, W]."""
    out = torch.zeros(flat.shape[1], m.shape[1], dtype=torch.float64, device=flat.device)
    for at, c in zip(range(0, len(flat), GRAM_CHUNK), flat.split(GRAM_CHUNK), strict=True):
        out.addmm_((c.to(torch.float64) - mean).T, m[at : at + len(c)])
    return out

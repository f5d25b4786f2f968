"""Training objectives, one per autoencoder kind. The models stay pure; what makes an autoencoder
"denoising", "sparse", "contractive" or "variational" is how it is trained, defined here.

Every objective returns a scalar loss for one batch of scaled inputs. Reconstruction error is the
mean element-wise error under the configured loss, the same quantity the detector scores with.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.detector.models import ModelConfig, kl_divergence
from pipeline.detector.scoring import element_errors

__all__ = ["Objective", "corrupt", "make_objective", "reconstruction_loss"]

Objective = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    return element_errors(recon, target, loss).mean()


def corrupt(x: torch.Tensor, kind: str, level: float) -> torch.Tensor:
    """A corrupted copy of `x`: additive gaussian noise with std `level`, masking (each input set
    to zero with probability `level`), or salt-and-pepper (each input set to the batch minimum or
    maximum of its feature with probability `level`)."""
    if kind == "gaussian":
        return x + level * torch.randn_like(x)
    hit = torch.rand_like(x) < level
    if kind == "mask":
        return x.masked_fill(hit, 0.0)
    low = x.amin(dim=0, keepdim=True).expand_as(x)
    high = x.amax(dim=0, keepdim=True).expand_as(x)
    salt = torch.rand_like(x) < 0.5
    return torch.where(hit, torch.where(salt, high, low), x)


def _contractive_penalty(code: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm of d code / d x per sample, averaged over the batch.

    Samples are independent, so the gradient of code[:, k].sum() w.r.t. x is row k of every
    sample's Jacobian at once: code_size backward passes, kept in the graph for training.
    """
    total = torch.zeros(len(x), device=x.device, dtype=x.dtype)
    for k in range(code.shape[1]):
        (row,) = torch.autograd.grad(code[:, k].sum(), x, create_graph=True)
        total = total + row.square().flatten(1).sum(dim=1)
    return total.mean()


def _sparsity_penalty(code: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    if config.sparsity == "l1":
        return code.abs().mean()
    rho = config.sparsity_target
    rho_hat = code.mean(dim=0).clamp(1e-6, 1 - 1e-6)
    kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
    return kl.sum()


def make_objective(config: ModelConfig) -> Objective:
    loss = config.loss

    if config.kind in ("undercomplete", "pca"):

        def objective(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return reconstruction_loss(model.reconstruct(x), x, loss)

    elif config.kind == "denoising":

        def objective(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
            noisy = corrupt(x, config.corruption, config.corruption_level)
            return reconstruction_loss(model.reconstruct(noisy), x, loss)

    elif config.kind == "sparse":

        def objective(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
            recon, code = model(x)
            penalty = _sparsity_penalty(code, config)
            return reconstruction_loss(recon, x, loss) + config.sparsity_weight * penalty

    elif config.kind == "contractive":

        def objective(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
            x = x.detach().requires_grad_(True)
            code = model.encode(x)
            recon = model.decode(code)
            penalty = _contractive_penalty(code, x)
            return reconstruction_loss(recon, x, loss) + config.contractive_weight * penalty

    else:  # vae

        def objective(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
            recon, mu, logvar = model(x)
            kl = kl_divergence(mu, logvar).mean() / config.n_inputs
            return reconstruction_loss(recon, x, loss) + config.beta * kl

    return objective

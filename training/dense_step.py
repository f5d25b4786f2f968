"""A closed-form training step for dense autoencoders, the most common configuration.

For a stack of linear layers with element-wise activations and an MSE or L1 loss, the gradients
are a handful of matrix products. Computing them directly, instead of recording an autograd graph,
removes most of the per-step overhead that dominates small mini-batches on a CPU (measured: about
2x faster at batch 32 on SKAB windows). The step updates the model's own parameters in place, so
the model stays a plain `nn.Module`; tests check its gradients and updates against autograd with
`torch.optim.AdamW`.

Applies to the undercomplete and denoising kinds with the dense backbone, activations relu, tanh
or linear, and loss mse or l1. Everything else trains through autograd.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.adamw import adamw

from pipeline.detector.models import Autoencoder, ModelConfig
from training.objectives import corrupt

__all__ = ["DenseStep"]

_ACTIVATIONS = {"relu", "tanh", "linear"}


class DenseStep:
    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        *,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if not self.supports(model, config):
            raise ValueError("DenseStep does not apply to this model")
        self.config = config
        self.loss = config.loss
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        n_hidden = len(config.hidden)
        # Activation after each linear layer: hidden layers use the configured one; the code
        # layer and the output layer are linear.
        acts = [config.activation] * n_hidden + ["linear"] + [config.activation] * n_hidden
        self.layers = [
            (lin.weight, lin.bias, act) for lin, act in zip(linears, acts + ["linear"], strict=True)
        ]
        self.params = [p for w, b, _ in self.layers for p in (w, b)]
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params]
        self.hyper = dict(
            lr=lr,
            beta1=betas[0],
            beta2=betas[1],
            weight_decay=weight_decay,
            eps=eps,
            amsgrad=False,
            maximize=False,
        )

    @staticmethod
    def supports(model: nn.Module, config: ModelConfig) -> bool:
        return (
            isinstance(model, Autoencoder)
            and config.backbone == "dense"
            and config.kind in ("undercomplete", "denoising")
            and config.activation in _ACTIVATIONS
            and config.loss in ("mse", "l1")
            and config.code_activation == "linear"
            and config.output_activation == "linear"
        )

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """One AdamW step on a batch (corrupted first for the denoising kind, with the clean
        batch as the target). Returns the batch loss as a 0-d tensor, without synchronising."""
        config = self.config
        inputs = batch
        if config.kind == "denoising":
            inputs = corrupt(batch, config.corruption, config.corruption_level)
        x = inputs.reshape(len(inputs), -1)
        t = batch.reshape(len(batch), -1)
        activations = [x]
        for weight, bias, act in self.layers:
            h = torch.addmm(bias, activations[-1], weight.t())
            if act == "relu":
                h.relu_()
            elif act == "tanh":
                h.tanh_()
            activations.append(h)
        diff = activations[-1] - t
        if self.loss == "mse":
            loss = diff.square().mean()
            grad = diff.mul_(2.0 / diff.numel())
        else:
            loss = diff.abs().mean()
            grad = diff.sign_().div_(diff.numel())
        grads: list[torch.Tensor] = []
        for i in range(len(self.layers) - 1, -1, -1):
            weight, _, act = self.layers[i]
            out = activations[i + 1]
            if act == "relu":
                grad = grad.mul_(out > 0)
            elif act == "tanh":
                grad = grad.mul_(1.0 - out.square())
            grads.append(grad.sum(dim=0))
            grads.append(grad.t().mm(activations[i]))
            if i:
                grad = grad.mm(weight)
        grads.reverse()  # [w0, b0, w1, b1, ...] to match self.params
        adamw(
            self.params,
            grads,
            self.exp_avgs,
            self.exp_avg_sqs,
            [],
            self.steps,
            fused=True,
            **self.hyper,
        )
        return loss

"""The closed-form dense step computes what autograd with torch.optim.AdamW computes."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.detector import ModelConfig, build_model
from training.dense_step import DenseStep
from training.objectives import make_objective


@pytest.mark.parametrize("activation", ["relu", "tanh", "linear"])
@pytest.mark.parametrize("loss", ["mse", "l1"])
@pytest.mark.parametrize("hidden", [(32, 16), ()])
def test_updates_match_autograd_adamw(activation: str, loss: str, hidden):
    config = ModelConfig(
        input_shape=(6, 4), hidden=hidden, code_size=3, loss=loss, activation=activation
    )
    torch.manual_seed(0)
    fast_model = build_model(config)
    slow_model = copy.deepcopy(fast_model)
    fast = DenseStep(fast_model, config, lr=1e-2, weight_decay=1e-3)
    optimizer = torch.optim.AdamW(slow_model.parameters(), lr=1e-2, weight_decay=1e-3)
    objective = make_objective(config)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        batch = torch.randn(17, 6, 4, generator=generator)
        fast_loss = fast(batch)
        optimizer.zero_grad()
        slow_loss = objective(slow_model, batch)
        slow_loss.backward()
        optimizer.step()
        torch.testing.assert_close(fast_loss, slow_loss.detach(), rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(
        fast_model.state_dict().items(), slow_model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_denoising_corrupts_inputs_but_targets_the_clean_batch():
    config = ModelConfig(
        kind="denoising",
        input_shape=(6, 4),
        hidden=(16,),
        code_size=3,
        corruption="mask",
        corruption_level=0.5,
    )
    torch.manual_seed(0)
    fast_model = build_model(config)
    slow_model = copy.deepcopy(fast_model)
    fast = DenseStep(fast_model, config, lr=1e-2, weight_decay=0.0)
    optimizer = torch.optim.AdamW(slow_model.parameters(), lr=1e-2, weight_decay=0.0)
    batch = torch.randn(9, 6, 4)
    torch.manual_seed(5)
    fast(batch)
    torch.manual_seed(5)  # the same corruption draw for the autograd path
    make_objective(config)(slow_model, batch).backward()
    optimizer.step()
    for a, b in zip(fast_model.parameters(), slow_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kind,backbone,activation",
    [
        ("sparse", "dense", "relu"),
        ("undercomplete", "conv", "relu"),
        ("vae", "dense", "relu"),
        ("undercomplete", "dense", "gelu"),
    ],
)
def test_other_configurations_use_autograd(kind, backbone, activation):
    config = ModelConfig(
        kind=kind, backbone=backbone, input_shape=(8, 2), hidden=(4,), activation=activation
    )
    assert not DenseStep.supports(build_model(config), config)

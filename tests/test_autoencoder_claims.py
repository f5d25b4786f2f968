"""Claims of the autoencoder literature, checked on seeded data."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.detector import ModelConfig, build_model
from pipeline.detector.scoring import score_tensor
from training.fit import FitConfig, fit
from training.objectives import corrupt, make_objective

DIM = 12


def _curve(n: int, seed: int) -> torch.Tensor:
    """Points on a closed nonlinear 1-D curve embedded in DIM dimensions, standardised."""
    rng = np.random.default_rng(seed)
    theta = rng.uniform(0, 2 * np.pi, size=n)
    basis = np.stack(
        [
            np.cos(theta),
            np.sin(theta),
            np.cos(2 * theta),
            np.sin(2 * theta),
            np.cos(3 * theta),
            np.sin(3 * theta),
        ],
        axis=1,
    )
    mixing = np.random.default_rng(99).normal(size=(6, DIM))
    x = basis @ mixing + 0.01 * rng.normal(size=(n, DIM))
    return torch.from_numpy(x.astype(np.float32)).reshape(n, 1, DIM)


def _linear(n: int, seed: int) -> torch.Tensor:
    """Data on a 3-D linear subspace plus small noise."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3)) * np.array([3.0, 2.0, 1.0])
    mixing = np.random.default_rng(7).normal(size=(3, DIM))
    x = z @ mixing + 0.05 * rng.normal(size=(n, DIM))
    return torch.from_numpy(x.astype(np.float32)).reshape(n, 1, DIM)


def _held_out_error(
    kind: str, code: int, train: torch.Tensor, test: torch.Tensor, lr: float = 3e-3, **cfg
) -> float:
    config = ModelConfig(kind=kind, input_shape=(1, DIM), code_size=code, **cfg)
    torch.manual_seed(0)
    model = build_model(config)
    if kind == "pca":
        model.fit(train)
    else:
        settings = FitConfig(
            min_steps=0,
            epochs=150,
            batch_size=128,
            lr=lr,
            patience=0,
            weight_decay=0,
            schedule="constant",
        )
        fit(model, config, make_objective(config), train, None, settings)
    with torch.no_grad():
        return float(score_tensor(model, config, test, attribution=False)[0].mean())


def test_undercomplete_beats_pca_on_a_curved_manifold():
    train, test = _curve(3000, 1), _curve(1000, 2)
    pca = _held_out_error("pca", 1, train, test)
    ae = _held_out_error("undercomplete", 1, train, test, hidden=(64, 64), activation="tanh")
    assert ae < 0.5 * pca, f"AE {ae:.4f} vs PCA {pca:.4f}"


def test_linear_autoencoder_matches_pca_on_linear_data():
    train, test = _linear(3000, 1), _linear(1000, 2)
    pca = _held_out_error("pca", 3, train, test)
    ae = _held_out_error("undercomplete", 3, train, test, lr=1e-2, hidden=(), activation="linear")
    assert abs(ae - pca) <= 0.1 * pca, f"linear AE {ae:.5f} vs PCA {pca:.5f}"


def test_denoising_maps_corrupted_inputs_closer_to_clean_than_plain_ae():
    train, test = _curve(3000, 1), _curve(1000, 2)
    common = dict(input_shape=(1, DIM), hidden=(64, 64), activation="tanh", code_size=4)
    settings = FitConfig(
        min_steps=0,
        epochs=150,
        batch_size=128,
        lr=3e-3,
        patience=0,
        weight_decay=0,
        schedule="constant",
    )
    models = {}
    for kind in ("undercomplete", "denoising"):
        config = ModelConfig(kind=kind, corruption="gaussian", corruption_level=0.5, **common)
        torch.manual_seed(0)
        model = build_model(config)
        fit(model, config, make_objective(config), train, None, settings)
        models[kind] = model
    torch.manual_seed(5)
    noisy = corrupt(test, "gaussian", 0.5)
    with torch.no_grad():
        distance = {
            k: float((m.reconstruct(noisy) - test).square().mean()) for k, m in models.items()
        }
    assert distance["denoising"] < 0.8 * distance["undercomplete"], distance

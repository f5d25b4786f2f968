"""Contract over every model kind x backbone: save/load parity, sane scores, anomalies stand out."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipeline.detector import (
    MODEL_KINDS,
    Detector,
    InputSpec,
    ModelConfig,
    Scaler,
    WindowSpec,
    build_model,
    load_detector,
    save_detector,
    sliding_windows,
)
from pipeline.tools.synthetic import normal_series
from tests.helpers import anomalous_windows
from training.fit import FitConfig, fit
from training.objectives import make_objective

WINDOW, FEATURES = 32, 6
SPEC = WindowSpec(WINDOW, 4)
COMBOS = [
    (kind, backbone)
    for kind, backbone in itertools.product(MODEL_KINDS, ("dense", "conv"))
    if not (kind == "pca" and backbone == "conv")
]


@pytest.fixture(scope="module")
def series() -> dict[str, np.ndarray]:
    values = normal_series(6000, FEATURES, seed=1)
    return {"train": values[:4000], "test": values[4000:]}


def _train(kind: str, backbone: str, series) -> Detector:
    scaler = Scaler.fit("standard", series["train"])
    x = torch.from_numpy(scaler.transform(sliding_windows(series["train"], SPEC)))
    hidden = (64, 32) if backbone == "dense" else (16, 32)
    config = ModelConfig(
        kind=kind, backbone=backbone, input_shape=(WINDOW, FEATURES), hidden=hidden, code_size=8
    )
    torch.manual_seed(3)
    model = build_model(config)
    if kind == "pca":
        model.fit(x)
    else:
        # conv decoders are smooth: they need longer to stop reconstructing stuck sensors
        epochs = 60 if backbone == "conv" else 30
        settings = FitConfig(
            min_steps=0,
            schedule="constant",
            epochs=epochs,
            batch_size=64,
            lr=3e-3,
            patience=0,
            seed=3,
        )
        fit(model, config, make_objective(config), x, None, settings)
    names = tuple(f"s{i}" for i in range(FEATURES))
    return Detector(InputSpec("series", names, SPEC), scaler, config, model)


@pytest.mark.parametrize(("kind", "backbone"), COMBOS)
def test_model_contract(kind: str, backbone: str, series, tmp_path):
    detector = _train(kind, backbone, series)
    normal = sliding_windows(series["test"], SPEC)
    scored = detector.score(normal)

    assert np.isfinite(scored.scores).all()
    assert (scored.scores >= 0).all()
    assert scored.per_feature.shape == (len(normal), FEATURES)
    assert scored.per_step.shape == (len(normal), WINDOW)

    save_detector(detector, tmp_path / "det")
    loaded = load_detector(tmp_path / "det")
    np.testing.assert_array_equal(loaded.score(normal).scores, scored.scores)
    assert loaded.config == detector.config and loaded.input == detector.input

    median = np.median(scored.scores)
    for anomaly in ("spike", "level_shift", "stuck"):
        windows = anomalous_windows(series["test"], anomaly, WINDOW, 20, seed=7)
        ratio = detector.score(windows).scores.min() / median
        assert ratio >= 3.0, f"{kind}/{backbone}: {anomaly} windows only {ratio:.1f}x the median"


def test_attribution_points_at_the_broken_sensor(series):
    detector = _train("undercomplete", "dense", series)
    window = sliding_windows(series["test"], SPEC)[10].copy()
    window[20:, 4] += 8 * series["train"][:, 4].std()
    scored = detector.score(window[None])
    assert int(np.argmax(scored.per_feature[0])) == 4
    assert int(np.argmax(scored.per_step[0])) >= 20


def test_same_seed_trains_bit_for_bit_on_cpu(series):
    first = _train("denoising", "conv", series)
    second = _train("denoising", "conv", series)
    for (name, a), (_, b) in zip(
        first.model.state_dict().items(), second.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name

"""Every training run fits PCA on the same windows and says plainly when PCA was better."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.detector import ModelConfig
from tests.helpers import peak_growth
from training.calibrate import CalibrationSettings
from training.cli.train import _describe
from training.fit import FitConfig
from training.job import TrainSettings
from training.runner import RunOptions, run_training


def _digits(tmp_path: Path, fit: FitConfig) -> TrainSettings:
    return TrainSettings(
        data="digits",
        normal_class="0",
        out=str(tmp_path / "det"),
        model=ModelConfig(hidden=(32,), code_size=8),
        fit=fit,
        calibration=CalibrationSettings(method="quantile", target_fpr=0.05),
        device="cpu",
    )


def test_an_undertrained_autoencoder_is_told_pca_was_better(tmp_path: Path, mlflow_embedded):
    from mlflow import MlflowClient

    # two optimizer steps at a tiny learning rate: the autoencoder has learnt nothing yet
    settings = _digits(tmp_path, FitConfig(min_steps=0, epochs=1, batch_size=64, lr=1e-5))
    summary = run_training(settings, RunOptions(mlflow_embedded, progress=False))

    baseline = summary["baseline"]
    assert baseline["compared_on"] == "auroc" and baseline["pca_better"] is True
    assert baseline["evaluation"]["auroc"] > summary["evaluation"]["auroc"]
    assert baseline["val_loss"] < baseline["model_val_loss"]
    text = _describe(summary, mlflow_embedded, None)
    assert "PCA baseline (code 8) was better: test AUROC" in text
    assert "not converged" in text

    metrics = MlflowClient(mlflow_embedded).get_run(summary["run_id"]).data.metrics
    assert metrics["pca_test_auroc"] == baseline["evaluation"]["auroc"]
    assert metrics["test_auroc"] == summary["evaluation"]["auroc"]
    assert {"pca_val_loss", "pca_test_auprc", "pca_test_f1", "model_val_loss"} <= set(metrics)
    assert metrics["pca_better"] == 1.0 and metrics["converged"] == 0.0
    assert metrics["steps"] == summary["steps"] == 2


def test_without_labels_the_baseline_is_compared_on_validation_error():
    from training.baseline import Baseline

    worse = Baseline(8, val_loss=0.2, model_val_loss=0.1, evaluation=None, model_evaluation=None)
    assert worse.compared_on == "val_loss" and worse.pca_better is False
    assert worse.verdict() == "beats its PCA baseline (code 8): validation error 0.1 vs PCA 0.2"
    better = Baseline(8, val_loss=0.1, model_val_loss=0.2, evaluation=None, model_evaluation=None)
    assert better.pca_better and better.verdict().startswith("PCA baseline (code 8) was better")
    assert better.metrics() == {"pca_val_loss": 0.1, "pca_better": 1.0}


def _windows(n: int, length: int, features: int, seed: int = 0):
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    t = np.arange(n + length)
    periods = 50 + 13 * np.arange(features)
    series = np.sin(2 * np.pi * t[:, None] / periods) + 0.1 * rng.standard_normal(t.shape + (1,))
    view = np.lib.stride_tricks.sliding_window_view(series, length, axis=0)[:n]
    return torch.from_numpy(np.ascontiguousarray(view.transpose(0, 2, 1), dtype=np.float32))


def test_pca_fitted_through_the_covariance_spans_what_the_svd_spans():
    import torch

    from pipeline.detector.models.pca import GRAM_CHUNK, PCAModel

    x = _windows(3 * GRAM_CHUNK // 2, 16, 6)  # two chunks of the covariance sum
    model = PCAModel(ModelConfig(kind="pca", input_shape=(16, 6), code_size=5)).fit(x)
    flat = x.reshape(len(x), -1).double()
    _, _, vh = torch.linalg.svd(flat - flat.mean(dim=0), full_matrices=False)
    ours = model.components.double()
    projector = ours.T @ ours
    assert torch.allclose(projector, vh[:5].T @ vh[:5], atol=1e-5)
    assert torch.allclose(ours @ ours.T, torch.eye(5, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(model.mean.double(), flat.mean(dim=0), atol=1e-6)


@pytest.mark.parametrize("fit", ["covariance", "randomized"])
def test_pca_fit_holds_no_copy_of_its_windows(fit):
    """A float64 copy, its centred copy and the SVD's [N, D] factor were each twice the size of
    the float32 windows: fitting 60,000 windows of 32 x 38 took 8 times their size (inputs
    too wide for the covariance are made to look so here)."""
    wide = "pca.GRAM_MAX_INPUTS = 16" if fit == "randomized" else ""
    growth = peak_growth(
        f"""
        import sys, torch
        sys.path.insert(0, "tests")
        from test_baseline import _windows
        from pipeline.detector import ModelConfig
        from pipeline.detector.models import pca
        {wide}
        torch.set_num_threads(1)
        x = _windows(60_000, 32, 38)
        model = pca.PCAModel(ModelConfig(kind="pca", input_shape=(32, 38), code_size=8))
        """,
        "model.fit(x)",
        "x.numel() * x.element_size()",
    )
    assert growth < 1.0, growth  # less than the windows themselves


def test_pca_of_inputs_too_wide_for_the_covariance_finds_the_leading_directions(monkeypatch):
    """Wide inputs (a window of 64 x 100 sensors is 6,400) took an exact SVD holding three
    float64 copies of up to 200,000 windows; the randomized fit holds [N, K + 10] at most."""
    import numpy as np
    import torch

    from pipeline.detector.models import pca

    monkeypatch.setattr(pca, "GRAM_MAX_INPUTS", 16)
    monkeypatch.setattr(pca, "SVD_MAX_ELEMENTS", 1000)
    rng = np.random.default_rng(0)
    n, d, k = 9000, 96, 5
    directions = np.linalg.qr(rng.normal(size=(d, k)))[0].T  # [k, d] orthonormal
    codes = rng.normal(size=(n, k)) * np.array([10.0, 8.0, 6.0, 4.0, 2.0])
    flat = codes @ directions + 0.05 * rng.normal(size=(n, d)) + 3.0
    x = torch.from_numpy(flat.reshape(n, 16, 6).astype(np.float32))
    model = pca.PCAModel(ModelConfig(kind="pca", input_shape=(16, 6), code_size=k)).fit(x)
    ours = model.components.double()
    exact = torch.from_numpy(directions)
    assert torch.allclose(ours.T @ ours, exact.T @ exact, atol=1e-3)
    assert torch.allclose(ours @ ours.T, torch.eye(k, dtype=torch.float64), atol=1e-5)


def _detector(loss: str, code_size: int = 4):
    from pipeline.detector import Detector, InputSpec, Scaler, WindowSpec, build_model

    config = ModelConfig(input_shape=(16, 3), hidden=(16,), code_size=code_size, loss=loss)
    spec = InputSpec("series", features=("a", "b", "c"), window=WindowSpec(16, 4))
    return Detector(spec, Scaler("none", (0.0,) * 3, (1.0,) * 3), config, build_model(config))


@pytest.mark.parametrize("loss", ["l1", "bce"])
def test_pca_and_the_autoencoder_are_compared_under_the_models_loss(loss):
    import torch

    from pipeline.detector.models.pca import PCAModel
    from pipeline.detector.scoring import element_errors
    from training.baseline import fit_baseline

    x, val = _windows(400, 16, 3), _windows(200, 16, 3, seed=1)
    if loss == "bce":  # inputs in [0, 1], as min-max scaling gives them
        x, val = (x + 1.2) / 2.4, (val + 1.2) / 2.4
    baseline = fit_baseline(_detector(loss), None, x, val, "end", None, calibrate=lambda d: None)
    pca = PCAModel(ModelConfig(kind="pca", input_shape=(16, 3), code_size=4)).fit(x)
    with torch.no_grad():
        expected = float(element_errors(pca.reconstruct(val), val, loss).double().mean())
    assert baseline.val_loss == pytest.approx(expected, rel=1e-4)


def test_a_code_size_beyond_the_training_windows_gives_no_baseline_and_pca_says_why():
    from pipeline.detector.models.pca import PCAModel
    from pipeline.errors import DataError
    from training.baseline import fit_baseline

    x = _windows(6, 16, 3)
    assert fit_baseline(_detector("mse", 8), None, x, x, "end", None, calibrate=None) is None
    with pytest.raises(
        DataError, match="code size 8 needs at least 8 training windows, there are 6"
    ):
        PCAModel(ModelConfig(kind="pca", input_shape=(16, 3), code_size=8)).fit(x)


def test_the_baselines_calibration_does_not_repeat_the_models_warnings(caplog):
    import logging
    from types import SimpleNamespace

    from training.baseline import fit_baseline

    def calibrate(detector):  # as the model's calibration warned on too few windows
        logging.getLogger("training.calibrate").warning("the threshold comes from a tail")
        return detector.threshold

    data = SimpleNamespace(has=lambda part: True, evaluate=lambda *a: {"auroc": 0.5})
    x = _windows(400, 16, 3)
    with caplog.at_level("WARNING"):
        baseline = fit_baseline(
            _detector("mse"), data, x, x, "end", {"auroc": 0.6}, calibrate=calibrate
        )
    assert baseline.evaluation["auroc"] == 0.5  # calibrated and evaluated
    assert "comes from a tail" not in caplog.text
    assert logging.getLogger("training.calibrate").level == logging.NOTSET  # put back


def test_the_summary_gives_the_validation_loss_of_the_weights_kept():
    from training.fit import FitResult

    fit = FitResult(val_losses=[0.3, 0.1, 0.12], eval_steps=[10, 20, 30], best_step=20)
    assert fit.kept_val_loss == 0.1
    summary = {
        "model_kind": "undercomplete",
        "backbone": "dense",
        "epochs": 3,
        "steps": 30,
        "best_step": 20,
        "train_loss": 0.2,
        "val_loss": 0.12,
        "kept_val_loss": fit.kept_val_loss,
        "threshold": 1.0,
        "calibration": "quantile",
        "artifact": "det",
        "run_id": "r",
    }
    first = _describe(summary, "sqlite:///m.db", None).splitlines()[0]
    assert first.endswith("validation loss 0.12 (the weights kept: 0.1, step 20)")

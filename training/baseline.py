"""The PCA baseline of a training run: fitted on the same training windows, scored the same way.

Every `aewatch train` of an autoencoder also fits PCA with the same code size (closed form, a few
seconds at most), calibrates it with the same settings and evaluates it on the same test split,
so that the run shows whether the autoencoder earned its place. The comparison is by test AUROC
when the test split is labelled, else by validation error (the mean reconstruction error of
clean validation windows under the model's loss, both in the same scaled space; a VAE's from its
latent mean, without the KL term). Data out of core has no baseline (PCA is fitted in memory), nor
has a code size above the number of inputs or at least the number of training windows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.detector import Detector, ModelConfig, build_model
from pipeline.detector.scoring import window_errors
from pipeline.errors import CalibrationError
from training.data.splits import Splits
from training.data.window_tensor import WindowTensor

__all__ = ["MAX_BASELINE_WINDOWS", "Baseline", "fit_baseline"]

log = logging.getLogger(__name__)

MAX_BASELINE_WINDOWS = 200_000
"""PCA is fitted on at most this many training windows (an evenly spaced subset beyond it)."""

RANKING = ("auroc", "auprc", "f1")


@dataclass(frozen=True)
class Baseline:
    """The PCA baseline's figures next to the autoencoder's."""

    code_size: int
    val_loss: float | None
    model_val_loss: float | None
    evaluation: dict | None  # auroc, auprc, f1 of PCA on the test split
    model_evaluation: dict | None  # the same of the autoencoder

    @property
    def compared_on(self) -> str | None:
        if self._figure("auroc") is not None:
            return "auroc"
        if self.val_loss is not None and self.model_val_loss is not None:
            return "val_loss"
        return None

    def _figure(self, key: str) -> tuple[float, float] | None:
        ours = (self.model_evaluation or {}).get(key)
        theirs = (self.evaluation or {}).get(key)
        return None if ours is None or theirs is None else (float(ours), float(theirs))

    @property
    def pca_better(self) -> bool | None:
        """True when PCA ranked the test split better (or, unlabelled, reconstructed the
        validation split better); None when there is nothing to compare."""
        if self.compared_on == "auroc":
            ours, theirs = self._figure("auroc")
            return theirs > ours
        if self.compared_on == "val_loss":
            return self.val_loss < self.model_val_loss
        return None

    def verdict(self) -> str:
        """One line for the training summary."""
        on = self.compared_on
        if on is None:
            return f"PCA baseline (code {self.code_size}): nothing to compare"
        if on == "auroc":
            ours, theirs = self._figure("auroc")
            figures = f"test AUROC {ours:.4f} vs PCA {theirs:.4f}"
        else:
            ours, theirs = self.model_val_loss, self.val_loss
            figures = f"validation error {ours:.5g} vs PCA {theirs:.5g}"
        if self.pca_better:
            return f"PCA baseline (code {self.code_size}) was better: {figures}"
        return f"beats its PCA baseline (code {self.code_size}): {figures}"

    def metrics(self) -> dict[str, float]:
        """Flat figures for MLflow: pca_val_loss, pca_test_auroc, ... and pca_better (1/0)."""
        out = {}
        if self.val_loss is not None:
            out["pca_val_loss"] = self.val_loss
        for key in RANKING:
            value = (self.evaluation or {}).get(key)
            if value is not None:
                out[f"pca_test_{key}"] = float(value)
        if self.pca_better is not None:
            out["pca_better"] = float(self.pca_better)
        return out

    def to_dict(self) -> dict:
        return {
            "kind": "pca",
            "code_size": self.code_size,
            "val_loss": self.val_loss,
            "model_val_loss": self.model_val_loss,
            "evaluation": self.evaluation,
            "compared_on": self.compared_on,
            "pca_better": self.pca_better,
            "verdict": self.verdict(),
        }


def fit_baseline(
    detector: Detector,
    data: Splits,
    train: torch.Tensor,
    val: torch.Tensor | None,
    point_rule: str,
    model_evaluation: dict | None,
    *,
    calibrate: Callable[[Detector], object],
    score_stats: Callable[[Detector], object] | None = None,
) -> Baseline | None:
    """PCA on `train` (the scaled training windows the autoencoder saw), scored, calibrated and
    evaluated like `detector` (`score_stats` fits the score terms' statistics where the model
    has them, `calibrate` gives a threshold the way the model got its own); None where it does
    not apply."""
    config = detector.config
    if config.kind == "pca" or config.code_size > config.n_inputs:
        return None
    if len(train) > MAX_BASELINE_WINDOWS:
        index = torch.linspace(0, len(train) - 1, MAX_BASELINE_WINDOWS, device=train.device)
        index = index.long()
        if isinstance(train, WindowTensor):
            train = train.subset(index)
        else:
            train = train.index_select(0, index)
    if config.code_size >= len(train):  # it would reconstruct every training window exactly
        log.info(
            "no PCA baseline: code size %d for %d training windows", config.code_size, len(train)
        )
        return None
    pca_config = ModelConfig(
        kind="pca", input_shape=config.input_shape, code_size=config.code_size, loss=config.loss
    )
    model = build_model(pca_config).to(train.device).fit(train)
    model.eval()
    pca = Detector(detector.input, detector.scaler, pca_config, model, baselines=detector.baselines)
    has_val = val is not None and len(val) > 0
    val_loss = reconstruction_error(model, pca_config, val) if has_val else None
    model_val = reconstruction_error(detector.model, config, val) if has_val else None
    evaluation = None
    if detector.score_stats is not None and score_stats is not None:
        pca.score_stats = score_stats(pca)
    if model_evaluation is not None and data.has("test"):
        quiet = logging.getLogger("training.calibrate")  # the model's calibration said it once
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            pca.threshold = calibrate(pca)
        except CalibrationError as exc:
            log.warning("the PCA baseline could not be calibrated: %s", exc)
        else:
            full = data.evaluate(pca, "test", point_rule)
            evaluation = {k: full.get(k) for k in RANKING} if full else None
        finally:
            quiet.setLevel(level)
    ours = {k: model_evaluation.get(k) for k in RANKING} if model_evaluation else None
    baseline = Baseline(config.code_size, val_loss, model_val, evaluation, ours)
    if baseline.pca_better:
        log.warning("%s", baseline.verdict())
    return baseline


@torch.no_grad()
def reconstruction_error(model, config: ModelConfig, x: torch.Tensor, batch: int = 4096) -> float:
    """Mean element error of clean inputs under the model's own loss (a VAE's from its latent
    mean, without its KL term): what PCA and the autoencoder are compared on."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(x), batch):
        errors = window_errors(model, config, x[start : start + batch])
        total += float(errors.double().sum())
        count += errors.numel()
    model.train(was_training)
    return total / max(1, count)

"""Figures logged with every training run: losses, score distributions, ROC / PR, image errors."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

__all__ = ["image_errors", "loss_curves", "roc_pr_curves", "score_histogram"]


def loss_curves(train_losses: list[float], val_losses: list[float]) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(train_losses) + 1), train_losses, label="train")
    if val_losses:
        ax.plot(range(1, len(val_losses) + 1), val_losses, label="validation")
    ax.set(xlabel="epoch", ylabel="loss", yscale="log", title="Training curves")
    ax.legend()
    fig.tight_layout()
    return fig


def score_histogram(
    normal: np.ndarray, threshold: float, anomalous: np.ndarray | None = None
) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    pool = np.concatenate([normal, anomalous]) if anomalous is not None else normal
    bins = np.logspace(np.log10(max(pool.min(), 1e-9)), np.log10(pool.max() + 1e-9), 60)
    ax.hist(normal, bins=bins, alpha=0.6, label=f"normal (n={len(normal)})")
    if anomalous is not None and len(anomalous):
        ax.hist(anomalous, bins=bins, alpha=0.6, label=f"anomalous (n={len(anomalous)})")
    ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set(xscale="log", xlabel="anomaly score", ylabel="windows", title="Score distribution")
    ax.legend()
    fig.tight_layout()
    return fig


def roc_pr_curves(labels: np.ndarray, scores: np.ndarray) -> Figure:
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(9, 3.8))
    fpr, tpr, _ = roc_curve(labels, scores)
    roc_ax.plot(fpr, tpr)
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc_ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC")
    precision, recall, _ = precision_recall_curve(labels, scores)
    pr_ax.plot(recall, precision)
    pr_ax.set(xlabel="recall", ylabel="precision", title="Precision-recall")
    fig.tight_layout()
    return fig


def image_errors(images: np.ndarray, reconstructions: np.ndarray, maps: np.ndarray) -> Figure:
    """Rows: input, reconstruction, per-pixel error map (channels averaged)."""
    n = len(images)
    fig, axes = plt.subplots(3, n, figsize=(1.4 * n, 4.4), squeeze=False)
    for i in range(n):
        for row, picture in enumerate((images[i].mean(0), reconstructions[i].mean(0), maps[i])):
            axes[row, i].imshow(picture, cmap="magma" if row == 2 else "gray")
            axes[row, i].axis("off")
    for row, title in enumerate(("input", "reconstruction", "error")):
        axes[row, 0].set_title(title, fontsize=8, loc="left")
    fig.tight_layout()
    return fig

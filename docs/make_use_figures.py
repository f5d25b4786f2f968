"""Draw the pictures of the README section "Other uses of a trained model" (`make figures`).

Trains three small detectors on most of scikit-learn's digits with `aewatch train` (a 2-D
undercomplete autoencoder beside 2-D PCA, a denoising autoencoder, a VAE), runs `aewatch encode`,
`aewatch reconstruct` and `aewatch sample` on the held-out rest, and draws what those commands
wrote: `encode.png`, `reconstruct.png` and `sample.png` in `--out`. A minute or two on a CPU.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402

from pipeline.cli import main  # noqa: E402
from training.objectives import corrupt  # noqa: E402
from training.tracking import local_store  # noqa: E402

N_FIT = 1300  # digits the models see; the other 497 are held out
COMMON = ["--epochs", "200", "--batch-size", "64", "--lr", "3e-3", "--patience", "0"]
MODELS = {
    "ae2": ["--kind", "undercomplete", "--hidden", "64", "--code-size", "2"],
    "pca2": ["--kind", "pca", "--code-size", "2"],
    "denoising": ["--kind", "denoising", "--hidden", "64", "--code-size", "16",
                  "--corruption-level", "0.25"],
    "vae": ["--kind", "vae", "--hidden", "128,64", "--code-size", "6", "--beta", "0.05",
            "--loss", "bce"],
}  # fmt: skip


def _aewatch(*args: str | Path) -> None:
    code = main([str(a) for a in args])
    if code != 0:
        raise SystemExit(f"aewatch {args[0]} failed with exit code {code}")


def _split(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Write fit.npz and held.npz (images with labels); the held-out images and labels."""
    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None]
    order = np.random.default_rng(0).permutation(len(images))
    for name, index in (("fit", order[:N_FIT]), ("held", order[N_FIT:])):
        np.savez(root / f"{name}.npz", images=images[index], labels=digits.target[index])
    return images[order[N_FIT:]], digits.target[order[N_FIT:]]


def _train(root: Path) -> dict[str, Path]:
    tracking = local_store(root, "aewatch-figures")
    models = {}
    for name, flags in MODELS.items():
        models[name] = root / name
        _aewatch("train", "--data", root / "fit.npz", *flags, *COMMON, "--out", models[name],
                 "--tracking-uri", tracking, "--experiment", "aewatch-figures", "--no-progress",
                 "--device", "cpu")  # fmt: skip
    return models


def _grid(axes_row, images: np.ndarray, label: str) -> None:
    for ax, image in zip(axes_row, images, strict=True):
        ax.imshow(image[0], cmap="gray_r", vmin=0, vmax=16)
        ax.set_xticks([])
        ax.set_yticks([])
    axes_row[0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)


def encode_figure(root: Path, models: dict[str, Path], out: Path) -> None:
    """Held-out digits in the 2-D code of the autoencoder and of PCA, coloured by digit."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, (name, title) in zip(axes, (("ae2", "autoencoder"), ("pca2", "PCA")), strict=True):
        tables = {}
        for part in ("fit", "held"):
            tables[part] = root / f"codes-{name}-{part}.parquet"
            _aewatch("encode", "--model", models[name], "--data", root / f"{part}.npz",
                     "--out", tables[part])  # fmt: skip
        seen, held = (pd.read_parquet(tables[p]) for p in ("fit", "held"))
        codes = ["code_0", "code_1"]
        accuracy = (
            KNeighborsClassifier(5)
            .fit(seen[codes], seen["label"])
            .score(held[codes], held["label"])
        )
        points = ax.scatter(held["code_0"], held["code_1"], c=held["label"], cmap="tab10", s=9)
        ax.set_title(f"{title}: 5-NN accuracy {accuracy:.0%}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(points, ax=axes, ticks=range(10), label="digit")
    fig.suptitle("aewatch encode: held-out digits in a 2-dimensional code")
    fig.savefig(out, dpi=80)
    plt.close(fig)


def reconstruct_figure(root: Path, models: dict[str, Path], held: np.ndarray, out: Path) -> None:
    """Clean digits, the same with noise, and the denoising autoencoder's reconstruction."""
    torch.manual_seed(0)
    clean = torch.from_numpy(held[:10])
    rows = [("clean", held[:10])]
    for noise, level in (("gaussian", 4.0), ("salt & pepper", 0.15)):
        kind = noise.replace(" & ", "")
        noisy = corrupt(clean, kind, level).clamp(0, 16).numpy()
        np.save(root / f"{kind}.npy", noisy)
        _aewatch("reconstruct", "--model", models["denoising"], "--data", root / f"{kind}.npy",
                 "--out", root / f"{kind}-denoised.npy")  # fmt: skip
        rows += [(noise, noisy), ("denoised", np.load(root / f"{kind}-denoised.npy"))]
    fig, axes = plt.subplots(len(rows), 10, figsize=(8, 4.4))
    for axes_row, (label, images) in zip(axes, rows, strict=True):
        _grid(axes_row, images, label)
    fig.suptitle("aewatch reconstruct with a denoising autoencoder")
    fig.subplots_adjust(left=0.14, right=0.98, top=0.9, bottom=0.02)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def _best_reconstructed(root: Path, model: Path, labels: np.ndarray, digits: tuple[int, ...]):
    """For each of `digits`, the held-out image of it that the model scores lowest."""
    _aewatch("score", "--model", model, "--data", root / "held.npz",
             "--out", root / "scores.parquet")  # fmt: skip
    scores = pd.read_parquet(root / "scores.parquet")["score"].to_numpy()
    return [int(np.argmin(np.where(labels == digit, scores, np.inf))) for digit in digits]


def sample_figure(
    root: Path, models: dict[str, Path], held: np.ndarray, labels: np.ndarray, out: Path
) -> None:
    """Digits drawn from the VAE's prior, and a walk between two held-out digits' codes."""
    _aewatch("sample", "--model", models["vae"], "--n", "30", "--seed", "0",
             "--out", root / "samples.npy")  # fmt: skip
    first, last = _best_reconstructed(root, models["vae"], labels, (0, 7))
    _aewatch("sample", "--model", models["vae"], "--interpolate", first, last, "--steps", "8",
             "--data", root / "held.npz", "--out", root / "walk.npy")  # fmt: skip
    samples = np.load(root / "samples.npy")
    walk = np.concatenate([held[[first]], np.load(root / "walk.npy"), held[[last]]])
    fig, axes = plt.subplots(4, 10, figsize=(8, 3.8))
    for row in range(3):
        _grid(axes[row], samples[10 * row : 10 * row + 10], "prior" if row == 1 else "")
    _grid(axes[3], walk, "0 → 7")
    for ax in (axes[3, 0], axes[3, -1]):
        ax.set_title("input", fontsize=8)
    fig.suptitle("aewatch sample from a VAE: draws from the prior, and an interpolation")
    fig.subplots_adjust(left=0.1, right=0.98, top=0.88, bottom=0.02, hspace=0.35)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main_figures(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="aewatch-figures-") as tmp:
        root = Path(tmp)
        held, labels = _split(root)
        models = _train(root)
        encode_figure(root, models, out / "encode.png")
        reconstruct_figure(root, models, held, out / "reconstruct.png")
        sample_figure(root, models, held, labels, out / "sample.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    main_figures(parser.parse_args().out)

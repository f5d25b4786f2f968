"""Training and scoring throughput of aewatch's dense undercomplete AE against PyOD's AutoEncoder.

Same data (SKAB 16x8 windows, stride 1, standardised on the anomaly-free run), same layer sizes
(input -> 64 -> 32 -> 64 -> input), same batch size, epochs and learning rate, in one process,
alternating the two so machine noise hits both. Reports median windows/s, the ratio, and the AUROC
each reaches on the same labelled windows of the 34 SKAB test runs (a window is anomalous when its
last reading is labelled, the decision a stream has at that moment).

    python -m benchmarks.bench_training --skab ../shared/datasets/skab --out results
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from benchmarks.common import (
    md_table,
    median_time,
    read_skab,
    skab_features,
    skab_files,
    write_results,
)
from pipeline.detector import (
    Detector,
    InputSpec,
    ModelConfig,
    Scaler,
    WindowSpec,
    build_model,
    cut_windows,
    sliding_windows,
)
from training.fit import FitConfig, fit
from training.objectives import make_objective

WINDOW = WindowSpec(16, 1)


def load(skab: Path):
    free = read_skab(skab / "anomaly-free" / "anomaly-free.csv")
    features = skab_features(free)
    train_raw = sliding_windows(free[features].to_numpy(np.float32), WINDOW)
    groups = []
    for path in skab_files(skab):
        frame = read_skab(path)
        groups.append(
            (
                path.name,
                frame["datetime"].to_numpy(),
                frame[features].to_numpy(np.float32),
                frame["anomaly"].to_numpy(),
            )
        )
    test = cut_windows(groups, WINDOW)
    scaler = Scaler.fit("standard", free[features].to_numpy())
    return features, scaler, train_raw, test


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skab", type=Path, default=Path("../shared/datasets/skab"))
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)

    from pyod.models.auto_encoder import AutoEncoder

    warnings.filterwarnings("ignore")
    features, scaler, train_raw, test = load(args.skab)
    x_train = scaler.transform(train_raw)
    x_test_raw = test.windows
    flat_train = x_train.reshape(len(x_train), -1)
    flat_test = scaler.transform(x_test_raw).reshape(len(x_test_raw), -1)
    labels = test.end_labels
    n_windows = len(x_train) * args.epochs
    print(
        f"SKAB: {len(x_train)} training windows, {len(x_test_raw)} test windows "
        f"({labels.mean():.1%} anomalous), {args.repeats} repeats"
    )

    config = ModelConfig(
        kind="undercomplete",
        backbone="dense",
        input_shape=(16, len(features)),
        hidden=(64,),
        code_size=32,
        activation="relu",
    )
    spec = InputSpec("series", tuple(features), WINDOW)
    # same epochs, batch and constant learning rate as PyOD's loop: no step minimum or schedule
    settings = FitConfig(
        epochs=args.epochs,
        min_steps=0,
        schedule="constant",
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=1e-5,
        patience=0,
        seed=0,
    )

    def fit_ours(seed: int) -> Detector:
        torch.manual_seed(seed)
        model = build_model(config)
        fit(model, config, make_objective(config), torch.from_numpy(x_train), None, settings)
        return Detector(spec, scaler, config, model)

    def fit_pyod(seed: int):
        clf = AutoEncoder(
            hidden_neuron_list=[64, 32],
            batch_size=args.batch_size,
            epoch_num=args.epochs,
            lr=args.lr,
            preprocessing=False,
            verbose=0,
            random_state=seed,
            device="cpu",
        )
        return clf.fit(flat_train)

    train_times = {"aewatch": [], "pyod": []}
    auroc = {"aewatch": [], "pyod": []}
    score_rates = {"aewatch": [], "pyod": []}
    fit_pyod(99), fit_ours(99)  # warm-up: imports, kernels, allocator
    for repeat in range(args.repeats):
        for name, fitter in (("pyod", fit_pyod), ("aewatch", fit_ours)):
            started = time.perf_counter()
            model = fitter(repeat)
            seconds = time.perf_counter() - started
            train_times[name].append(seconds)
            if name == "pyod":
                scores = model.decision_function(flat_test)
                rate_s, _ = median_time(lambda m=model: m.decision_function(flat_test), 3)
            else:
                scores = model.score(x_test_raw, attribution=False).scores
                rate_s, _ = median_time(lambda m=model: m.score(x_test_raw, attribution=False), 3)
            auroc[name].append(float(roc_auc_score(labels, scores)))
            score_rates[name].append(len(x_test_raw) / rate_s)
            print(
                f"repeat {repeat + 1} {name:8s} fit {seconds:6.2f}s "
                f"({n_windows / seconds:,.0f} windows/s)  score {score_rates[name][-1]:,.0f} "
                f"windows/s  AUROC {auroc[name][-1]:.3f}"
            )

    summary = {}
    for name in ("aewatch", "pyod"):
        summary[name] = {
            "train_windows_per_s": n_windows / statistics.median(train_times[name]),
            "score_windows_per_s": statistics.median(score_rates[name]),
            "auroc": statistics.median(auroc[name]),
            "train_seconds": train_times[name],
            "auroc_runs": auroc[name],
        }
    ratios = {
        "train": summary["aewatch"]["train_windows_per_s"] / summary["pyod"]["train_windows_per_s"],
        "score": summary["aewatch"]["score_windows_per_s"] / summary["pyod"]["score_windows_per_s"],
    }
    targets = {
        "train_ratio_at_least_5": ratios["train"] >= 5,
        "score_ratio_at_least_10": ratios["score"] >= 10,
        "auroc_not_worse": summary["aewatch"]["auroc"] >= summary["pyod"]["auroc"],
    }
    rows = [
        [name, s["train_windows_per_s"], s["score_windows_per_s"], s["auroc"]]
        for name, s in summary.items()
    ]
    markdown = "\n".join(
        [
            "## Training and scoring throughput: aewatch vs PyOD AutoEncoder",
            "",
            f"SKAB windows 16x8, {len(x_train)} training windows x {args.epochs} epochs, batch "
            f"{args.batch_size}, layers 128-64-32-64-128; scoring on {len(x_test_raw)} test windows. "
            f"Medians of {args.repeats} alternating runs.",
            "",
            md_table(["detector", "train windows/s", "score windows/s", "AUROC"], rows),
            "",
            f"Ratios (aewatch / PyOD): training **{ratios['train']:.1f}x**, scoring "
            f"**{ratios['score']:.1f}x**. Targets met: {targets}",
        ]
    )
    write_results(
        args.out,
        "training_throughput",
        {
            "settings": vars(args) | {"skab": str(args.skab), "out": str(args.out)},
            "results": summary,
            "ratios": ratios,
            "targets": targets,
        },
        markdown,
    )
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

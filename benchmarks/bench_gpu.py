"""Model-only scoring windows/s at several batch sizes, and training throughput, on CUDA and CPU.

The worker's model (window 64 x 8 sensors, dense 512-128-64-16 autoencoder) and a conv one, scored
through `Detector.score` (scaling, forward pass, attribution, transfer back) on random windows.
Runs anywhere; on a machine without CUDA only the CPU rows are filled.

    python -m benchmarks.bench_gpu --out results
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import md_table, write_results
from pipeline.detector import Detector, InputSpec, ModelConfig, Scaler, WindowSpec, build_model
from training.fit import FitConfig, fit
from training.objectives import make_objective

WINDOW, FEATURES = 64, 8
MODELS = {
    "dense 128-64/16": dict(backbone="dense", hidden=(128, 64), code_size=16),
    "conv 32-64/16": dict(backbone="conv", hidden=(32, 64), code_size=16),
}


def _detector(model: dict, device: str) -> Detector:
    config = ModelConfig(input_shape=(WINDOW, FEATURES), **model)
    torch.manual_seed(0)
    names = tuple(f"s{i}" for i in range(FEATURES))
    scaler = Scaler.fit("standard", np.random.default_rng(0).normal(size=(1000, FEATURES)))
    return Detector(
        InputSpec("series", names, WindowSpec(WINDOW, 8)), scaler, config, build_model(config)
    ).to(device)


def scoring(device: str, batches: list[int], repeats: int) -> list[list]:
    rows = []
    for name, model in MODELS.items():
        detector = _detector(model, device)
        for batch in batches:
            windows = np.random.default_rng(1).normal(size=(batch * 4, WINDOW, FEATURES))
            windows = windows.astype(np.float32)
            detector.score(windows, batch_size=batch)  # warm-up: kernels, allocator
            times = []
            for _ in range(repeats):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                started = time.perf_counter()
                detector.score(windows, batch_size=batch)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            rows.append([device, name, batch, len(windows) / statistics.median(times)])
    return rows


def model_only(device: str, batches: list[int], repeats: int) -> list[list]:
    """The forward pass and the error reduction alone, on a batch already on the device."""
    from pipeline.detector.scoring import score_tensor

    rows = []
    for name, model in MODELS.items():
        detector = _detector(model, device)
        for batch in batches:
            x = torch.randn(batch, WINDOW, FEATURES, device=device)
            times = []
            with torch.inference_mode():
                for i in range(repeats + 2):
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    started = time.perf_counter()
                    for _ in range(10):
                        score_tensor(detector.model, detector.config, x)
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    if i >= 2:
                        times.append((time.perf_counter() - started) / 10)
            rows.append([device, name, batch, batch / statistics.median(times)])
    return rows


def training(device: str, epochs: int, batch_size: int) -> list[list]:
    rows = []
    x = torch.randn(20000, WINDOW, FEATURES, device=device)
    for name, model in MODELS.items():
        config = ModelConfig(input_shape=(WINDOW, FEATURES), **model)
        for amp in (False, True) if device.startswith("cuda") else (False,):
            torch.manual_seed(0)
            net = build_model(config).to(device)
            settings = FitConfig(
                epochs=epochs, min_steps=0, batch_size=batch_size, patience=0, amp=amp
            )
            result = fit(net, config, make_objective(config), x, None, settings)
            rows.append(
                [device, name, batch_size, "bf16" if amp else "fp32", result.windows_per_second]
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument(
        "--batches", type=int, nargs="*", default=[64, 256, 1024, 4096, 16384, 65536]
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    score_rows, model_rows, train_rows = [], [], []
    for device in devices:
        batches = args.batches if device == "cuda" else [b for b in args.batches if b <= 4096]
        score_rows += scoring(device, batches, args.repeats)
        model_rows += model_only(device, batches, args.repeats)
        for batch_size in (256, 4096):
            train_rows += training(device, args.epochs, batch_size)
    parity = None
    if "cuda" in devices:
        # the same detector on both devices must give the same scores (float32 kernels differ
        # only in rounding)
        windows = np.random.default_rng(2).normal(size=(4096, WINDOW, FEATURES))
        windows = windows.astype(np.float32)
        cpu = _detector(MODELS["dense 128-64/16"], "cpu").score(windows).scores
        gpu = _detector(MODELS["dense 128-64/16"], "cuda").score(windows).scores
        parity = float(np.max(np.abs(cpu - gpu) / np.maximum(np.abs(cpu), 1e-12)))
        print(f"CPU/CUDA score parity: max relative difference {parity:.2e}")
    markdown = "\n".join(
        [
            "## Model-only scoring and training throughput by device",
            "",
            f"Windows {WINDOW}x{FEATURES}; scoring through `Detector.score` (scaling, forward, "
            "attribution, copy back); medians of repeated runs.",
            "",
            md_table(["device", "model", "batch", "windows/s"], score_rows),
            "",
            "Model only (forward pass and error reduction on a batch already on the device):",
            "",
            md_table(["device", "model", "batch", "windows/s"], model_rows),
            "",
            md_table(["device", "model", "batch", "precision", "training windows/s"], train_rows),
        ]
    )
    write_results(
        args.out,
        "gpu",
        {
            "scoring": score_rows,
            "model_only": model_rows,
            "training": train_rows,
            "cpu_cuda_max_relative_difference": parity,
        },
        markdown,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Model-only scoring windows/s at several batch sizes, and training throughput, on CUDA and CPU.

The worker's model (window 64 x 8 sensors, dense 512-128-64-16 autoencoder) and a conv one, scored
through `Detector.score` (scaling, forward pass, attribution, transfer back) on random windows.
Runs anywhere; on a machine without CUDA only the CPU rows are filled.

With `--end-to-end`, also the whole worker through a real broker on this machine: a topic of
single-reading JSON records (`--readings`, 1,000 machines, `--partitions`) filled once the group
has joined, and `aewatch worker --processes N --device cuda` (CPU where there is no CUDA) for
each N of `--processes`, timed from outside by the group's committed offsets
(`benchmarks.bench_clients.processes_rate`), median of `--repeats` rounds that alternate N. The
broker is `KAFKA_BOOTSTRAP_SERVERS`, or one started from `deploy/kafka` (Java 17). Target: at
least 3,000,000 readings/s, at the process count given.

    python -m benchmarks.bench_gpu --out results
    python -m benchmarks.bench_gpu --out results --end-to-end --processes 1 4 8 16
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


E2E_TARGET = 3_000_000  # readings/s through the broker, single-reading records


def end_to_end(
    processes: list[int], readings: int, keys: int, partitions: int, device: str, repeats: int
) -> dict:
    """Readings/s of `aewatch worker --processes N` through a real broker, per N (see the
    module's docstring), with the cores its members and the broker used."""
    from benchmarks.bench_clients import processes_rate
    from benchmarks.bench_worker import _fleet, train_model
    from benchmarks.common import broker_and_workdir

    rates: dict[int, list[float]] = {n: [] for n in processes}
    cores: dict[int, list[dict]] = {n: [] for n in processes}
    with broker_and_workdir("aewatch-gpu") as (bootstrap, root):
        model = train_model(root, min(keys, 25))
        stream = _fleet(keys, readings // keys)
        records = list(zip(stream.keys.tolist(), stream.payloads(), strict=True))
        print(f"{len(records):,} readings, {keys} machines, {partitions} partitions", flush=True)
        for repeat in range(repeats):
            for n in processes:
                cpu: dict = {}
                log = root / f"processes-{n}.log"
                rate = processes_rate(
                    bootstrap,
                    records,
                    model,
                    n,
                    log,
                    f"{repeat}",
                    cpu=cpu,
                    device=device,
                    partitions=partitions,
                )
                rates[n].append(rate)
                if cpu:
                    cores[n].append(cpu)
                print(f"  --processes {n} --device {device}: {rate:,.0f} readings/s", flush=True)

    def used(n: int, whose: str) -> float | None:
        return statistics.median(c[whose] for c in cores[n]) if cores[n] else None

    first = statistics.median(rates[processes[0]])
    rows = [
        {
            "processes": n,
            "readings_per_second": statistics.median(rates[n]),
            "runs": rates[n],
            "vs_first": statistics.median(rates[n]) / first,
            "member_cores": used(n, "members"),
            "broker_cores": used(n, "broker"),
        }
        for n in processes
    ]
    best = max(rows, key=lambda row: row["readings_per_second"])
    return {
        "device": device,
        "readings": len(records),
        "keys": keys,
        "partitions": partitions,
        "rows": rows,
        "best": {
            "processes": best["processes"],
            "readings_per_second": best["readings_per_second"],
        },
        "target_readings_per_second": E2E_TARGET,
        "target_met": best["readings_per_second"] >= E2E_TARGET,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument(
        "--batches", type=int, nargs="*", default=[64, 256, 1024, 4096, 16384, 65536]
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--end-to-end", action="store_true", help="also the worker through a real broker"
    )
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--readings", type=int, default=8_000_000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--partitions", type=int, default=32)
    parser.add_argument("--e2e-repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if any(n < 1 or n > args.partitions for n in args.processes):
        parser.error(f"--processes: each count must be 1..--partitions ({args.partitions})")
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
    e2e = None
    if args.end_to_end:
        e2e = end_to_end(
            args.processes,
            args.readings,
            args.keys,
            args.partitions,
            "cuda" if "cuda" in devices else "cpu",
            args.e2e_repeats,
        )
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
        + ([] if e2e is None else _e2e_markdown(e2e))
    )
    write_results(
        args.out,
        "gpu",
        {
            "scoring": score_rows,
            "model_only": model_rows,
            "training": train_rows,
            "cpu_cuda_max_relative_difference": parity,
            "end_to_end": e2e,
        },
        markdown,
    )
    return 0


def _e2e_markdown(e2e: dict) -> list[str]:
    best = e2e["best"]
    return [
        "",
        f"## The worker through a real broker ({e2e['device']})",
        "",
        f"{e2e['readings']:,} single-reading JSON records, {e2e['keys']} machines, "
        f"{e2e['partitions']} partitions; `aewatch worker --processes N --device "
        f"{e2e['device']}`, timed by the group's committed offsets; medians.",
        "",
        md_table(
            ["processes", "readings/s", "vs first", "member cores", "broker cores"],
            [
                [
                    row["processes"],
                    row["readings_per_second"],
                    row["vs_first"],
                    row["member_cores"],
                    row["broker_cores"],
                ]
                for row in e2e["rows"]
            ],
        ),
        "",
        f"Best: {best['readings_per_second']:,.0f} readings/s with {best['processes']} "
        f"process(es); target {e2e['target_readings_per_second']:,}: "
        f"{'met' if e2e['target_met'] else 'NOT met'}.",
    ]


if __name__ == "__main__":
    raise SystemExit(main())

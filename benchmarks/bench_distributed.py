"""Training at scale on this machine: one process against two gloo ranks, and out-of-core memory.

1. Windows/s of `aewatch train` (dense undercomplete AE, synthetic series of 4 keys, window 32,
   stride 1, batch 256) in one process and with `--nproc-per-node 2` (DistributedDataParallel,
   gloo), alternating runs; the figure is the job's own (global windows over fit seconds), so
   process start-up and rendezvous are not counted. Medians and their ratio.
2. Peak resident memory of training on the same hive-partitioned Parquet dataset in memory and
   out of core (`--out-of-core`, 8,192-row batches, 8,192-window shuffle buffer), each in a
   fresh process warmed up on a small dataset of the same shape; the growth of the peak over
   the warmed-up process is reported next to the dataset's decoded size. Then in memory with
   overlapping windows (window 32, stride 1: every reading in 32 windows), whose growth is set
   against one copy of every window, what holding the windows (not the series) would take.

    python -m benchmarks.bench_distributed --out results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import md_table, write_results
from pipeline.tools.synthetic import write_parquet_series
from training.data.streamed import parquet_decoded_bytes

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def train_rate(data: Path, work: Path, nproc: int, epochs: int) -> float:
    """Training windows/s of one `aewatch train` run, as the job reports it."""
    out = work / f"det-{nproc}"
    command = [
        sys.executable, "-m", "pipeline.cli", "--log-level", "WARNING", "train",
        "--data", str(data), "--time-col", "ts", "--key-col", "machine", "--window", "32",
        "--stride", "1", "--hidden", "64,32", "--code-size", "8", "--epochs", str(epochs),
        "--patience", "0", "--batch-size", "256", "--target-fpr", "0.05", "--device", "cpu",
        "--out", str(out), "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", "--json",
        "--nproc-per-node", str(nproc),
    ]  # fmt: skip
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    if run.returncode:
        raise SystemExit(f"aewatch train failed:\n{run.stderr[-3000:]}")
    return float(json.loads(run.stdout.strip().splitlines()[-1])["windows_per_second"])


_MEASURE = """
import dataclasses, json, sys
import torch
torch.set_num_threads(1)
from pipeline.detector import ModelConfig
from training.fit import FitConfig
from training.job import CalibrationSettings, TrainSettings, train

def status(name):
    for line in open("/proc/self/status"):
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024

big, warm, out, out_of_core = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
window, stride = int(sys.argv[5]), int(sys.argv[6])
settings = TrainSettings(
    data=warm, out=out + "-warm", time_col="ts", key_col="machine", window=window, stride=stride,
    model=ModelConfig(hidden=(32,), code_size=8), fit=FitConfig(epochs=1, min_steps=0, patience=0),
    calibration=CalibrationSettings(target_fpr=0.05), device="cpu",
    out_of_core=out_of_core, batch_rows=8192, shuffle_windows=8192,
)
train(settings)
baseline = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
train(dataclasses.replace(settings, data=big, out=out))
print(json.dumps({"baseline": baseline, "peak": status("VmHWM")}))
"""


def peak_memory(
    big: Path, warm: Path, work: Path, out_of_core: bool, window: int = 16, stride: int = 16
) -> dict:
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEASURE,
            str(big),
            str(warm),
            str(work / "mem"),
            str(int(out_of_core)),
            str(window),
            str(stride),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1800,
    )
    if run.returncode:
        raise SystemExit(f"memory run failed:\n{run.stderr[-3000:]}")
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    return {
        "peak_mib": measured["peak"] / MIB,
        "growth_mib": (measured["peak"] - measured["baseline"]) / MIB,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--readings", type=int, default=50_000, help="per key, throughput data")
    parser.add_argument("--rows", type=int, default=500_000, help="per key, memory data")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="aewatch-bench-dist-") as tmp:
        work = Path(tmp)
        series = write_parquet_series(
            work / "series", n_keys=4, n=args.readings, n_features=8, days=4
        )
        rates: dict[int, list[float]] = {1: [], 2: []}
        for repeat in range(args.repeats):
            for nproc in (1, 2):
                rates[nproc].append(train_rate(series, work, nproc, args.epochs))
                print(
                    f"repeat {repeat + 1}, {nproc} process(es): {rates[nproc][-1]:,.0f} windows/s"
                )
        big = write_parquet_series(work / "big", n_keys=5, n=args.rows, n_features=16, days=8)
        warm = write_parquet_series(
            work / "warm", n_keys=5, n=args.rows // 12, n_features=16, days=8
        )
        size_mib = parquet_decoded_bytes(big) / MIB
        memory = {
            "in_memory": peak_memory(big, warm, work, out_of_core=False),
            "out_of_core": peak_memory(big, warm, work, out_of_core=True),
        }
        overlapping = peak_memory(big, warm, work, out_of_core=False, window=32, stride=1)
    # one float32 copy of every window of 5 keys x rows, 16 features, window 32 stride 1
    windows_mib = 5 * (args.rows - 31) * 32 * 16 * 4 / MIB
    overlap_share = overlapping["growth_mib"] / windows_mib
    median = {n: statistics.median(r) for n, r in rates.items()}
    ratio = median[2] / median[1]
    targets = {
        "out_of_core_growth_below_96_mib": memory["out_of_core"]["growth_mib"] < 96,
        "out_of_core_below_a_third_of_in_memory": memory["out_of_core"]["growth_mib"]
        < memory["in_memory"]["growth_mib"] / 3,
        "overlapping_windows_below_half_of_one_copy": overlap_share < 0.5,
    }
    markdown = "\n".join(
        [
            "## Training at scale: one process vs two gloo ranks, out-of-core memory",
            "",
            f"Throughput: 4 keys x {args.readings:,} readings, 8 features, window 32 stride 1, "
            f"batch 256, {args.epochs} epochs, medians of {args.repeats} alternating runs "
            f"({os.cpu_count()} CPU cores).",
            "",
            md_table(
                ["processes", "train windows/s"],
                [["1 (no process group)", median[1]], ["2 (DDP, gloo)", median[2]]],
            ),
            "",
            f"Ratio two ranks / one process: **{ratio:.2f}x**.",
            "",
            f"Memory: 5 keys x {args.rows:,} rows, 16 features, {size_mib:,.0f} MiB decoded "
            "(Parquet, 8 date partitions); window 16 stride 16, one epoch; peak RSS growth over "
            "a process warmed up on a twelfth of the data.",
            "",
            md_table(
                ["path", "peak RSS MiB", "growth MiB"],
                [[name, m["peak_mib"], m["growth_mib"]] for name, m in memory.items()],
            ),
            "",
            f"In memory, window 32 stride 1 (every reading in 32 windows), one epoch: peak RSS "
            f"{overlapping['peak_mib']:,.0f} MiB, growth {overlapping['growth_mib']:,.0f} MiB, "
            f"**{overlap_share:.2f}** of one copy of every window ({windows_mib:,.0f} MiB).",
            "",
            f"Targets met: {targets}",
        ]
    )
    write_results(
        args.out,
        "distributed_training",
        {
            "settings": vars(args) | {"out": str(args.out)},
            "windows_per_second": {"1": rates[1], "2": rates[2]},
            "median_windows_per_second": {"1": median[1], "2": median[2]},
            "ratio": ratio,
            "dataset_decoded_mib": size_mib,
            "memory": memory,
            "overlapping_windows": overlapping
            | {"one_copy_of_the_windows_mib": windows_mib, "share": overlap_share},
            "targets": targets,
        },
        markdown,
    )
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

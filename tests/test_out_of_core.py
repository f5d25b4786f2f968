"""Out-of-core series: the same windows, split and scaler as in memory, in bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.detector import Scaler, ScalerFit, WindowSpec, cut_windows
from pipeline.errors import ConfigError, DataError
from pipeline.tools.synthetic import write_parquet_series
from training.data.series import load_series, series_groups, split_series
from training.data.streamed import SeriesStream, parquet_decoded_bytes
from training.job import TrainSettings

FRACTIONS = (0.6, 0.15, 0.15, 0.1)
REPO = Path(__file__).resolve().parents[1]


def _sorted_fields(windows) -> dict[str, np.ndarray]:
    """A split's windows in the in-memory order (key, then time)."""
    fields = ("windows", "keys", "start_times", "end_times", "end_labels", "any_labels")
    joined = {f: np.concatenate([getattr(w, f) for w in windows]) for f in fields}
    order = np.lexsort((joined["end_times"].view(np.int64), joined["keys"].astype(str)))
    return {f: v[order] for f, v in joined.items()}


@pytest.mark.parametrize(
    ("window", "stride", "train_until"), [(16, 3, None), (7, 9, "2026-01-01T00:20:00")]
)
def test_windows_across_files_and_batches_match_the_in_memory_path(
    tmp_path: Path, window: int, stride: int, train_until: str | None
):
    root = write_parquet_series(tmp_path / "ds", n_keys=3, n=1500, days=5, label_every=97)
    spec = WindowSpec(window, stride)
    # an odd batch size, so batches end mid-file as well as at file boundaries
    stream = SeriesStream(root, time_col="ts", key_col="machine", label_col="label", batch_rows=211)
    plan = stream.plan(FRACTIONS, train_until)
    table = load_series(root, time_col="ts", key_col="machine", label_col="label")
    parts = split_series(table, FRACTIONS, train_until=train_until)

    for name, part in parts.items():
        expected = cut_windows(series_groups(part), spec)
        got = _sorted_fields(list(stream.windows(plan, name, spec)))
        assert plan.rows(name) == len(part)
        assert plan.windows(name, spec) == len(expected)
        for field, values in got.items():
            np.testing.assert_array_equal(values, getattr(expected, field), err_msg=field)
    streamed = stream.fit_scaler(plan, "standard")
    in_memory = Scaler.fit("standard", parts["train"].normal_rows().values())
    np.testing.assert_allclose(streamed.center, in_memory.center, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(streamed.scale, in_memory.scale, rtol=1e-12)
    assert plan.time_range == table.time_range()
    # the digest names the content, however it is spread over files and batches
    again = SeriesStream(root, time_col="ts", key_col="machine", label_col="label", batch_rows=5000)
    assert again.plan(FRACTIONS, train_until).digest == plan.digest


def test_chunked_scaler_fit_agrees_with_one_fit():
    samples = np.random.default_rng(3).normal(5, 3, size=(10_000, 4))
    for kind in ("standard", "minmax", "none", "robust"):
        chunked = ScalerFit(kind)
        for chunk in np.array_split(samples, 7):
            chunked.update(chunk)
        np.testing.assert_allclose(chunked.compute().center, Scaler.fit(kind, samples).center)
        np.testing.assert_allclose(chunked.compute().scale, Scaler.fit(kind, samples).scale)


def test_a_reading_out_of_time_order_names_the_file_and_key(tmp_path: Path):
    root = write_parquet_series(tmp_path / "ds", n_keys=2, n=400, days=2)
    late = root / "date=2026-01-02" / "m1.parquet"
    table = pq.read_table(late)
    pq.write_table(table.take([*range(1, table.num_rows), 0]), late)  # first reading last
    stream = SeriesStream(root, time_col="ts", key_col="machine")
    with pytest.raises(DataError, match=r"m1\.parquet.*key 'm1'.*time order"):
        stream.plan(FRACTIONS)


def test_settings_the_out_of_core_path_cannot_honour_fail_at_start(tmp_path: Path):
    root = write_parquet_series(tmp_path / "ds", n_keys=1, n=100, days=1)
    with pytest.raises(ConfigError, match="^out_of_core: .*Parquet"):
        TrainSettings(data=str(tmp_path / "x.csv"), time_col="ts", out_of_core=True)
    with pytest.raises(ConfigError, match="^fill: "):
        TrainSettings(data=str(root), time_col="ts", fill="interpolate", out_of_core=True)
    with pytest.raises(ConfigError, match="^scaler: "):
        TrainSettings(data=str(root), time_col="ts", scaler="robust", out_of_core=True)
    with pytest.raises(ConfigError, match="^batch_rows: "):
        TrainSettings(data=str(root), time_col="ts", batch_rows=0, out_of_core=True)


# -- memory ---------------------------------------------------------------------------------------
BOUND_MIB = 128
"""Peak resident memory a training run may add, out of core, over a warmed-up process: a third
of the decoded dataset (in memory the same run adds about 1,700 MiB); measured 96-98 MiB."""

_MEASURE = textwrap.dedent(
    """
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

    big, warm, out = sys.argv[1:4]
    settings = TrainSettings(
        data=warm, out=out + "-warm", time_col="ts", key_col="machine", window=16, stride=16,
        model=ModelConfig(hidden=(32,), code_size=8), fit=FitConfig(min_steps=0, epochs=1, patience=0),
        calibration=CalibrationSettings(target_fpr=0.05), device="cpu",
        out_of_core=True, batch_rows=8192, shuffle_windows=8192,
    )
    train(settings)  # loads every library and kernel the measured run uses
    baseline = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
    result = train(dataclasses.replace(settings, data=big, out=out))
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM"),
                      "windows": result.detector.info["data"]["windows"]}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_out_of_core_training_memory_does_not_grow_with_the_dataset(tmp_path: Path):
    big = write_parquet_series(tmp_path / "big", n_keys=5, n=500_000, n_features=16, days=8)
    warm = write_parquet_series(tmp_path / "warm", n_keys=5, n=40_000, n_features=16, days=8)
    size = parquet_decoded_bytes(big)
    assert size > 3 * BOUND_MIB * 2**20, f"the dataset ({size / 2**20:.0f} MiB) is too small"
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(big), str(warm), str(tmp_path / "det")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    growth_mib = (measured["peak"] - measured["baseline"]) / 2**20
    assert measured["windows"]["train"] == 93_750
    assert growth_mib < BOUND_MIB, (
        f"peak grew by {growth_mib:.0f} MiB on a {size / 2**20:.0f} MiB dataset"
    )


def test_a_column_only_some_files_hold_is_read_and_said(tmp_path: Path, caplog):
    """A folder's dataset took its columns from its first file: a feature a later file adds was
    left out without a word. It is now read (missing where a file lacks it) with a warning; with
    `--fill drop` a batch whose every row lacks it yields no rows (it raised ValueError out of
    core), and a column that is text in one file and numbers in another names both files."""
    import pyarrow as pa

    root = write_parquet_series(tmp_path / "ds", n_keys=2, n=400, days=2)
    files = sorted(root.rglob("*.parquet"))
    later = pq.read_table(files[-1])
    pq.write_table(later.append_column("extra", pa.array(np.ones(later.num_rows))), files[-1])
    for stream in (True, False):
        if stream:
            reader = SeriesStream(root, time_col="ts", key_col="machine", fill="drop")
            plan = reader.plan(FRACTIONS)
            rows = sum(plan.rows(name) for name in ("train", "validation", "calibration", "test"))
            features = reader.features
        else:
            table = load_series(root, time_col="ts", key_col="machine", fill="drop")
            rows, features = len(table.frame), table.features
        assert "extra" in features and rows == later.num_rows
    assert "'extra' are not in every file" in caplog.text
    pq.write_table(later.append_column("text", pa.array(["x"] * later.num_rows)), files[-1])
    first = pq.read_table(files[0])
    pq.write_table(first.append_column("text", pa.array(np.ones(first.num_rows))), files[0])
    with pytest.raises(DataError, match=r"column 'text' is string in .* and double in"):
        load_series(root, time_col="ts", key_col="machine")
